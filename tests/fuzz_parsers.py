"""Mutation fuzzers for every parser of untrusted input; only the project's errors may escape.

Targets: the GGUF header and metadata (with the model config, tensor records and vocabulary
checks behind it), a flash store's manifest, a safetensors header, a Hugging Face
config.json, and the tokenizer data handed to llama.cpp: every vocabulary our checks accept
is then loaded by llama.cpp (vocabulary only, plus a tokenization) in a child process that
must never die. Mutations are seeded, so a run is reproducible from (target, seed, cases).

    python tests/fuzz_parsers.py --cases 20000 --seed 7      # a longer local run
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from flashinfer_ondevice.errors import FlashInferError  # noqa: E402

INTERESTING = [0, 1, 2, 3, 7, 8, 255, 256, 4095, 4096, 65535, 65536, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


@dataclass
class Report:
    target: str
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)  # "accepted" or the error class
    escaped: list[str] = field(default_factory=list)  # findings: what escaped, and from what

    def line(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return f"{self.target}: {self.cases} cases: {parts}; escaped {len(self.escaped)}"


def _mutate_bytes(data: bytes, rng: random.Random, region: int) -> bytes:
    """One to four byte-level edits inside the first `region` bytes."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        end = min(region, len(out))
        if end < 9:
            break
        pos = rng.randrange(end - 8)
        action = rng.randrange(6)
        if action == 0:
            out[pos] ^= 1 << rng.randrange(8)
        elif action == 1:
            out[pos] = rng.randrange(256)
        elif action in (2, 3):
            fmt, bits = ("<Q", 64) if action == 2 else ("<I", 32)
            struct.pack_into(fmt, out, pos, rng.choice(INTERESTING) % (1 << bits))
        elif action == 4:
            del out[rng.randrange(pos, len(out)):]
        else:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(out)


