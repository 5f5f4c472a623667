"""Chat templates: render a model's Jinja chat template, which is untrusted, at bounded cost.

A template comes with the model file, so it renders in jinja2's immutable sandbox and, where
the platform can fork, in a forked child process under hard limits: wall time (TIME_LIMIT_S),
memory (MEMORY_HEADROOM beyond what the process maps when it forks) and output
(MAX_OUTPUT_CHARS beyond the messages' own text, checked as the text streams out and before
`*`, `**` or `+` builds a value larger than that). Without fork (not POSIX) rendering stays
in-process with the sandbox's and the output limits only. Every failure is a ModelFileError
with a one-line message; the template's output is never shown.
"""

from __future__ import annotations

import faulthandler
import gc
import importlib
import json
import math
import os
import select
import signal
import time
import warnings
from collections.abc import Iterable
from contextlib import suppress
from typing import Any, NoReturn

from jinja2 import TemplateError, TemplateSyntaxError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import FlashInferError, ModelFileError

_CAN_FORK = hasattr(os, "fork")
if _CAN_FORK:
    import resource

# Modules jinja2 imports only once needed (for pformat, wordwrap, lipsum, and on errors):
# imported now, so that the forked child never imports (another thread may hold the locks).
for _module in ("pprint", "textwrap", "jinja2.constants", "jinja2.debug"):
    importlib.import_module(_module)

TIME_LIMIT_S = 3.0  # wall time for a render (fork included); a real one takes milliseconds
MAX_OUTPUT_CHARS = 1 << 20  # beyond the messages' text; real templates add a few KiB
MAX_TEMPLATE_CHARS = 256 << 10  # real templates are a few KiB, the largest tens of KiB
MEMORY_HEADROOM = 512 << 20  # bytes the child may map beyond what it inherits

_TIME_ERROR = f"the model's chat template took over {TIME_LIMIT_S:g} s to render (limit)"
_OUTPUT_ERROR = (f"the model's chat template produces more than {MAX_OUTPUT_CHARS:,} "
                 "characters besides the messages (limit)")
_MEMORY_ERROR = (f"the model's chat template needs more than {MEMORY_HEADROOM >> 20} MiB of "
                 "memory to render (limit)")
_MAX_DETAIL_CHARS = 200  # of an error's own message, quoted in ours
_SEQUENCES = (str, bytes, list, tuple)


class _OutputLimit(Exception):
    """The template builds or renders more text than allowed."""


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, refusing a `*`, `**` or `+` whose result would be longer
    than `max_chars` (intercepting them also keeps jinja from folding them at compile time)."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self, max_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        self.globals["raise_exception"] = _raise
        self.max_chars = max_chars

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if _result_chars(operator, left, right) > self.max_chars:
            raise _OutputLimit
        return super().call_binop(context, operator, left, right)


def _raise(message: str) -> NoReturn:
    raise TemplateError(message)


def _result_chars(operator: str, left: Any, right: Any) -> float:
    """About len(str(left <operator> right)), computed without the operation: exact for
    sequences, decimal digits for integers, 0 for other operands (they stay small)."""
    if isinstance(left, int) and isinstance(right, _SEQUENCES):
        left, right = right, left
    if isinstance(left, _SEQUENCES):
        if operator == "*" and isinstance(right, int):
            return len(left) * right
        if operator == "+" and isinstance(right, _SEQUENCES):
            return len(left) + len(right)
        return 0
    if isinstance(left, int) and isinstance(right, int):
        if operator == "**":
            return right * math.log10(abs(left)) + 1 if abs(left) > 1 else 0
        return _digits(left) + _digits(right)
    return 0


def _digits(number: int) -> float:
    return math.log10(abs(number)) + 1 if number else 1


