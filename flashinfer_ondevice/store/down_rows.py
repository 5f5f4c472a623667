"""The store's optional copy of each FFN down projection by row, for resident dense FFNs.

The bundles (store/format.py) hold neuron i's down column, encoded along the hidden size, as
streaming one neuron at a time needs. A backend that multiplies a resident dense FFN as
matrices (onnxruntime's MatMulNBits) needs down by row, grouped along the FFN size; for
codecs whose re-encoding would round the weights twice (`Codec.down_by_row`: int4), convert
also writes that form from the source:

    in down_rows.bin:
    tensors["layers.{i}.ffn_down"]   hidden x ffn_size, the FFN's codec
    manifest["down_rows"] = {"codec": name}

Budgeted plans never read it; it costs a third more disk for the FFNs.
"""

from __future__ import annotations

from ..config import ModelConfig
from ..quant.codecs import CODECS
from ..schema import layer_key

FILE = "down_rows.bin"
FIELD = "ffn_down"


def tensor_name(layer: int) -> str:
    return layer_key(layer, FIELD)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    return {tensor_name(i): (config.hidden_size, config.ffn_size)
            for i in range(config.n_layers)}


def parse_codec(raw, ffn_codec: str) -> str:
    """Validate manifest["down_rows"] against the FFN bundles' codec; raises ValueError."""
    name = raw.get("codec") if isinstance(raw, dict) else None
    if name != ffn_codec or name not in CODECS or not CODECS[name].down_by_row:
        raise ValueError(f"down-projection rows in codec {name!r} do not match the FFN's "
                         f"{ffn_codec!r}")
    return name
