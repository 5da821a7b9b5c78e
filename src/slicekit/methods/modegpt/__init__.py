"""MoDeGPT (Lin et al., ICLR 2025): modular decomposition of each layer's MLP, key-query and
value-output pairs by closed forms, with a global per-layer sparsity allocation."""

from slicekit.methods import MethodSpec, register_method
from slicekit.methods.modegpt.config import MoDeGPTConfig
from slicekit.methods.modegpt.procedure import apply, plan, unsupported

register_method(MethodSpec(
    name="modegpt", config_cls=MoDeGPTConfig, plan=plan, apply=apply, unsupported=unsupported,
    description="Nyström MLP, CR key-query and whitened-SVD value-output decomposition, no gradients",
))

__all__ = ["MoDeGPTConfig", "apply", "plan"]
