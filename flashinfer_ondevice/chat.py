"""Chat templates: render a model's Jinja template (untrusted, so in jinja2's sandbox)."""

from __future__ import annotations

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ModelFileError


def _raise(message: str):
    raise TemplateError(message)


def render_chat(template: str, messages: list[dict[str, str]], bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template).render(
            messages=messages, bos_token=bos_token, eos_token=eos_token,
            add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        raise ModelFileError(f"the model's chat template failed: {exc}") from None
