"""The `run-model` command line: generate text with llama.cpp-style flags and run stats.

`run-model -p "..."` runs the default command, `generate`; later commands (convert, eval)
sit beside it. User errors print one line and exit 1; bad flags exit 2 with click's usage line.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from pathlib import Path

import click

from .errors import FlashInferError, os_error_line
from .values import MAX_SEED, printable

_MiB = 1024 * 1024
MAX_TEXT_CHARS = 64 << 20  # a prompt or evaluation text read from a file or stdin


class DefaultCommandGroup(click.Group):
    """A group whose first command runs when the arguments name no command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands:
            args = [next(iter(self.commands)), *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        """Run the command; every error is one line, escaped for the terminal: the user's
        (FlashInferError), the system's (OSError, memory) and ours (a bug: its traceback
        only with FLASHINFER_DEBUG=1). numpy's overflow warnings from damaged weights are
        not shown: the NaN-logit check says what happened."""
        warnings.filterwarnings("ignore", category=RuntimeWarning,
                                module=r"flashinfer_ondevice\.")
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except FlashInferError as exc:  # the user's input or files: the cause, escaped
            raise click.ClickException(printable(str(exc))) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
        except MemoryError:
            raise click.ClickException("out of memory (try a --memory-budget, a smaller "
                                       "-c/--ctx-size or a smaller model)") from None
        except OSError as exc:  # a name too long, a file where a folder should be, ...
            raise click.ClickException(printable(os_error_line(exc))) from None
        except Exception as exc:
            if os.environ.get("FLASHINFER_DEBUG"):
                raise
            raise click.ClickException(
                f"internal error: {type(exc).__name__}: {printable(str(exc))[:300]} (a bug: "
                "please report it; FLASHINFER_DEBUG=1 shows where)") from None


@click.group(cls=DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run LLMs larger than your DRAM (default command: generate)."""


def _read_prompt(prompt: str | None, file: str | None) -> str:
    if prompt is not None and file is not None:
        raise click.UsageError("give the prompt with -p or -f, not both")
    if file is not None:
        try:
            with open(file, encoding="utf-8") as f:
                return _bounded(f.read(MAX_TEXT_CHARS + 1), file)
        except (OSError, UnicodeDecodeError) as exc:
            raise FlashInferError(f"cannot read prompt file {file}: {exc}") from None
    if prompt == "-":
        try:
            if sys.stdin is None:
                raise OSError("standard input is closed")
            return _bounded(sys.stdin.read(MAX_TEXT_CHARS + 1), "standard input")
        except (OSError, UnicodeDecodeError) as exc:
            raise FlashInferError(f"cannot read the prompt from standard input: {exc}") from None
    if prompt is None:
        raise click.UsageError("no prompt: give one with -p TEXT, -p - (stdin) or -f FILE")
    return prompt


def _bounded(text: str, source: str) -> str:
    if len(text) > MAX_TEXT_CHARS:
        raise FlashInferError(f"the text from {source} is longer than {MAX_TEXT_CHARS:,} "
                              "characters (limit)")
    return text


def _finite(ctx, param, value: float | None) -> float | None:
    """Callback of float options: click's ranges let NaN and infinities through."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _stops(ctx, param, value: tuple[str, ...]) -> tuple[str, ...]:
    if any(not stop for stop in value):
        raise click.BadParameter("a stop string cannot be empty")
    return value


def _emit(text: str) -> None:
    """Write generated text to stdout. A reader that went away (`run-model ... | head`) ends
    the run quietly; a full disk or a closed file is one line."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as exc:
        with contextlib.suppress(OSError):  # so that Python's final flush stays quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(exc, BrokenPipeError):
            sys.exit(141)
        raise FlashInferError(f"cannot write the generated text: {exc.strerror}") from None


def _print_stats(model, first, last, seed: int) -> None:
    from .runtime.engine import process_baseline

    baseline = process_baseline()

    def line(label: str, value: str) -> None:
        click.echo(f"{label:<14}= {value}", err=True)

    line("load time", f"{model.load_seconds * 1000:9.2f} ms")
    prompt_ms = last.prompt_tokens / first.prompt_tps * 1000 if first.prompt_tps else 0.0
    line("prompt eval", f"{prompt_ms:9.2f} ms / {last.prompt_tokens:5d} tokens "
                        f"({first.prompt_tps:8.2f} tokens per second)")
    decoded = max(last.generation_tokens - 1, 0)
    gen_ms = decoded / last.generation_tps * 1000 if last.generation_tps else 0.0
    line("generation", f"{gen_ms:9.2f} ms / {decoded:5d} tokens "
                       f"({last.generation_tps:8.2f} tokens per second)")
    line("peak memory", f"{last.peak_memory / _MiB:9.1f} MiB (baseline {baseline / _MiB:.1f} "
                        f"MiB, above baseline {(last.peak_memory - baseline) / _MiB:.1f} MiB)")
    if model.reader is not None:
        n = max(last.generation_tokens + 1, 1)  # the prefill pass reads the weights too
        line("storage reads", f"{last.bytes_read / n / 1e6:9.1f} MB per token, "
                              f"{last.reads / n:.0f} reads per token, I/O wait "
                              f"{last.io_wait / n * 1000:.1f} ms per token")
    if last.kv_bytes_read:
        n = max(last.generation_tokens - 1, 1)  # decode steps (the first token is prefill's)
        line("KV spill", f"{last.kv_bytes_read / n / 1e6:9.1f} MB read back per token, "
                         f"wait {last.kv_wait / n * 1000:.1f} ms per token")
    if last.neurons_needed:
        n = max(last.generation_tokens + last.prompt_tokens - 1, 1)  # tokens through the FFNs
        line("FFN neurons", f"{last.neurons_needed / n:9.0f} needed per token (all layers), "
                            f"{last.neuron_hits / max(last.neurons_needed, 1):.1%} cached, "
                            f"{last.neurons_read / n:.0f} read; cache management "
                            f"{last.cache_time / n * 1000:.1f} ms per token")
    line("finish", f"{last.finish_reason} (seed {seed})")

def _codec_spec(ctx, param, value: str) -> str:
    from .quant.codecs import parse_codec_spec

    try:
        parse_codec_spec(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def candidates_option():
    """--candidates: the codecs a measured mix (--bits/--target-size) chooses from."""
    from .build.codec_choice import CANDIDATES

    return click.option("--candidates", default=None,
                        help="codecs --bits/--target-size choose from, comma-separated  "
                             f"[default: {','.join(CANDIDATES)}; adding pal4,pal3,pal2 "
                             "costs most of an hour on Gemma 3]")


def codec_option(help_text: str):
    """--codec: a codec from the registry, optionally per tensor group."""
    from .quant.codecs import CODECS, TENSOR_GROUPS

    return click.option("--codec", default="int8", show_default=True,
                        envvar="FLASHINFER_CODEC", callback=_codec_spec,
                        help=f"{help_text}: one of {', '.join(CODECS)}, optionally per "
                             f"tensor group ({', '.join(TENSOR_GROUPS)}), e.g. "
                             "pal4,embed=int4; the embedding may keep its N most probable "
                             "tokens in one codec and the rest in another, e.g. "
                             "bpal4,embed=bpal4@32768/bpal2 (or @12.5%/bpal2: a share of "
                             "the vocabulary)")


def backend_option(command):
    """--backend and --gpu-memory-budget, shared by generate, eval and profile (checked by
    load(), which names the choices)."""
    command = click.option(
        "--gpu-memory-budget", default=None, envvar="FLASHINFER_GPU_MEMORY_BUDGET",
        help="weights the mlx backend keeps in its device form: bytes, e.g. 2GB, or a "
        "percentage of the store; resident weights go there first, then to DRAM (up to "
        "--memory-budget), the rest streams  [default: all without --memory-budget, none "
        "with it]")(command)
    return click.option("--backend", default="cpu", show_default=True,
                        envvar="FLASHINFER_BACKEND",
                        help="where the arithmetic runs: cpu (numba kernels; resident "
                        "int8/int4 matrices in onnxruntime), numpy (plain numpy, the "
                        "reference) or mlx (Apple silicon / NVIDIA, where MLX is "
                        "installed)")(command)


def cache_type_option(command):
    """--cache-type, shared by generate and eval."""
    return click.option("--cache-type", type=click.Choice(["f16", "q8"]), default="f16",
                        show_default=True, envvar="FLASHINFER_CACHE_TYPE",
                        help="KV cache type: f16, or q8 (int8 with a scale per head per "
                        "token: half the memory of f16)")(command)


def sparsity_options(command):
    """--selector/--sparsity/--window and --head, shared by generate and eval."""
    command = click.option("--window", type=click.IntRange(1, 64), default=None,
                           help="tokens whose FFN neurons stay cached  [default: the "
                           "store's]")(command)
    command = click.option("--sparsity", type=click.FloatRange(0, 1), default=None,
                           callback=_finite,
                           help="target fraction of FFN neurons skipped, one the store was "
                           "calibrated for (0.05 0.1 0.2 0.3 0.5 0.7)  "
                           "[default: the store's]")(command)
    command = click.option("--head", type=click.Choice(["auto", "exact", "shortlist"]),
                           default="auto", show_default=True,
                           help="output-layer plan of a store: exact logits, or a shortlist "
                           "(a resident proxy scores every token, the best 1024 are computed "
                           "exactly); auto: shortlist when the output layer does not fit the "
                           "memory budget")(command)
    command = click.option(
        "--quality", type=click.Choice(["auto", "exact", "fastest"]), default="auto",
        show_default=True, help="under --memory-budget, choose among this model's stores "
        "(every codec converted so far): exact = the --codec store with exact logits; "
        "auto = the least read per token within +5% expected perplexity (measured at "
        "convert); fastest = the least read per token. Without a budget, exact also keeps "
        "float activations (auto lets the cpu backend multiply resident matrices with int8 "
        "activations, as llama.cpp does)")(command)
    return click.option("--selector", type=click.Choice(["gate", "predicted", "dense"]),
                        default=None, help="FFN neuron selector of a calibrated store  "
                        "[default: dense, unless the store's calibrated sparsity skips >= 25% "
                        "of the FFN's work (resident) or pages (under a budget)]")(command)


@main.command()
@click.option("-m", "--model", "model_path", type=click.Path(), envvar="FLASHINFER_MODEL",
              help="GGUF file or Hugging Face folder  [default: the embedded Gemma 3 270M]")
@click.option("-p", "--prompt", help="prompt text; '-' reads it from stdin")
@click.option("-f", "--file", "prompt_file", help="read the prompt from a file")
@click.option("-n", "--max-tokens", default=256, show_default=True,
              type=click.IntRange(min=1), help="tokens to generate at most")
@click.option("--temp", default=0.8, show_default=True, type=click.FloatRange(0, 1e4),
              callback=_finite, help="sampling temperature; 0 = greedy")
@click.option("--top-p", default=0.95, show_default=True,
              type=click.FloatRange(0, 1, min_open=True), callback=_finite,
              help="nucleus sampling mass")
@click.option("--top-k", default=40, show_default=True, type=click.IntRange(min=0),
              help="keep the k most likely tokens; 0 = all")
@click.option("--min-p", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              callback=_finite, help="drop tokens below min-p x the top probability")
@click.option("--repeat-penalty", default=1.0, show_default=True,
              type=click.FloatRange(0, 1e4, min_open=True), callback=_finite,
              help="penalty on the last 64 tokens; 1.0 = off")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None,
              help="random seed  [default: random, printed with the stats]")
@click.option("--stop", multiple=True, callback=_stops,
              help="stop when this text appears (repeatable)")
@click.option("-c", "--ctx-size", type=click.IntRange(min=1), default=None,
              envvar="FLASHINFER_CTX_SIZE", help="context size in tokens  [default: 4096 or "
              "the model's, if smaller]")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=os.cpu_count(),
              show_default=True, envvar="FLASHINFER_THREADS", help="CPU threads")
@click.option("--memory-budget", default=None, envvar="FLASHINFER_MEMORY_BUDGET",
              help="memory above the process's baseline: bytes, e.g. 120MB, 1.5GB, or a "
              "percentage of the store, e.g. 50%  [default: everything resident]")
@codec_option("codec of the flash store made on first use")
@click.option("--verify", is_flag=True, help="check the store's checksums before running")
@sparsity_options
@backend_option
@cache_type_option
@click.option("--system-prompt", default=None, help="system message for chat models")
@click.option("--no-chat-template", is_flag=True,
              help="send the prompt as raw text even if the model has a chat template")
def generate(model_path, prompt, prompt_file, max_tokens, temp, top_p, top_k, min_p,
             repeat_penalty, seed, stop, ctx_size, threads, memory_budget, codec, verify,
             selector, sparsity, window, head, quality, backend, gpu_memory_budget, cache_type,
             system_prompt, no_chat_template):
    """Generate text from a prompt, streaming it to stdout (stats go to stderr).

    The model runs from a flash store, converted into the models folder on first use."""
    try:
        if sys.stdout is None:
            raise FlashInferError("standard output is closed: nowhere to write the text")
        text = _read_prompt(prompt, prompt_file)
        if not text:
            raise FlashInferError("the prompt is empty")
        from .api import load

        model = load(model_path, memory_budget=memory_budget, ctx_size=ctx_size,
                     threads=threads, codec=codec, verify=verify, progress=sys.stderr.isatty(),
                     on_plan=lambda text: click.echo(text, err=True), selector=selector,
                     sparsity=sparsity, window=window, head=head, quality=quality,
                     backend=backend, cache_type=cache_type,
                     gpu_memory_budget=gpu_memory_budget)
        if model.chat_template and not no_chat_template:
            ids = model.chat_prompt_ids(text, system_prompt)
        else:
            ids = model.tokenize(text)
        seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        tty = sys.stdout.isatty()
        first = last = None
        for response in model.stream(ids, max_tokens=max_tokens, temperature=temp, top_p=top_p,
                                     top_k=top_k, min_p=min_p,
                                     repetition_penalty=repeat_penalty, seed=seed, stop=stop):
            first = first or response
            last = response
            # on a terminal, escape sequences a hostile vocabulary could emit are shown
            _emit(printable(response.text, keep="\n\t") if tty else response.text)
        _emit("\n")
        _print_stats(model, first, last, seed)
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(130)


def _choose_codecs(ctx, source: Path, bits: float | None, target_size: str | None,
                   candidates: str | None, progress: bool) -> tuple[str, dict]:
    """--bits / --target-size: the measured codec mix (build/codec_choice.py), printed."""
    from click.core import ParameterSource

    from .build.codec_choice import CANDIDATES
    from .build.convert import choose_spec
    from .runtime.planner import parse_budget

    if bits is not None and target_size is not None:
        raise click.UsageError("give --bits or --target-size, not both")
    if ctx.get_parameter_source("codec") is not ParameterSource.DEFAULT:
        raise click.UsageError("--bits/--target-size choose the codecs: leave out --codec")
    nbytes = None
    if target_size is not None:
        if target_size.strip().endswith("%"):
            raise click.UsageError("--target-size is a size (120MB), not a percentage")
        try:
            nbytes = parse_budget(target_size, 0)
        except FlashInferError as exc:
            raise click.BadParameter(str(exc), param_hint="--target-size") from None
    names = CANDIDATES if candidates is None else \
        tuple(name.strip() for name in candidates.split(",") if name.strip())
    spec, record = choose_spec(source, nbytes, bits, progress=progress, candidates=names)
    nbytes = record["target_matrix_bytes"]
    click.echo(f"measured loss (mean KL, nats per token) and size of each tensor group by "
               f"codec, on {record['tokens']} calibration tokens:", err=True)
    for group, row in record["measured"].items():
        cells = "  ".join(f"{name} {cell['kl']:.4f} {cell['bytes'] / 1e6:.1f}MB"
                          for name, cell in row.items())
        click.echo(f"  {group:5s} {cells}", err=True)
    click.echo(f"chosen for {nbytes / 1e6:.1f} MB of matrices: {spec}", err=True)
    return spec, record


@main.command()
@click.argument("source", type=click.Path())
@click.option("-o", "--output", type=click.Path(), default=None,
              help="store folder to write  [default: in the models folder]")
@codec_option("how weights are encoded")
@click.option("--calibrate", is_flag=True,
              help="also calibrate FFN activation sparsity (thresholds, predictors)")
@click.option("-f", "--file", "text_file", default=None,
              help="calibration text  [default: the packaged Python tutorial]")
@click.option("--calibration-tokens", type=click.IntRange(min=256), default=4096,
              show_default=True, help="tokens of calibration text to run")
@click.option("--bits", type=click.FloatRange(min=1.0, max=16.0), default=None,
              help="choose the codec of each tensor group by measured loss so that the "
                   "matrices average this many bits per weight (instead of --codec); a "
                   "tied embedding may be split by token into two codecs")
@click.option("--target-size", default=None,
              help="like --bits, with a size for the matrices: 120MB, 0.2GB, bytes")
@candidates_option()
def convert(source, output, codec, calibrate, text_file, calibration_tokens, bits,
            target_size, candidates):
    """Convert a GGUF file or Hugging Face folder into a flash store (a store: calibrate it)."""
    try:
        from .api import store_path_for
        from .build.calibrate import calibrate as calibrate_store
        from .build.convert import convert as convert_store
        from .store.reader import is_store

        source = Path(source)
        if not source.exists():
            raise FlashInferError(f"model not found: {source}")
        if text_file is not None and not calibrate:
            raise click.UsageError("-f/--file gives calibration text: add --calibrate")
        if candidates is not None and bits is None and target_size is None:
            raise click.UsageError("--candidates are for --bits/--target-size")
        text = _read_prompt(None, text_file) if text_file is not None else None
        progress = sys.stderr.isatty()
        if is_store(source):
            if not calibrate:
                raise FlashInferError(f"{source} is already a flash store (add --calibrate "
                                      "to calibrate it)")
            target = source
        else:
            choice = None
            if bits is not None or target_size is not None:
                if output and os.path.lexists(output):  # refused before the measuring
                    raise FlashInferError(f"{output} already exists; remove it or choose "
                                          "another -o")
                codec, choice = _choose_codecs(click.get_current_context(), source, bits,
                                               target_size, candidates, progress)
            target = Path(output) if output else store_path_for(source, codec)
            if choice is not None and not output and is_store(target):
                click.echo(f"the chosen codecs' store already exists: {target}", err=True)
            else:
                convert_store(source, target, codec, progress=progress,
                              codec_choice_record=choice)
        if calibrate:
            record = calibrate_store(target, text, calibration_tokens, progress=progress)
            kept = ", ".join(f"{t:.0%}: {k:.0%}" for t, k in
                             zip(record.targets, record.calibration["predicted_kept"], strict=True))
            click.echo(f"calibrated on {record.calibration['tokens']} tokens; the predicted "
                       f"selector keeps (target sparsity: neurons kept) {kept}", err=True)
            scored = "; ".join(
                f"{s['selector']} {s['sparsity']:.0%}: top-1 {s['top1']:.1%}, perplexity "
                f"{s['perplexity_change']:+.1%}{'' if s['meets_bar'] else ' (misses the bar)'}"
                for s in record.calibration["holdout"])
            d = record.defaults
            click.echo(f"on {record.calibration['holdout_tokens']} held-out tokens: {scored}\n"
                       f"defaults: {d['selector']} selector at {d['sparsity']:.0%} sparsity, "
                       f"window {d['window']}", err=True)
        click.echo(str(target))
    except KeyboardInterrupt:
        click.echo("\ninterrupted: nothing was written", err=True)
        sys.exit(130)


@main.command()
@click.option("-m", "--model", "model_path", type=click.Path(), envvar="FLASHINFER_MODEL",
              help="GGUF file or Hugging Face folder  [default: the embedded Gemma 3 270M]")
@click.option("--budgets", default="25%,50%,100%", show_default=True,
              help="comma-separated memory budgets above the baseline: percentages of the "
              "model file's bytes, sizes (64MB, 1.5GB), or none")
@click.option("--settings", "settings_text", default="default", show_default=True,
              help="default (run-model's own choices, and exact logits), all, or a list of: "
              "default, exact, shortlist, kv-q8, int4, int4fit (int4 fitted to calibration "
              "data), tiers (bpal4, with the 12.5% most probable tokens' embedding rows in "
              "bpal4 and the rest in bpal2; tied embeddings), sparse (FFN sparsity: a store "
              "calibrated with run-model convert --calibrate)")
@click.option("--quality-text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="held-out text for perplexity / top-1 / KL  [default: one shipped in the "
              "package, never the calibration text]")
@click.option("--quality-tokens", type=click.IntRange(min=16), default=1024,
              show_default=True, help="tokens of it scored per setting")
@click.option("--peer", type=click.Choice(["llama.cpp", "none"]), default="llama.cpp",
              show_default=True, help="run llama.cpp on the same GGUF under the same limits")
@click.option("--peer-model", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="another GGUF for llama.cpp to run (e.g. a smaller quantization that fits "
              "the budget); repeatable")
@click.option("-n", "--tokens", "n", type=click.IntRange(min=2), default=32,
              show_default=True, help="tokens decoded per run")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True,
              help="runs per cell (medians reported)")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=2, show_default=True,
              envvar="FLASHINFER_THREADS", help="CPU threads, the same for every system")
@click.option("--out", type=click.Path(file_okay=False), default="profile",
              show_default=True, help="folder for profile.json, profile.md and the cache")
@click.option("--plan-only", is_flag=True,
              help="print each cell's plan and predicted speed (from `run-model probe` and a "
              "measured compute rate) without running the cells")
@backend_option
def profile(model_path, budgets, settings_text, quality_text, quality_tokens, peer,
            peer_model, n, runs, threads, out, plan_only, backend, gpu_memory_budget):
    """Profile speed, memory and quality at each memory budget, beside llama.cpp."""
    try:
        import json

        from .api import ensure_store
        from .backends import make_backend
        from .default_model import default_model_path, models_dir
        from .loader.gguf_file import read_config
        from .loader.gguf_header import read_header
        from .profiler import limits, plots, probe, report, sweep
        from .runtime.engine import check_device_budget, process_baseline
        from .runtime.planner import parse_budget
        from .store.reader import open_store

        settings = sweep.parse_settings(settings_text)  # bad arguments fail before anything
        make_backend(backend)
        check_device_budget(backend, gpu_memory_budget)
        if gpu_memory_budget is not None:
            parse_budget(gpu_memory_budget, 1, "GPU memory budget")
        budget_list = [b.strip() for b in budgets.split(",") if b.strip()]
        if not budget_list:
            raise FlashInferError("--budgets names no budget")
        for budget in budget_list:
            sweep.budget_bytes(budget, 1)
        progress = sys.stderr.isatty()
        source = Path(model_path) if model_path else default_model_path(progress=progress)
        peers = [Path(p) for p in peer_model]
        if peer == "llama.cpp" and source.suffix == ".gguf":
            peers.insert(0, source)
        for gguf in peers:  # llama.cpp only ever sees files our reader accepted
            read_config(read_header(gguf))
        # stores are converted here, not inside a cell's memory limit; a setting this model's
        # convert refuses (tiers of an untied embedding) is skipped, with its reason
        for setting in list(settings):
            try:
                ensure_store(source, sweep.SETTINGS[setting].get("codec", "int8"), progress)
            except FlashInferError as error:
                if len(settings) == 1:
                    raise
                click.echo(f"setting {setting} skipped: {error}", err=True)
                settings.remove(setting)
        reference = ensure_store(source, "int8", progress)
        ctx = min(sweep.CTX, open_store(reference).config.context_length)
        prompt_tokens = min(sweep.PROMPT_TOKENS, ctx - n - 1)
        if prompt_tokens < 1:
            raise FlashInferError(f"-n {n} does not fit the model's {ctx}-token context")
        options = sweep.SweepOptions(
            model=source, budgets=budget_list, settings=settings, peers=peers,
            quality_text=Path(quality_text) if quality_text else None,
            quality_tokens=quality_tokens, n=n, prompt_tokens=prompt_tokens, runs=runs,
            threads=threads, ctx=ctx, out=Path(out), backend=backend,
            gpu_memory_budget=gpu_memory_budget)
        storage = probe.cached_probe(reference / "weights.bin", models_dir())
        if plan_only:
            planned = sweep.plan_only(options, storage, progress)
            (options.out / "plan.json").write_text(json.dumps(planned, indent=1))
            click.echo(report.plan_table(planned))
            return
        enforcement = limits.detect()
        result = sweep.sweep(options, enforcement, process_baseline(), reference, progress,
                             storage)
        report.validate(result)
        (options.out / "profile.json").write_text(json.dumps(result, indent=1))
        (options.out / "profile.md").write_text(report.markdown(result))
        click.echo(report.terminal(result))
        written = [options.out / "profile.json", options.out / "profile.md"]
        if plots.available():
            written += plots.write(result, options.out)
        else:
            click.echo(plots.INSTALL_HINT, err=True)
        click.echo(f"written: {', '.join(str(p) for p in written)}", err=True)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: no report written (quality measured so far is cached in "
                   f"{out})", err=True)
        sys.exit(130)


@main.command(name="probe")
@click.option("-m", "--model", "model_path", type=click.Path(), envvar="FLASHINFER_MODEL",
              help="a model whose store's disk to probe  [default: the embedded Gemma 3 270M]")
@click.option("--fresh", is_flag=True, help="probe again instead of reading the cache")
def probe_command(model_path, fresh):
    """Measure the store's disk: direct-read bandwidth by chunk size and queue depth, and
    random 4 KiB reads per second (cached per device, used by profile --plan-only)."""
    from .api import ensure_store
    from .default_model import default_model_path, models_dir
    from .profiler import probe

    progress = sys.stderr.isatty()
    source = Path(model_path) if model_path else default_model_path(progress=progress)
    store = ensure_store(source, "int8", progress)
    result = probe.cached_probe(store / "weights.bin", models_dir(), fresh)
    how = "direct I/O" if result["direct"] else "page cache: no O_DIRECT here"
    click.echo(f"device {result['device']} ({how})")
    for key, rate in result["bandwidth"].items():
        chunk, depth = key.split("@")
        click.echo(f"  {chunk:>6} reads, {depth:>2} in flight: {rate / 1e9:6.2f} GB/s")
    click.echo(f"  random 4 KiB reads: {result['iops_4k']:,.0f} per second")


@main.command(name="eval")
@click.option("-m", "--model", "model_path", type=click.Path(), envvar="FLASHINFER_MODEL",
              help="GGUF file, folder or flash store  [default: the embedded Gemma 3 270M]")
@click.option("-f", "--file", "text_file", required=True, help="text to score")
@click.option("--compare-dense", is_flag=True,
              help="also run the dense model: top-1 agreement and mean KL divergence")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("-c", "--ctx-size", type=click.IntRange(min=3), default=None,
              help="tokens per scored chunk (each a fresh context)  [default: 512, or the "
              "model's context if smaller]")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="score at most this many tokens")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=os.cpu_count(),
              show_default=True, envvar="FLASHINFER_THREADS", help="CPU threads")
@click.option("--memory-budget", default=None, envvar="FLASHINFER_MEMORY_BUDGET",
              help="memory above the process's baseline (as for generate)")
@codec_option("codec of the flash store made on first use")
@sparsity_options
@backend_option
@cache_type_option
def eval_command(model_path, text_file, compare_dense, as_json, ctx_size, max_tokens, threads,
                 memory_budget, codec, selector, sparsity, window, head, quality, backend,
                 gpu_memory_budget, cache_type):
    """Score a text: perplexity (and, with --compare-dense, agreement with the dense model)."""
    try:
        import json

        from .api import ensure_store, load
        from .default_model import default_model_path
        from .evaluate import evaluate
        from .store.reader import open_store

        text = _read_prompt(None, text_file)
        progress = sys.stderr.isatty()
        source = Path(model_path) if model_path else default_model_path(progress=progress)
        if ctx_size is None:  # 512, or the model's context if smaller
            store = open_store(ensure_store(source, codec, progress))
            ctx_size = min(512, store.config.context_length)
        model = load(source, memory_budget=memory_budget, ctx_size=ctx_size,
                     threads=threads, codec=codec, progress=progress, selector=selector,
                     sparsity=sparsity, window=window, head=head, quality=quality,
                     backend=backend, cache_type=cache_type,
                     gpu_memory_budget=gpu_memory_budget,
                     on_plan=None if as_json else lambda text: click.echo(text, err=True))
        # the dense reference runs the store the budget chose (--quality may pick another),
        # every product exact (float activations)
        reference = load(model.path, ctx_size=ctx_size, threads=threads, selector="dense",
                         head="exact", quality="exact", backend=backend) \
            if compare_dense else None
        report = evaluate(model, text, ctx_size, max_tokens, reference, progress)
        click.echo(json.dumps({"store": str(model.path), **report.as_dict()}, indent=1)
                   if as_json else report.describe())
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
