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
tensors fails there, not here): each type with llama.cpp's own mixture rules (the embedding
type they pick), and "pure" variants where every tensor has the type. Sizes count every
weight byte: for GGUF files the tensor data (the file minus its metadata and vocabulary), for
our stores the tensor records (scales, tables, the embedding; not the optional output-layer
proxy or sparsity record, which fit budgets and are reported separately by bench_peers).
Writes a markdown table and JSON (with the machine, tools/machine.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine import describe_machine, machine_summary

ROOT = Path(__file__).resolve().parents[1]
EVAL_DIR = ROOT / "data" / "eval"
LADDER_DIR = ROOT / "models" / "ladder"
CTX = 512
DEFAULT_OURS = ["int8", "int4", "pal4", "pal3", "pal2", "pal4,embed=int4", "pal3,embed=int4"]
# llama.cpp's types with their own mixture rules and, with "pure-", everything in one type
DEFAULT_LLAMA = ["q8_0", "q5_0", "q4_1", "q4_0", "iq4_nl", "q3_k_m", "q2_k", "pure-q4_0",
                 "pure-iq4_nl", "pure-q2_0"]


def eval_text() -> str:
    files = sorted(p for p in EVAL_DIR.glob("*.txt"))
    return "\n\n".join(p.read_text(encoding="utf-8") for p in files)


def quantize(source: Path, name: str, threads: int) -> Path | str:
    """llama.cpp's quantizer on `source`: the output path, or why it failed."""
    pure = name.startswith("pure-")
    ftype = name.removeprefix("pure-").upper()
    target = LADDER_DIR / f"{source.stem}.{name}.gguf"
    if target.exists():
        return target
    LADDER_DIR.mkdir(parents=True, exist_ok=True)
    script = (
        "import sys, llama_cpp as l\n"
        "p = l.llama_model_quantize_default_params()\n"
        f"p.ftype = l.LLAMA_FTYPE_MOSTLY_{ftype}\n"
        f"p.allow_requantize = True\np.pure = {pure}\np.nthread = {threads}\n"
        "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n")
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
    """Bytes of tensor data in a GGUF, and bytes by ggml type."""
    from gguf import GGUFReader

    by_type: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return sum(by_type.values()), by_type


class LlamaSystem:
    def __init__(self, path: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(str(path), n_ctx=CTX, n_batch=CTX, logits_all=True, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], np.float32)


class OurSystem:
    def __init__(self, model):
        self.model = model

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
    reference = fi.load(source, backend="numpy", threads=args.threads)
    systems: dict[str, object] = {}
    info: dict[str, dict] = {}
    for name in args.ours:
        store_path = ensure_store(source, name, progress=True)
        store = open_store(store_path)
        nbytes = sum(e.nbytes for e in store.tensors.values())
        by_codec: dict[str, int] = {}
        for e in store.tensors.values():
            by_codec[e.codec] = by_codec.get(e.codec, 0) + e.nbytes
        systems[f"ours {name}"] = OurSystem(fi.load(store_path, head="exact",
                                                    threads=args.threads))
        info[f"ours {name}"] = {"weight_bytes": nbytes, "by_codec": by_codec}
    for name in args.llama:
        path = quantize(source, name, args.threads)
        if isinstance(path, str):
            info[f"llama.cpp {name}"] = {"error": path}
            print(f"llama.cpp {name}: {path}", file=sys.stderr)
            continue
        nbytes, by_type = gguf_tensor_bytes(path)
        systems[f"llama.cpp {name}"] = LlamaSystem(path, args.threads)
        info[f"llama.cpp {name}"] = {"weight_bytes": nbytes, "by_type": by_type,
                                     "file_bytes": path.stat().st_size}
    src_bytes, src_types = gguf_tensor_bytes(source)
    systems["llama.cpp source"] = LlamaSystem(source, args.threads)
    info["llama.cpp source"] = {"weight_bytes": src_bytes, "by_type": src_types,
                                "file_bytes": source.stat().st_size}

    ids = reference.tokenize(eval_text(), add_special=False)[:args.tokens]
    bos = reference.tokenizer.bos_id
    step = CTX - 1
    chunks = [[bos] + ids[i:i + step] for i in range(0, len(ids) - step + 1, step)]
    first = CTX // 2
    scores = {name: Score() for name in ["source (numpy)", *systems]}
    from tqdm import tqdm

    for chunk in tqdm(chunks, desc="chunks", unit="chunk"):
        targets = np.array(chunk[first + 1:])
        start = time.perf_counter()
        ref_logp = log_softmax(reference.logits(chunk)[first:-1].astype(np.float64))
        scores["source (numpy)"].seconds += time.perf_counter() - start
        scores["source (numpy)"].add(ref_logp, ref_logp, targets)
        for name, system in systems.items():
            start = time.perf_counter()
            logits = system.logits(chunk)[first:-1]
            scores[name].seconds += time.perf_counter() - start
            scores[name].add(log_softmax(logits.astype(np.float64)), ref_logp, targets)

    parameters = _parameters(reference.config)
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
