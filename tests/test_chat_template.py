"""Chat templates are untrusted: render_chat renders good ones exactly as jinja2's sandbox
does, and bounds hostile ones in time, memory and output, failing with a one-line
ModelFileError (never a hang, a MemoryError or a traceback)."""

from __future__ import annotations

import sys
import threading
import time

import psutil
import pytest
from jinja2 import TemplateError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flashinfer_ondevice import chat
from flashinfer_ondevice.chat import MAX_OUTPUT_CHARS, TIME_LIMIT_S, render_chat
from flashinfer_ondevice.errors import FlashInferError, ModelFileError

# Gemma 3's chat template (as in its tokenizer_config.json).
GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "  Hi  "},
     {"role": "assistant", "content": "Hello! ✨"},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}],
]

NESTED_LOOPS = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                "{% endfor %}")
USER = [{"role": "user", "content": "hi"}]


def plain_render(template: str, messages, **variables) -> str:
    """How render_chat rendered before it had limits."""
    def raise_exception(message):
        raise TemplateError(message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, **variables)


def refusal(template: str, messages=USER) -> tuple[str, float]:
    """render_chat's ModelFileError message for `template`, and the seconds it took."""
    start = time.monotonic()
    with pytest.raises(ModelFileError) as caught:
        render_chat(template, messages)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("the model's chat template")
    return message, time.monotonic() - start


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma_template_renders_as_plain_sandbox(messages, add_generation_prompt):
    got = render_chat(GEMMA, messages, bos_token="<bos>", eos_token="<eos>",
                      add_generation_prompt=add_generation_prompt)
    assert got == plain_render(GEMMA, messages, bos_token="<bos>", eos_token="<eos>",
                               add_generation_prompt=add_generation_prompt)
    assert got.startswith("<bos><start_of_turn>user\n")


def test_long_messages_do_not_count_against_the_output_limit():
    messages = [{"role": "user", "content": "word " * MAX_OUTPUT_CHARS}]
    assert render_chat(GEMMA, messages) == plain_render(GEMMA, messages, bos_token="",
                                                        add_generation_prompt=True)


def test_nested_loops_stop_at_the_time_limit():
    message, seconds = refusal(NESTED_LOOPS)
    assert "took over" in message and "(limit)" in message
    assert seconds < TIME_LIMIT_S + 2


@pytest.mark.parametrize("template", [
    "{{ 'x' * 10**12 }}",
    "{{ 'x' * 10**7 }}",
    "{{ [0] * 10**9 }}",
    "{% for i in range(20000) %}{{ 'y' * 1000 }}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100) %}yyyy{% endfor %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}{{ ns.s }}",
    "{{ 10 ** (10 ** 10) }}",
    "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
    "{% endfor %}{{ ns.n % 7 }}",
])
def test_huge_output_stops_at_the_output_limit_quickly(template):
    process = psutil.Process()
    rss = process.memory_info().rss
    message, seconds = refusal(template)
    assert f"more than {MAX_OUTPUT_CHARS:,} characters" in message
    assert seconds < 2
    assert process.memory_info().rss - rss < 100 << 20


@pytest.mark.parametrize("template", [
    "{{ 'x'.ljust(10**10) }}",
    "{{ 'x'|center(10**10) }}",
    "{{ 'x'|center(10000000000) }}",  # a literal: jinja tries it at compile time too
    "{{ '%0999999999d' % 1 }}",
])
def test_huge_allocations_stop_at_the_memory_limit(template):
    message, seconds = refusal(template)
    # the memory limit needs Linux (/proc); elsewhere the time limit stops them
    assert ("memory" if sys.platform.startswith("linux") else "(limit)") in message
    assert seconds < TIME_LIMIT_S + 2


def test_power_is_left_associative_and_small():
    # jinja reads 10**10**10 as (10**10)**10, a 101-digit number: harmless, so it renders
    assert render_chat("{{ 10**10**10 }}", USER) == str(10**100)


def test_template_output_is_never_shown():
    message, _ = refusal("{{ 'SECRET' * 10**7 }}")
    assert "SECRET" not in message


def test_syntax_error():
    message, _ = refusal("{% for %}\n{{ messages }}")
    assert "invalid" in message and "line 1" in message


def test_raise_exception_message_is_kept():
    message, _ = refusal("{{ raise_exception('Conversation roles must alternate') }}")
    assert message == "the model's chat template failed: Conversation roles must alternate"


@pytest.mark.parametrize("template", [
    "{% if true %}" * 5000 + "x" + "{% endif %}" * 5000,
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
])
def test_deep_nesting(template):
    message, _ = refusal(template)
    assert "nested too deeply" in message


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages[0].content + 1 }}",
])
def test_other_failures_are_one_line(template):
    message, _ = refusal(template)
    assert "failed" in message


def test_undefined_variables_keep_jinja_defaults():
    template = "[{{ missing }}]{% if nothing %}no{% endif %}[{{ messages[0].nope }}]"
    assert render_chat(template, USER) == plain_render(template, USER) == "[][]"
    with pytest.raises(UndefinedError):
        plain_render("{{ missing.attribute }}", USER)
    message, _ = refusal("{{ missing.attribute }}")
    assert "'missing' is undefined" in message


def test_template_too_long_or_not_text():
    message, seconds = refusal("x" * (chat.MAX_TEMPLATE_CHARS + 1))
    assert "longer than" in message and seconds < 1
    assert "not text" in refusal(7)[0]


@pytest.mark.parametrize("messages", ["hi", None, [{"role": 1, "content": "x"}], ["hi"]])
def test_messages_must_be_dicts_with_a_role(messages):
    with pytest.raises(FlashInferError, match="messages"):
        render_chat(GEMMA, messages)


def test_renders_while_other_threads_run():
    stop = threading.Event()
    lock = threading.Lock()

    def busy():
        while not stop.is_set():
            with lock:
                sum(range(1000))
    threads = [threading.Thread(target=busy) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(20):
            assert render_chat(GEMMA, CONVERSATIONS[1]) == plain_render(
                GEMMA, CONVERSATIONS[1], bos_token="", add_generation_prompt=True)
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def test_without_fork_renders_in_process_with_the_sandbox_limits(monkeypatch):
    monkeypatch.setattr(chat, "_CAN_FORK", False)
    assert render_chat(GEMMA, CONVERSATIONS[0]) == plain_render(
        GEMMA, CONVERSATIONS[0], bos_token="", add_generation_prompt=True)
    message, _ = refusal("{{ 'x' * 10**12 }}")
    assert "characters" in message
    message, _ = refusal("{{ raise_exception('nope') }}")
    assert message.endswith("nope")
