"""The budget chooses between fitting and streaming: a smaller store of the same model that
stays resident, or a larger one that streams, with the quality each costs on the table.

Options: every store of the model (the one asked for, and any other converted from the same
source), each with the output-layer plans the request allows (every logit exact; the
shortlist head where the store has a proxy). Each option's plan says what it reads from
storage per token (streamed tensors, plus the shortlist's candidate rows that are not
resident), and the store's quality record (measured at convert, store/quality_record.py)
what it costs: the expected perplexity change against the source, plus the shortlist head's
against the exact store. Reading is what decides a budgeted token's time (a streamed byte
costs more than computing with a resident one), so options are ranked by bytes read.

  exact    the asked store, every logit exact (what the model is, streamed as needed)
  auto     the option reading least whose expected perplexity change is within
           AUTO_TOLERANCE of the source; if none is, the least expected change
  fastest  the option reading least
Reads within SAME_READ_* of the least count as equal; among equals, the least expected
change wins.

A store without a quality record (converted by an older version) cannot be weighed: when
the asked store has none it runs as the planner plans it, and other stores without one are
not considered. The record is measured dense: FFN sparsity's own cost is in its calibration
record, not here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import FlashInferError
from ..schema import layer_key
from ..store.reader import Store
from ..store.vocab_tiers import COLD
from .planner import BudgetError, Plan

QUALITY_MODES = ("auto", "exact", "fastest")
AUTO_TOLERANCE = 0.05  # expected perplexity increase over the source that auto accepts
# Reads within this of the least count as equally fast (then quality decides): on Gemma 3
# 270M at a 50% budget, pal3 and pal4 with the shortlist head read 0.7 MB per token each,
# against 1-2 ms of compute per token, and pal4 costs far less perplexity.
SAME_READ_FRACTION, SAME_READ_BYTES = 0.10, 1 << 20


@dataclass(frozen=True)
class Option:
    store: Store
    plan: Plan
    read_nbytes: int  # bytes read from storage per token (expected)
    ppl_change: float | None  # expected perplexity change vs the source; None: unmeasured

    @property
    def label(self) -> str:
        return f"{codecs_of(self.store)} store, " \
            f"{'shortlist' if self.plan.shortlist else 'exact'} head"

    def describe(self) -> str:
        change = "unmeasured" if self.ppl_change is None else f"{self.ppl_change:+.1%}"
        return (f"{self.label}: reads {self.read_nbytes / 1e6:.1f} MB per token, expected "
                f"perplexity {change}")


def codecs_of(store: Store) -> str:
    """The store's codecs as a spec: the FFN's, then the groups that differ."""
    embed = store.tensors["embed"].codec
    if store.vocab_tiers is not None:
        embed += f"@{store.vocab_tiers.hot_rows}/{store.tensors[COLD].codec}"
    groups = {"ffn": store.tensors[layer_key(0, "ffn")].codec,
              "attn": store.tensors[layer_key(0, "wq")].codec, "embed": embed}
    return ",".join([groups["ffn"], *(f"{g}={c}" for g, c in groups.items()
                                      if c != groups["ffn"])])


def read_nbytes(store: Store, plan: Plan) -> int:
    """Bytes a token reads: what streams, the shortlist's candidates not resident, and
    (sparse FFNs under a budget) the needed neurons the caches miss, estimated as if the
    caches held a uniform share of them."""
    read = plan.streamed_bytes
    if plan.shortlist:
        head = store.tensors[plan.head]
        missing = 1 - plan.head_resident_rows / head.rows
        read += int(plan.shortlist * head.row_nbytes * missing)
    if plan.ffn_cached:
        ffn = store.tensors[layer_key(0, "ffn")]
        needed = (1 - plan.sparse.sparsity) * ffn.rows
        uncached = max(0.0, 1 - plan.cache_rows / ffn.rows)
        read += int(store.config.n_layers * needed * uncached * ffn.row_nbytes)
    return read


def expected_change(store: Store, shortlist: bool) -> float | None:
    """Expected perplexity change of running `store` (with the shortlist head)."""
    if store.quality is None or (shortlist and "shortlist" not in store.quality):
        return None
    kl = store.quality["exact"].kl  # KLs along source -> store -> shortlist roughly add
    if shortlist:
        kl += store.quality["shortlist"].kl
    return math.expm1(kl)


def options(stores: list[Store], head: str, plan: Callable[[Store, str], Plan]
            ) -> list[Option]:
    """Every (store, output-layer plan) the budget admits, the asked store first; `head`:
    "auto" tries both, "exact"/"shortlist" only that. `plan(store, head)` plans or raises
    BudgetError."""
    found, refusals = [], []
    for store in stores:
        heads = ["exact", "shortlist"] if head == "auto" else [head]
        for h in heads:  # the asked store (first) says itself why it has no shortlist
            if h == "shortlist" and store.head_proxy is None and (
                    head == "auto" or store is not stores[0]):
                continue
            try:
                p = plan(store, h)
            except BudgetError as error:
                refusals.append(error)
                continue
            found.append(Option(store, p, read_nbytes(store, p),
                                expected_change(store, bool(p.shortlist))))
    if not found:
        if refusals:
            raise min(refusals, key=lambda e: e.smallest)
        raise FlashInferError("no store of this model can run with these settings")
    return found


def choose(found: list[Option], quality: str, asked: Store) -> Option:
    """The option `quality` picks (see the module docstring)."""
    if quality not in QUALITY_MODES:
        raise FlashInferError(f"unknown quality {quality!r} (use {', '.join(QUALITY_MODES)})")
    own = [o for o in found if o.store is asked]
    if quality == "exact":
        exact = [o for o in own if not o.plan.shortlist]
        if not exact:
            raise FlashInferError("--quality exact runs the asked store with every logit "
                                  "exact, which these settings do not allow (--head "
                                  "shortlist, or a budget too small for it)")
        return exact[0]
    weighed = [o for o in found if o.ppl_change is not None]
    if own and not any(o.store is asked for o in weighed):
        return min(own, key=lambda o: o.read_nbytes)  # unmeasured: nothing to weigh it with
    if not weighed:
        return min(found, key=lambda o: o.read_nbytes)
    if quality == "auto":
        within = [o for o in weighed if o.ppl_change <= AUTO_TOLERANCE]
        if not within:
            return min(weighed, key=lambda o: (o.ppl_change, o.read_nbytes))
        weighed = within
    least = min(o.read_nbytes for o in weighed)
    fast = [o for o in weighed
            if o.read_nbytes <= least * (1 + SAME_READ_FRACTION) + SAME_READ_BYTES]
    return min(fast, key=lambda o: (o.ppl_change, o.read_nbytes))


def describe(chosen: Option, found: list[Option], quality: str) -> str:
    """The choice and the options it was made among, for the plan's printout."""
    rule = {"exact": "the asked store, every logit exact",
            "auto": f"least read within {AUTO_TOLERANCE:+.0%} perplexity of the source "
                    "(measured at convert)",
            "fastest": "least read"}[quality]
    lines = [f"quality {quality} ({rule}): {chosen.describe()}"]
    lines += [f"  also possible: {o.describe()}" for o in found if o is not chosen]
    return "\n".join(lines)
