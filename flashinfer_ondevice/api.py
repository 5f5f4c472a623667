"""Public API: `load()` a model, then `tokenize`, `logits`, `generate` and `stream` with it.

Load-time settings (context size, threads) are arguments of `load`; sampling settings are
arguments of each call, as in ollama and llama-cpp-python.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from .chat import render_chat
from .errors import ContextLengthError, FlashInferError
from .generate import GenerationResponse, prefill, stream_generate
from .loader import Checkpoint, load_checkpoint
from .model import Transformer
from .sampling import make_logits_processors, make_sampler

DEFAULT_CTX = 4096


class Model:
    """A loaded model: tokenizer, weights and forward pass."""

    def __init__(self, checkpoint: Checkpoint, ctx_size: int | None, load_seconds: float):
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.chat_template = checkpoint.chat_template
        self.path = checkpoint.source
        self.load_seconds = load_seconds
        self.weights = checkpoint.weights
        self.engine = Transformer(checkpoint.config, checkpoint.weights, checkpoint.ggml_numerics)
        limit = self.config.context_length
        self.ctx_size = min(DEFAULT_CTX, limit) if ctx_size is None else ctx_size
        if not 1 <= self.ctx_size <= limit:
            raise FlashInferError(f"context size {self.ctx_size} is outside 1..{limit}, "
                                  "the model's trained context")

    # tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise FlashInferError("this model has no chat template")
        bos_id = self.tokenizer.bos_id
        bos = self.tokenizer.special_text(bos_id) if bos_id is not None else ""
        return render_chat(self.chat_template, messages, bos_token=bos,
                           add_generation_prompt=add_generation_prompt)

    def chat_prompt_ids(self, prompt: str, system_prompt: str | None = None) -> list[int]:
        """Token ids of `prompt` as a user turn in the model's chat template."""
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        text = self.apply_chat_template([*messages, {"role": "user", "content": prompt}])
        bos = self.tokenizer.bos_id
        has_bos = bos is not None and text.startswith(self.tokenizer.special_text(bos))
        return self.tokenize(text, add_special=not has_bos)

    # evaluation -----------------------------------------------------------------------
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position of `ids`: float32 (len(ids), vocab)."""
        ids = self._checked_ids(ids, reserve=0)
        cache = self.engine.new_cache(len(ids))
        return prefill(self.engine, ids, cache, all_logits=True)

    # generation -----------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], max_tokens: int = 256,
               temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40,
               min_p: float = 0.05, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: Sequence[str] = ()) -> Iterator[GenerationResponse]:
        """Yield a `GenerationResponse` per token; the last has `finish_reason` set."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        ids = self._checked_ids(ids, reserve=1)
        if max_tokens < 1:
            raise FlashInferError(f"max_tokens must be at least 1, got {max_tokens}")
        sampler = make_sampler(temperature, top_p, top_k, min_p, seed)
        processors = make_logits_processors(repetition_penalty)
        cache = self.engine.new_cache(self.ctx_size)
        yield from stream_generate(self.engine, self.tokenizer, ids, cache, sampler, processors,
                                   max_tokens, stop)

    def generate(self, prompt: str | Sequence[int], **kwargs) -> str:
        """The generated text; takes the arguments of `stream`."""
        return "".join(response.text for response in self.stream(prompt, **kwargs))

    def _checked_ids(self, ids: Sequence[int], reserve: int) -> list[int]:
        """Validate token ids; `reserve` > 0 also requires room for that many new tokens."""
        ids = [int(t) for t in ids]
        if not ids:
            raise FlashInferError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise FlashInferError(f"token id {bad[0]} is outside the vocabulary "
                                  f"(0..{self.config.vocab_size - 1})")
        if reserve and len(ids) + reserve > self.ctx_size:
            raise ContextLengthError(
                f"prompt is {len(ids)} tokens; the context holds {self.ctx_size} "
                f"(raise -c/--ctx-size, up to {self.config.context_length})")
        if len(ids) > self.config.context_length:
            raise ContextLengthError(f"{len(ids)} tokens exceed the model's context of "
                                     f"{self.config.context_length}")
        return ids


def load(path: str | Path | None = None, *, ctx_size: int | None = None,
         threads: int | None = None, progress: bool | None = None) -> Model:
    """Load a GGUF file or Hugging Face folder; no path loads the embedded default model.

    ctx_size: context window in tokens (default min(4096, the model's)).
    threads: CPU threads for matrix products (default: all cores).
    progress: show progress bars (default: when stderr is a terminal).
    """
    if progress is None:
        progress = sys.stderr.isatty()
    if threads is not None:
        if threads < 1:
            raise FlashInferError(f"threads must be at least 1, got {threads}")
        threadpool_limits(limits=threads)
    start = time.perf_counter()
    if path is None:
        from .default_model import default_model_path
        path = default_model_path(progress=progress)
    checkpoint = load_checkpoint(path, progress=progress)
    return Model(checkpoint, ctx_size, time.perf_counter() - start)
