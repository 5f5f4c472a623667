"""Quality per byte: our codecs against llama.cpp's own quantization ladder, on held-out text.

    python tools/bench_codecs.py [-m MODEL.gguf] [--ours int8 int4 pal4 pal4,embed=int4 ...]
                                 [--llama q8_0 q5_0 ...] [--tokens 20480] [-t 2]
                                 [--out bench-results/codecs]

Protocol (llama.cpp's perplexity tool): the held-out text (data/eval/*.txt, see its NOTICE)
in non-overlapping 512-token chunks, each starting with BOS; the second half of each chunk is
scored. Every system sees the same token ids (the source GGUF's tokenizer). The reference
is the dequantized source itself (our float32 numpy engine on the GGUF), for us and for
llama.cpp alike: per scored position, KL(source || system) and whether the top-1 tokens agree,
plus each system's perplexity.

The ladder is made by llama.cpp's own quantizer from the shipped file (requantized,
`allow_requantize`), one child process per type (a type that cannot quantize these 640-wide
tensors fails there, not here): each type with llama.cpp's own mixture rules (they keep the
embedding in Q8_0), "pure" variants where every tensor has the type, and mixtures with the
embedding's type overridden. Sizes count every
weight byte: for GGUF files the tensor data (the file minus its metadata and vocabulary), for
our stores the tensor records (scales, tables, the embedding; not the optional output-layer
proxy or sparsity record, which fit budgets and are reported separately by bench_peers).
Writes a markdown table and JSON (with the machine, tools/machine.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from machine import describe_machine, machine_summary

ROOT = Path(__file__).resolve().parents[1]
EVAL_DIR = ROOT / "data" / "eval"
LADDER_DIR = ROOT / "models" / "ladder"
CTX = 512
DEFAULT_OURS = ["int8", "int4", "pal4", "pal3", "pal2", "pal4,embed=int4", "pal3,embed=int4"]
# llama.cpp's types with their own mixture rules, with "pure-" everything in one type, with
# ":emb=TYPE" the token embedding (tied: also the output layer) overridden
DEFAULT_LLAMA = ["q5_0", "q4_0", "iq4_nl", "q3_k_m", "q2_k", "pure-q4_0", "pure-iq4_nl",
                 "pure-q2_0", "q3_k_m:emb=iq4_nl", "q2_k:emb=q4_0", "q2_k:emb=q2_0"]


def eval_text() -> str:
    files = sorted(p for p in EVAL_DIR.glob("*.txt"))
    return "\n\n".join(p.read_text(encoding="utf-8") for p in files)


def quantize(source: Path, name: str, threads: int) -> Path | str:
    """llama.cpp's quantizer on `source`: the output path, or why it failed."""
    pure = name.startswith("pure-")
    ftype, _, embed_type = name.removeprefix("pure-").upper().partition(":EMB=")
    target = LADDER_DIR / f"{source.stem}.{name.replace(':emb=', '+emb-')}.gguf"
    if target.exists():
        return target
    LADDER_DIR.mkdir(parents=True, exist_ok=True)
    script = (
        "import sys, llama_cpp as l\n"
        "p = l.llama_model_quantize_default_params()\n"
        f"p.ftype = l.LLAMA_FTYPE_MOSTLY_{ftype}\n"
        f"p.allow_requantize = True\np.pure = {pure}\np.nthread = {threads}\n"
        + (f"p.token_embedding_type = l.GGML_TYPE_{embed_type}\n" if embed_type else "")
        + "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n")
    partial = target.with_suffix(".partial")
    child = subprocess.run([sys.executable, "-c", script, str(source), str(partial)],
                           capture_output=True, text=True)
    if child.returncode != 0 or not partial.exists():
        partial.unlink(missing_ok=True)
        tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
        return f"quantize failed (exit {child.returncode}): {tail[:160]}"
    partial.rename(target)
    return target


