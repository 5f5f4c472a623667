"""flashinfer-ondevice: run LLMs larger than DRAM, weights on flash, under a memory budget.

    import flashinfer_ondevice as fi
    model = fi.load()                      # the embedded default, Gemma 3 270M
    print(model.generate("The capital of France is", max_tokens=16, seed=0))
"""

from .api import Model, load
from .errors import FlashInferError
from .generate import GenerationResponse

__all__ = ["FlashInferError", "GenerationResponse", "Model", "load"]
__version__ = "0.1.0"
