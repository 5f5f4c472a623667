"""A store's quality record: how far its next-token distributions are from its source's,
measured at convert (build/store_quality.py) and read by the planner's choice between stores
(runtime/store_choice.py). Validated like every other manifest field: a store can be hostile.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Quality:
    """How far a model's next-token distributions are from a reference's."""

    tokens: int  # scored positions
    kl: float  # mean KL(reference || model), nats per position
    top1: float  # fraction of positions with the same most likely token
    nll_delta: float  # mean NLL of the text's next tokens, model minus reference

    @property
    def ppl_change(self) -> float:
        """Expected relative perplexity change, exp(kl) - 1: KL is the mean NLL increase on
        text the reference itself would write, and varies far less over a few hundred
        positions than the NLL change on one text (nll_delta, recorded beside it). On Gemma 3
        270M, 20k held-out tokens (docs/benchmarks.md), KL 0.36 / 0.0077 predict +44% /
        +0.8% where perplexity measured +39% / -0.1%."""
        return math.expm1(self.kl)

    def as_record(self) -> dict:
        return asdict(self)


def parse_quality(raw) -> dict[str, Quality]:
    """A manifest's quality record, validated; ValueError if malformed."""
    if not isinstance(raw, dict) or "exact" not in raw or \
            not set(raw) <= {"exact", "shortlist"}:
        raise ValueError("quality record is malformed")
    parsed = {}
    for name, values in raw.items():
        if not isinstance(values, dict) or set(values) != {"tokens", "kl", "top1",
                                                           "nll_delta"}:
            raise ValueError(f"quality record {name!r} is malformed")
        tokens, numbers = values["tokens"], [values[k] for k in ("kl", "top1", "nll_delta")]
        if type(tokens) is not int or not all(type(v) in (int, float) and math.isfinite(v)
                                               for v in numbers):
            raise ValueError(f"quality record {name!r} has values that are not finite numbers")
        quality = Quality(tokens, *(float(v) for v in numbers))
        if not (0 < quality.tokens < 1 << 40 and 0 <= quality.kl < 100
                and 0 <= quality.top1 <= 1 and abs(quality.nll_delta) < 100):
            raise ValueError(f"quality record {name!r} is out of range")
        parsed[name] = quality
    return parsed