def gguf_tensor_bytes(path: Path) -> tuple[int, dict[str, int]]:
    """Bytes of tensor data in a GGUF (each tensor up to the next one's start, so alignment
    padding counts), and bytes by ggml type (names from this llama.cpp, which knows types
    newer than gguf-py's)."""
    import llama_cpp

    from flashinfer_ondevice.loader.gguf_header import read_header

    names = {getattr(llama_cpp, n): n.removeprefix("GGML_TYPE_") for n in dir(llama_cpp)
             if n.startswith("GGML_TYPE_") and n != "GGML_TYPE_COUNT"}
    header = read_header(path)
    records = sorted(header.tensors.values(), key=lambda t: t.offset)
    ends = [t.offset for t in records[1:]] + [header.file_size]
    by_type: dict[str, int] = {}
    for record, end in zip(records, ends, strict=True):
        kind = names.get(record.ggml_type, str(record.ggml_type))
        by_type[kind] = by_type.get(kind, 0) + end - record.offset
    return sum(by_type.values()), by_type


class LlamaSystem:
    def __init__(self, path: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(str(path), n_ctx=CTX, n_batch=CTX, logits_all=True, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def close(self) -> None:
        self.llm.close()

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], np.float32)


class OurSystem:
    def __init__(self, model):
        self.model = model

    def close(self) -> None:
        self.model.close()

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.model.logits(ids)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class Score:
    """Running perplexity, KL(reference || system) and top-1 agreement."""

    def __init__(self) -> None:
        self.nll, self.kl, self.agree, self.n, self.seconds = 0.0, 0.0, 0, 0, 0.0

    def add(self, logp: np.ndarray, ref_logp: np.ndarray, targets: np.ndarray) -> None:
        self.nll -= float(logp[np.arange(len(targets)), targets].sum())
        self.kl += float((np.exp(ref_logp) * (ref_logp - logp)).sum())
        self.agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        self.n += len(targets)

    def result(self) -> dict:
        return {"perplexity": float(np.exp(self.nll / self.n)), "mean_kl": self.kl / self.n,
                "top1_agreement": self.agree / self.n, "tokens_scored": self.n,
                "eval_seconds": self.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", default=None, help="source GGUF (default model)")
    parser.add_argument("--ours", nargs="*", default=DEFAULT_OURS,
                        help="our codec specs (see run-model convert --codec)")
    parser.add_argument("--llama", nargs="*", default=DEFAULT_LLAMA, help="llama.cpp types")
    parser.add_argument("--tokens", type=int, default=20480, help="held-out tokens evaluated")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "codecs"))
    args = parser.parse_args()

    import flashinfer_ondevice as fi
    from flashinfer_ondevice.api import ensure_store
    from flashinfer_ondevice.default_model import default_model_path
    from flashinfer_ondevice.store.reader import open_store

    source = Path(args.model) if args.model else default_model_path(progress=True)
    reference = fi.load(source, backend="reference", threads=args.threads)
    systems: dict[str, Callable[[], object]] = {}  # loaded one at a time (memory)
    info: dict[str, dict] = {}
    for name in args.ours:
        store_path = ensure_store(source, name, progress=True)
        store = open_store(store_path)
        by_codec: dict[str, int] = {}
        for e in store.tensors.values():
            by_codec[e.codec] = by_codec.get(e.codec, 0) + e.nbytes
        systems[f"ours {name}"] = functools.partial(
            lambda p: OurSystem(fi.load(p, head="exact", threads=args.threads)), store_path)
        info[f"ours {name}"] = {"weight_bytes": sum(by_codec.values()), "by_codec": by_codec}
    for name in args.llama:
        path = quantize(source, name, args.threads)
        if isinstance(path, str):
            info[f"llama.cpp {name}"] = {"error": path}
            print(f"llama.cpp {name}: {path}", file=sys.stderr)
            continue
        nbytes, by_type = gguf_tensor_bytes(path)
        systems[f"llama.cpp {name}"] = functools.partial(LlamaSystem, path, args.threads)
        info[f"llama.cpp {name}"] = {"weight_bytes": nbytes, "by_type": by_type,
                                     "file_bytes": path.stat().st_size}
    src_bytes, src_types = gguf_tensor_bytes(source)
    systems["llama.cpp source"] = functools.partial(LlamaSystem, source, args.threads)
    info["llama.cpp source"] = {"weight_bytes": src_bytes, "by_type": src_types,
                                "file_bytes": source.stat().st_size}

    ids = reference.tokenize(eval_text(), add_special=False)[:args.tokens]
    bos = reference.tokenizer.bos_id
    step = CTX - 1
    chunks = [[bos] + ids[i:i + step] for i in range(0, len(ids) - step + 1, step)]
    first = CTX // 2
    scores = {name: Score() for name in ["source (numpy)", *systems]}
    from tqdm import tqdm

    # the reference's log-probabilities once, on disk (chunks x 255 x vocab float32); then
    # each system alone in memory, over every chunk
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(args.out).parent) as tmp:
        ref_all = np.lib.format.open_memmap(
            Path(tmp) / "reference.npy", "w+", np.float32,
            (len(chunks), CTX - 1 - first, reference.config.vocab_size))
        for c, chunk in enumerate(tqdm(chunks, desc="source (numpy)", unit="chunk")):
            start = time.perf_counter()
            ref_all[c] = log_softmax(reference.logits(chunk)[first:-1].astype(np.float64))
            scores["source (numpy)"].seconds += time.perf_counter() - start
        config = reference.config
        reference.close()
        del reference  # its float32 weights
        for name, make in systems.items():
            system = make()
            for c, chunk in enumerate(tqdm(chunks, desc=name, unit="chunk")):
                targets = np.array(chunk[first + 1:])
                ref_logp = ref_all[c].astype(np.float64)
                start = time.perf_counter()
                logits = system.logits(chunk)[first:-1]
                scores[name].seconds += time.perf_counter() - start
                scores[name].add(log_softmax(logits.astype(np.float64)), ref_logp, targets)
            system.close()
            del system
            print(json.dumps({"system": name, **scores[name].result()}), file=sys.stderr,
                  flush=True)  # each system's figures as soon as they exist
        for c, chunk in enumerate(chunks):
            ref_logp = ref_all[c].astype(np.float64)
            scores["source (numpy)"].add(ref_logp, ref_logp, np.array(chunk[first + 1:]))
        del ref_all

    parameters = _parameters(config)
    rows = []
    for name, score in scores.items():
        entry = {"system": name, **score.result(), **info.get(name, {})}
        if "weight_bytes" in entry:
            entry["bits_per_weight"] = entry["weight_bytes"] * 8 / parameters
        rows.append(entry)
    for name, extra in info.items():
        if "error" in extra:
            rows.append({"system": name, **extra})
    result = {"machine": describe_machine(), "source": source.name, "parameters": parameters,
              "eval_files": sorted(p.name for p in EVAL_DIR.glob("*.txt")),
              "eval_tokens": len(chunks) * CTX, "chunks": len(chunks), "ctx": CTX,
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    table = render(result)
    out.with_suffix(".md").write_text(table)
    print(table)


def _parameters(config) -> int:
    h = config.hidden_size
    per_layer = (2 * h * config.n_heads * config.head_dim
                 + 2 * h * config.n_kv_heads * config.head_dim + 3 * h * config.ffn_size)
    embeddings = config.vocab_size * h * (1 if config.tie_embeddings else 2)
    return config.n_layers * per_layer + embeddings


def render(result: dict) -> str:
    ref = next(r for r in result["rows"] if r["system"] == "source (numpy)")
    lines = [f"Held-out text: {result['chunks']} chunks of {result['ctx']} tokens "
             f"({', '.join(result['eval_files'])}); {ref['tokens_scored']} positions scored. "
             f"Machine: {machine_summary(result['machine'])}.", "",
             "| system | weight MB | bits/weight | perplexity | vs source | mean KL | "
             "top-1 agreement |", "|---|---:|---:|---:|---:|---:|---:|"]
    measured = [r for r in result["rows"] if "perplexity" in r]
    for r in sorted(measured, key=lambda r: -r.get("weight_bytes", 1e18)):
        mb = f"{r['weight_bytes'] / 1e6:.1f}" if "weight_bytes" in r else "(float32)"
        bpw = f"{r['bits_per_weight']:.2f}" if "bits_per_weight" in r else "32"
        lines.append(f"| {r['system']} | {mb} | {bpw} | {r['perplexity']:.3f} | "
                     f"{(r['perplexity'] / ref['perplexity'] - 1) * 100:+.1f}% | "
                     f"{r['mean_kl']:.4f} | {r['top1_agreement'] * 100:.1f}% |")
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['system']} | - | - | {r['error']} | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
