"""SliceGPT (Ashkboos et al., ICLR 2024): PCA rotation of the residual stream, then slicing."""

from slicekit.arch import rotation_refusal
from slicekit.methods import MethodSpec, register_method
from slicekit.methods.slicegpt.config import SliceGPTConfig
from slicekit.methods.slicegpt.procedure import apply, plan, schedule_kwargs

register_method(MethodSpec(
    name="slicegpt", config_cls=SliceGPTConfig, plan=plan, apply=apply, unsupported=rotation_refusal,
    description="rotate the residual stream by PCA (computational invariance) and slice the least important directions",
    default_mean=lambda config: config.slicing, schedule_kwargs=schedule_kwargs,
))

__all__ = ["SliceGPTConfig", "apply", "plan"]