def _random_value(rng: random.Random, depth: int = 0):
    choice = rng.randrange(12)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice(INTERESTING) * rng.choice([1, -1])
    if choice == 3:
        return rng.choice([0.0, -0.0, 1e-300, 1e300, float("nan"), float("inf"),
                           -float("inf"), 0.5, -1.5])
    if choice == 4:
        return rng.choice(["", "x", "\x1b[31m", "../../etc/passwd", "/etc/passwd", "int8",
                           "f32", "weights.bin", "manifest.json", "a" * 300])
    if choice == 5 and depth < 3:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if choice == 6 and depth < 3:
        return {str(_random_value(rng, 3)): _random_value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    if choice == 7:
        return [[[[]]]]
    return rng.randint(-10, 5000)


def _mutate_json(value, rng: random.Random):
    """A deep copy of `value` with one to three leaves or entries replaced or removed."""
    value = json.loads(json.dumps(value))
    for _ in range(rng.randint(1, 3)):
        node, path = value, []
        while isinstance(node, dict | list) and node and rng.random() < 0.8:
            key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
            path.append((node, key))
            node = node[key]
        if not path:
            return _random_value(rng)
        parent, key = path[-1]
        if isinstance(parent, dict) and rng.random() < 0.2:
            del parent[key]
        else:
            parent[key] = _random_value(rng)
    return value


def _run(report: Report, label: str, action: Callable[[], object]) -> bool:
    """Run one case; True if the input was accepted."""
    report.cases += 1
    try:
        action()
    except FlashInferError as exc:
        report.outcomes[type(exc).__name__] += 1
        return False
    except Exception as exc:  # noqa: BLE001 - the finding: anything but our errors
        report.outcomes["escaped"] += 1
        report.escaped.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
        return False
    report.outcomes["accepted"] += 1
    return True


# --- targets ------------------------------------------------------------------------------

def fuzz_gguf(base: Path, work: Path, cases: int, seed: int, region: int = 65536) -> Report:
    from flashinfer_ondevice.loader.gguf_file import check_tensor, read_config
    from flashinfer_ondevice.loader.gguf_header import read_header
    from flashinfer_ondevice.loader.gguf_vocab import check_vocabulary
    from flashinfer_ondevice.schema import expected_shapes

    def parse(path: Path) -> None:
        header = read_header(path)
        config = read_config(header)
        for name, shape in expected_shapes(config).items():
            record = header.tensors.get(name)
            if record is not None:
                check_tensor(record, shape, header.file_size)
        check_vocabulary(header)

    data, rng, report = base.read_bytes(), random.Random(seed), Report("gguf")
    target = work / "fuzz.gguf"
    for i in range(cases):
        target.write_bytes(_mutate_bytes(data, rng, region))
        _run(report, f"gguf seed {seed} case {i}", lambda: parse(target))
    return report


def fuzz_manifest(store: Path, work: Path, cases: int, seed: int) -> Report:
    from flashinfer_ondevice.store.reader import open_store

    copy = work / "fuzz-store"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(store, copy)
    text = (store / "manifest.json").read_text()
    manifest, rng, report = json.loads(text), random.Random(seed), Report("manifest")
    for i in range(cases):
        if rng.random() < 0.7:
            mutated = json.dumps(_mutate_json(manifest, rng)).encode()
        else:
            mutated = _mutate_bytes(text.encode(), rng, len(text))
        (copy / "manifest.json").write_bytes(mutated)
        _run(report, f"manifest seed {seed} case {i}", lambda: open_store(copy))
    return report


def fuzz_safetensors(folder: Path, work: Path, cases: int, seed: int) -> Report:
    from flashinfer_ondevice.loader.safetensors_file import SafetensorsFile

    raw = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack_from("<Q", raw, 0)
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    rng, report = random.Random(seed), Report("safetensors")
    target = work / "fuzz.safetensors"

    def parse() -> None:
        st = SafetensorsFile(target)
        for name in list(st.entries)[:4]:
            st.read(name)

    for i in range(cases):
        if rng.random() < 0.7:
            text = json.dumps(_mutate_json(header, rng)).encode()
            target.write_bytes(struct.pack("<Q", len(text)) + text + data)
        else:
            target.write_bytes(_mutate_bytes(raw, rng, 8 + n))
        _run(report, f"safetensors seed {seed} case {i}", parse)
    return report


def fuzz_config_json(folder: Path, cases: int, seed: int) -> Report:
    from flashinfer_ondevice.loader.hf import _config_from_hf

    config = json.loads((folder / "config.json").read_text())
    rng, report = random.Random(seed), Report("config.json")
    for i in range(cases):
        mutated = _mutate_json(config, rng)

        def parse(mutated=mutated) -> None:
            if not isinstance(mutated, dict):  # read_json refuses non-objects first
                raise FlashInferError("not an object")
            _config_from_hf(mutated)
        _run(report, f"config.json seed {seed} case {i}", parse)
    return report


_LLAMA_CHILD = """
import ctypes, sys
import llama_cpp
sink = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(lambda *a: None)
llama_cpp.llama_log_set(sink, None)
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_default_params()
params.vocab_only = True
buffer = (llama_cpp.llama_token * 256)()
text = "Hello, world: 1234 \\u00e9\\u65e5\\u672c abc <s> </s>".encode()
piece = ctypes.create_string_buffer(256)
for line in sys.stdin:
    model = llama_cpp.llama_model_load_from_file(line.strip().encode(), params)
    if model:
        vocab = llama_cpp.llama_model_get_vocab(model)
        n = llama_cpp.llama_tokenize(vocab, text, len(text), buffer, 256, True, True)
        for i in range(max(n, 0)):
            llama_cpp.llama_token_to_piece(vocab, buffer[i], piece, 256, 0, True)
        llama_cpp.llama_model_free(model)
    print("done", flush=True)
"""


def _vocab_mutation(meta: dict, rng: random.Random) -> None:
    """Edit one tokenizer field of `meta` (hostile_corpus.base_metadata's form)."""
    from gguf import GGUFValueType as T

    tokens = list(meta.get("tokenizer.ggml.tokens", ([],))[0]) or ["a"]
    key = rng.choice(["tokens", "tokens", "scores", "types", "model", "special", "merges",
                      "drop"])
    if key == "tokens":
        i, j = rng.randrange(len(tokens)), rng.randrange(len(tokens))
        tokens[i] = rng.choice([tokens[j], "", "\x00", "<0x" + rng.choice(["GG", "1", "FFF"])
                                + ">", "\u2581" * rng.randint(1, 3), "x" * 1000, "<s>",
                                "\ud800".encode("utf-8", "surrogatepass").decode("latin-1")])
        if rng.random() < 0.3:
            tokens = tokens[:rng.randrange(len(tokens))]
        meta["tokenizer.ggml.tokens"] = (tokens, T.ARRAY, T.STRING)
    elif key == "scores":
        n = rng.choice([len(tokens), len(tokens) - 1, 0, 3])
        meta["tokenizer.ggml.scores"] = ([rng.choice([0.0, -1e30, 1e30, float("nan")])
                                          for _ in range(n)] or [0.0], T.ARRAY, T.FLOAT32)
    elif key == "types":
        n = rng.choice([len(tokens), len(tokens) - 1, 5])
        meta["tokenizer.ggml.token_type"] = ([rng.choice([0, 1, 2, 3, 4, 5, 6, 7, -1])
                                              for _ in range(n)], T.ARRAY, T.INT32)
    elif key == "model":
        meta["tokenizer.ggml.model"] = (rng.choice(["gpt2", "llama", "bert", "t5", "ugm",
                                                    "rwkv", "none", ""]), T.STRING)
    elif key == "special":
        name = rng.choice(["bos", "eos", "unknown", "padding", "seperator", "eot", "eom",
                           "mask", "fim_pre"])
        meta[f"tokenizer.ggml.{name}_token_id"] = (rng.choice([0, 1, 2, 308, 309, 2**31,
                                                               2**32 - 1]), T.UINT32)
    elif key == "merges":
        pieces = tokens[259:] or ["a", "b"]
        merges = [f"{rng.choice(pieces)} {rng.choice(pieces)}" for _ in range(20)]
        if rng.random() < 0.3:
            merges.append(rng.choice(["", " ", "ab", " a", "a "]))
        meta["tokenizer.ggml.merges"] = (merges, T.ARRAY, T.STRING)
        if rng.random() < 0.5:
            meta["tokenizer.ggml.model"] = ("gpt2", T.STRING)
    else:
        meta.pop(rng.choice([k for k in meta if k.startswith("tokenizer.")]))


def fuzz_vocabulary(work: Path, cases: int, seed: int) -> Report:
    """Mutated vocabularies: our check must refuse each, or llama.cpp must load it without
    dying (all accepted files go through one child, restarted after any death)."""
    from hostile_corpus import base_metadata, write_gguf
    from tiny_models import random_weights

    from flashinfer_ondevice.loader.gguf_header import read_header
    from flashinfer_ondevice.loader.gguf_vocab import check_vocabulary

    rng, report = random.Random(seed), Report("vocabulary")
    weights = {"token_embd.weight": random_weights("gemma3")["token_embd.weight"][:8]}
    accepted: list[Path] = []
    for i in range(cases):
        meta = base_metadata()
        for _ in range(rng.randint(1, 3)):
            _vocab_mutation(meta, rng)
        path = work / f"vocab-{i}.gguf"
        try:
            write_gguf(path, meta, weights)
        except Exception:  # noqa: BLE001 - gguf's writer refused the mutation: not a case
            continue
        if _run(report, f"vocabulary seed {seed} case {i}",
                lambda path=path: check_vocabulary(read_header(path))):
            accepted.append(path)
        else:
            path.unlink()
    for path in _llama_deaths(accepted):
        report.outcomes["llama.cpp died"] += 1
        report.escaped.append(f"llama.cpp died loading {path.name} (seed {seed})")
    return report


def _llama_deaths(paths: list[Path]) -> list[Path]:
    """The files among `paths` whose vocabulary kills llama.cpp."""
    deaths, start = [], 0
    while start < len(paths):
        child = subprocess.run([sys.executable, "-c", _LLAMA_CHILD],
                               input="\n".join(str(p) for p in paths[start:]) + "\n",
                               capture_output=True, text=True, timeout=600)
        done = child.stdout.count("done")
        if child.returncode == 0:
            break
        deaths.append(paths[start + done])
        start += done + 1
    return deaths


def run_all(cases: int, seed: int, work: Path, progress: bool = False) -> list[Report]:
    from hostile_corpus import make_bases

    bases = make_bases(work / "bases")
    reports = [fuzz_gguf(bases.gguf, work, cases, seed),
               fuzz_manifest(bases.store, work, cases, seed),
               fuzz_safetensors(bases.hf, work, cases, seed),
               fuzz_config_json(bases.hf, cases, seed),
               fuzz_vocabulary(work, cases, seed)]
    if progress:
        for report in reports:
            print(report.line())
            for finding in report.escaped[:20]:
                print("  ", finding)
    return reports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000, help="cases per target")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the reports here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        reports = run_all(args.cases, args.seed, Path(work), progress=True)
    if args.json is not None:
        args.json.write_text(json.dumps([{"target": r.target, "cases": r.cases,
                                          "outcomes": dict(r.outcomes), "escaped": r.escaped}
                                         for r in reports], indent=1))
    return 1 if any(r.escaped for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
