"""MoDeGPT (Lin et al., ICLR 2025): modular decomposition of each layer's MLP, key-query and
value-output pairs by closed forms, with a global per-layer sparsity allocation."""

from slicekit.methods import register_method
from slicekit.methods.modegpt.config import MoDeGPTConfig
from slicekit.methods.modegpt.procedure import compress

register_method("modegpt", MoDeGPTConfig, compress,
                "Nyström MLP, CR key-query and whitened-SVD value-output decomposition, no gradients")

__all__ = ["MoDeGPTConfig", "compress"]
