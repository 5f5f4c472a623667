"""Resident int8/int4 matrices multiplied by onnxruntime's `MatMulNBits` (MLAS kernels).

Our grouped codecs (quant/codecs.py: a float32 scale per 64 values (int4g128: 128), int8
values or int4 nibbles low first, stored +8) map byte for byte onto MatMulNBits' blocks
(block_size the codec's group, default zero point 2^(bits-1): int8 is stored +128 for it).
`accuracy_level=4` quantizes the activations to int8 per block, as llama.cpp does for its
integer formats (VNNI dot products where the CPU has them); tests/test_backends.py measures
what that costs in top-1 and KL.

The weights are handed to onnxruntime as in-memory external initializers; it packs them into
its own layout (1.15x the int8 bytes, 1.27x the int4 bytes, measured) and keeps only that,
so a prepared matrix's codec bytes can be let go.

Threads: where every product of a token runs here (`alone`: all weights resident, dense
FFNs, codecs mapped here), the sessions share onnxruntime's process-wide pool of `-t`
threads (`pool_threads`), whose workers spin briefly between products, as llama.cpp's do: a
Gemma 3 270M token runs ~90 small products, and waking a sleeping worker for each one cost
a fifth of the token (decode 41 -> 53 tok/s, docs/benchmarks.md). Otherwise numba's
parallel kernels run between products (sparse FFNs, other codecs), and spinning workers
would take their cores (3x slower decode, measured): each session gets a pool of its own
whose workers sleep. Once the shared pool exists every session must use it (onnxruntime's
rule), so a later load in the same process runs on it whatever it asks: one that is not
`alone` then pays the spinning (resident sparse FFNs 3x slower; `session.force_spinning_stop`
did not help, measured).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import TYPE_CHECKING

import numpy as np

from ..quant.codecs import Codec, codec
from ..quant.kernels import GROUP

if TYPE_CHECKING:
    import onnx
    import onnxruntime

MAPPED = ("int8", "int4", "int4fit", "int4g128")  # the codecs this maps (int4fit: int4's bytes)
# onnxruntime's packed bytes / our codec bytes, measured (RSS) on the 262144x640 output layer:
# int8 178 MB -> 203 MB, int4 94 MB -> 119 MB
PACKED_FACTOR = {8: 1.15, 4: 1.27}  # (int4g128 counted as int4: an overestimate)


def installed() -> bool:
    """Whether onnxruntime and onnx can be imported (without importing them: their libraries
    are loaded on first use, so a budgeted run, which prepares nothing, never holds them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


_pool_threads: int | None = None  # threads of onnxruntime's process-wide pool, once made


def pool_threads(threads: int) -> int:
    """The threads of onnxruntime's process-wide pool, made for `threads` at the first call.
    Once it exists every session must run on it, so a later load asking another count gets
    this one, and a warning."""
    global _pool_threads
    if _pool_threads is None:
        import onnxruntime.capi.onnxruntime_pybind11_state as ort_state
        ort_state.set_global_thread_pool_sizes(threads, 1)
        _pool_threads = threads
    elif _pool_threads != threads:
        warnings.warn(f"onnxruntime's thread pool was made for {_pool_threads} threads in "
                      f"this process; its products run on those, not on {threads}",
                      RuntimeWarning, stacklevel=2)
    return _pool_threads


def _session_options(threads: int | None, alone: bool) -> onnxruntime.SessionOptions:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # no arena: packed weights and run buffers allocated exactly (an arena kept ~200 MB of
    # load-time buffers of the output layer's packing)
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    count = min(threads, os.cpu_count() or 1) if threads else os.cpu_count() or 1
    if alone or _pool_threads is not None:
        pool_threads(count)
        options.use_per_session_threads = False
        return options
    # a pool of its own, whose workers sleep between products
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.intra_op_num_threads = count
    options.inter_op_num_threads = 1
    return options


def _external(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer whose bytes are supplied at session creation (no copy in the proto)."""
    from onnx import TensorProto, helper
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", f"{name}.bin"), ("offset", "0"),
                       ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


class _Graph:
    """An onnxruntime session under construction: MatMulNBits nodes on codec rows, plus
    whatever elementwise nodes join them."""

    def __init__(self):
        self.nodes: list = []
        self.initializers: list = []
        self.arrays: dict[str, np.ndarray] = {}
        self.nbytes = 0

    def matmul(self, c: Codec, raw: np.ndarray, cols: int, x: str, y: str) -> None:
        """y = x @ W.T for W the grouped-codec rows `raw` (bytes mapped as they are)."""
        from onnx import helper
        bits, group = c.bits, c.group
        rows, groups = len(raw), cols // group
        scales = np.ascontiguousarray(raw[:, :4 * groups]).view(np.float32).reshape(-1)
        payload = raw[:, 4 * groups:]
        if bits == 8:  # int8 -> uint8 with zero point 128
            payload = payload ^ np.uint8(0x80)
        weights = np.ascontiguousarray(payload).reshape(rows, groups, group * bits // 8)
        w, s = f"{y}.w", f"{y}.scales"
        self.nodes.append(helper.make_node("MatMulNBits", [x, w, s], [y], domain="com.microsoft",
                                           K=cols, N=rows, bits=bits, block_size=group,
                                           accuracy_level=4))
        for name, array in ((w, weights), (s, scales)):
            self.initializers.append(_external(name, array))
            self.arrays[name] = array
        self.nbytes += int(raw.nbytes * PACKED_FACTOR[bits])

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "",
             **attributes) -> None:
        from onnx import helper
        self.nodes.append(helper.make_node(op, inputs, outputs, domain=domain, **attributes))

    def session(self, cols: int, rows: int, threads: int | None, alone: bool
                ) -> onnxruntime.InferenceSession:
        """The session computing "y" (tokens, rows) from "x" (tokens, cols); the codec bytes
        handed over are onnxruntime's to pack, and not held after."""
        import onnxruntime as ort
        from onnx import TensorProto, helper
        graph = helper.make_graph(
            self.nodes, "backend", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                  [None, cols])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, rows])],
            self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 9
        options = _session_options(threads, alone)
        options.add_external_initializers(
            list(self.arrays), [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays.values()])
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        self.arrays.clear()
        return session


