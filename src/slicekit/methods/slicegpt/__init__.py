"""SliceGPT (Ashkboos et al., ICLR 2024): PCA rotation of the residual stream, then slicing."""

from slicekit.methods import register_method
from slicekit.methods.slicegpt.config import SliceGPTConfig
from slicekit.methods.slicegpt.procedure import compress

register_method("slicegpt", SliceGPTConfig, compress,
                "rotate the residual stream by PCA (computational invariance) and slice the least important directions")

__all__ = ["SliceGPTConfig", "compress"]
