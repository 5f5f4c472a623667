#!/usr/bin/env bash
# The MLX backend on a CUDA machine: its tests, and its kernels against the cpu backend's.
#
#   tools/device_check.sh        (on the GPU machine, in the repository root; writes $OUT)
#
# The machine reaches no package index: the wheels it needs travel in .whl/ (see the device
# tool's README: pip download --only-binary=:all: --python-version 3.12 ... mlx mlx-cuda
# onnxruntime onnx numba llvmlite numpy tokenizers safetensors jinja2 click tqdm psutil
# threadpoolctl gguf pytest ...). llama-cpp-python is not needed: the tests it runs use
# Hugging Face folders (our own reader and the tokenizers library).
# Writes $OUT/gpu.txt, $OUT/tests.txt and $OUT/kernels.{json,md}.
set -uo pipefail
OUT=${OUT:-device-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" \
    | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_backends.py tests/test_mlx_budget.py \
    -k "mlx" 2>&1 \
    | tee "$OUT/tests.txt"
(cd tools && python3 bench_kernels.py --backends mlx cpu numba --codecs int8 int4 -t 16 \
    --json "$OUT/kernels.json" --md "$OUT/kernels.md")