def render_chat(template: str, messages: list[dict[str, str]], bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """`messages` rendered with the model's chat template; ModelFileError if the template
    fails or exceeds a limit (see the module docstring)."""
    if not isinstance(template, str):
        raise ModelFileError("the model's chat template is not text")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ModelFileError(f"the model's chat template is longer than "
                             f"{MAX_TEMPLATE_CHARS:,} characters (limit)")
    _check_messages(messages)
    context = {"messages": messages, "bos_token": bos_token, "eos_token": eos_token,
               "add_generation_prompt": add_generation_prompt}
    max_chars = MAX_OUTPUT_CHARS + sum(len(value) for message in messages
                                       for value in message.values() if isinstance(value, str))
    if _CAN_FORK:
        return _render_in_child(template, context, max_chars)
    return _render(template, context, max_chars)


def _check_messages(messages: Any) -> None:
    """FlashInferError unless `messages` is a list of dicts, each with a string "role"."""
    if not isinstance(messages, (list, tuple)) or not all(
            isinstance(message, dict) and isinstance(message.get("role"), str)
            for message in messages):
        raise FlashInferError("chat messages must be a list of dicts, each with a string "
                              "'role'")


def _render(template: str, context: dict[str, Any], max_chars: int) -> str:
    """The rendered template, at most `max_chars` long; ModelFileError for every failure."""
    try:
        return _joined(_BoundedSandbox(max_chars).from_string(template).generate(context),
                       max_chars)
    except _OutputLimit:
        raise ModelFileError(_OUTPUT_ERROR) from None
    except MemoryError:
        raise ModelFileError(_MEMORY_ERROR) from None
    except RecursionError:
        raise ModelFileError("the model's chat template is nested too deeply") from None
    except TemplateSyntaxError as exc:
        raise ModelFileError(f"the model's chat template is invalid: "
                             f"{_detail(exc.message)} (line {exc.lineno})") from None
    except TemplateError as exc:
        detail = _detail(exc.message)
        raise ModelFileError(f"the model's chat template failed: {detail}") from None
    except Exception as exc:
        raise ModelFileError(f"the model's chat template failed: {type(exc).__name__}: "
                             f"{_detail(str(exc))}") from None


def _joined(chunks: Iterable[str], max_chars: int) -> str:
    parts, chars = [], 0
    for chunk in chunks:
        chars += len(chunk)
        if chars > max_chars:
            raise _OutputLimit
        parts.append(chunk)
    return "".join(parts)


def _detail(message: str | None) -> str:
    """The first line of an error's message, cut to _MAX_DETAIL_CHARS."""
    line = (message or "").strip().split("\n", 1)[0]
    return line if len(line) <= _MAX_DETAIL_CHARS else line[:_MAX_DETAIL_CHARS - 3] + "..."


def _render_in_child(template: str, context: dict[str, Any], max_chars: int) -> str:
    """_render in a forked child process, killed after TIME_LIMIT_S."""
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # Python warns that a process with threads forks: the child does only pure Python
        # work (no imports, no native libraries, no finalizers of inherited objects).
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(write_fd, template, context, max_chars)
    os.close(write_fd)
    try:
        # JSON takes at most 6 bytes for a character (\u001f); error messages are short.
        reply = _read_reply(read_fd, time.monotonic() + TIME_LIMIT_S, 6 * max_chars + 4096)
    finally:
        os.close(read_fd)
        os.kill(pid, signal.SIGKILL)  # a no-op where it has exited (it stays ours until reaped)
        status = os.waitpid(pid, 0)[1]
    if reply is None:
        raise ModelFileError(_TIME_ERROR)
    try:
        result = json.loads(reply.decode("utf-8", "surrogatepass"))
    except ValueError:  # no or a partial reply: it died, short of memory
        raise ModelFileError(_MEMORY_ERROR + _death(status)) from None
    if "error" in result:
        raise ModelFileError(result["error"])
    return result["text"]


def _death(status: int) -> str:
    """The suffix naming the signal that ended the child (wait `status`), if one did."""
    if not os.WIFSIGNALED(status):
        return ""
    return f" (killed by {signal.Signals(os.WTERMSIG(status)).name})"


def _read_reply(fd: int, deadline: float, max_bytes: int) -> bytes | None:
    """All the child writes to `fd` (until it exits); None if it is still at it at
    `deadline` (monotonic time)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks, size = [], 0
    while True:
        wait_ms = math.ceil((deadline - time.monotonic()) * 1000)
        if wait_ms <= 0 or not poller.poll(wait_ms):
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise ModelFileError(_OUTPUT_ERROR)
        chunks.append(chunk)


def _child(write_fd: int, template: str, context: dict[str, Any], max_chars: int) -> NoReturn:
    """The forked child: render under hard limits, write the JSON reply, exit."""
    try:
        _isolate_child()
        try:
            reply = {"text": _render(template, context, max_chars)}
        except ModelFileError as exc:
            reply = {"error": str(exc)}
        data = json.dumps(reply, ensure_ascii=False).encode("utf-8", "surrogatepass")
        while data:
            data = data[os.write(write_fd, data):]
    finally:
        os._exit(0)


def _isolate_child() -> None:
    """Keeps the child from touching what the parent's threads own and from printing, and
    caps its memory and CPU time (the latter a backstop for the parent's deadline)."""
    gc.freeze()  # the finalizers of inherited objects never run here
    faulthandler.disable()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    _lower_limit(resource.RLIMIT_CORE, 0)
    _lower_limit(resource.RLIMIT_CPU, math.ceil(TIME_LIMIT_S) + 2)
    with suppress(OSError):  # no /proc (not Linux): the time and output limits remain
        statm = os.open("/proc/self/statm", os.O_RDONLY)
        mapped = int(os.read(statm, 100).split()[0]) * resource.getpagesize()
        os.close(statm)
        _lower_limit(resource.RLIMIT_AS, mapped + MEMORY_HEADROOM)


def _lower_limit(kind: int, value: int) -> None:
    """Sets both the soft and hard limit `kind` to `value` unless already lower (at the hard
    CPU limit the kernel sends SIGKILL, not SIGXCPU); where refused, nothing changes."""
    limits = [limit for limit in resource.getrlimit(kind) if limit != resource.RLIM_INFINITY]
    value = min([value, *limits])
    with suppress(ValueError, OSError):
        resource.setrlimit(kind, (value, value))
