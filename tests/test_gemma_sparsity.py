"""Activation sparsity on the real model: calibration on the packaged text chooses defaults
that keep the quality bar on held-out text (top-1 agreement >= 97%, perplexity <= +3%).

Gemma 3 is GeGLU: no neuron is ever exactly zero, so every skipped neuron costs some
accuracy (docs/benchmarks.md has the full table); the test checks the defaults calibration
wrote, on evaluation text it never saw.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import flashinfer_ondevice as fi
from flashinfer_ondevice.build.calibrate import calibrate
from flashinfer_ondevice.evaluate import evaluate
from flashinfer_ondevice.store.reader import open_store

EVAL_TEXT = Path(__file__).resolve().parents[1] / "data" / "eval" / "apache-2.0.txt"


def test_calibrated_defaults_keep_quality_on_held_out_text(gemma_store, tmp_path):
    path = shutil.copytree(gemma_store, tmp_path / "gemma.store")
    record = calibrate(path, tokens=2048)
    assert open_store(path, verify=True).sparsity.defaults == record.defaults
    defaults = record.defaults
    # every product exact (float activations) in both, so the difference is sparsity's
    model = fi.load(path, selector=defaults["selector"], sparsity=defaults["sparsity"],
                    ctx_size=512, threads=2, quality="exact")
    dense = fi.load(path, selector="dense", ctx_size=512, threads=2, quality="exact")
    report = evaluate(model, EVAL_TEXT.read_text(encoding="utf-8"), 512, 400, dense)
    assert report.neurons_needed_per_token < model.config.ffn_size * model.config.n_layers
    assert report.top1_agreement >= 0.97
    assert report.perplexity <= report.reference_perplexity * 1.03