class _Prepared:
    """A session computing "y" from "x" and the bytes it holds (the `Prepared` protocol)."""

    session: onnxruntime.InferenceSession
    nbytes: int

    def apply(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]


class OnnxMatMul(_Prepared):
    """x @ W.T for a resident grouped-codec matrix, through one MatMulNBits session."""

    def __init__(self, codec: Codec, raw: np.ndarray, cols: int, threads: int | None,
                 alone: bool):
        graph = _Graph()
        graph.matmul(codec, raw, cols, "x", "y")
        self.session = graph.session(cols, len(raw), threads, alone)
        self.rows = len(raw)
        self.nbytes = graph.nbytes


class OnnxFFN(_Prepared):
    """A dense FFN from row-column bundles in one session: gate and up rows in one
    MatMulNBits (mapped as stored), the activation, and the down projection. The bundles
    hold down by column (quantized along the hidden size), MatMulNBits needs it by row
    (along the FFN size): the store's copy by row where it keeps one (`down_rows`, int4
    stores: store/down_rows.py), else the columns decoded and re-encoded as int8 groups
    along the FFN size, which adds an int8 rounding (smaller than the int8 activations')."""

    def __init__(self, bundle_codec: Codec, raw: np.ndarray, hidden: int, activation: str,
                 threads: int | None, alone: bool, down_rows: np.ndarray | None = None):
        if activation not in ("gelu_tanh", "silu"):
            raise ValueError(f"no onnxruntime form of the activation {activation!r}")
        neurons, rb = len(raw), bundle_codec.row_nbytes(hidden)
        graph = _Graph()
        graph.matmul(bundle_codec, np.concatenate([raw[:, :rb], raw[:, rb:2 * rb]]),
                     hidden, "x", "gate_up")
        graph.node("Split", ["gate_up"], ["gate", "up"], axis=1)
        if activation == "gelu_tanh":  # FastGelu is the tanh approximation
            graph.node("FastGelu", ["gate"], ["act"], domain="com.microsoft")
        else:
            graph.node("Sigmoid", ["gate"], ["sigmoid"])
            graph.node("Mul", ["gate", "sigmoid"], ["act"])
        graph.node("Mul", ["act", "up"], ["h"])
        if down_rows is not None:
            if down_rows.shape != (hidden, bundle_codec.row_nbytes(neurons)):
                raise ValueError(f"down-projection rows of shape {down_rows.shape} do not "
                                 f"fit {neurons} {bundle_codec.name} neurons")
            graph.matmul(bundle_codec, down_rows, neurons, "h", "y")
        else:
            down = bundle_codec.decode(raw[:, 2 * rb:], hidden).T  # (hidden, neurons) float32
            graph.matmul(codec("int8"), codec("int8").encode(np.ascontiguousarray(down)),
                         neurons, "h", "y")
        self.session = graph.session(hidden, hidden, threads, alone)
        self.nbytes = graph.nbytes


def supports_ffn(codec: Codec, hidden: int, neurons: int) -> bool:
    """Whether OnnxFFN can take these bundles (down re-encoded in groups along `neurons`)."""
    return codec.name in MAPPED and codec.supports(hidden) and neurons % GROUP == 0
