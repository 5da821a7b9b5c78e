"""SliceGPT (Ashkboos et al., ICLR 2024): PCA rotation of the residual stream, then slicing."""

from slicekit.arch import rotation_refusal
from slicekit.methods import MethodSpec, register_method
from slicekit.methods.slicegpt.config import SliceGPTConfig
from slicekit.methods.slicegpt.procedure import apply, plan, schedule_kwargs


def _unsupported(model, config: SliceGPTConfig) -> str | None:
    reason = rotation_refusal(model, config)
    if reason is None and config.rotation == "global":
        from slicekit.methods.slicegpt.global_rotation import global_refusal

        reason = global_refusal(model)
    return reason


register_method(MethodSpec(
    name="slicegpt", config_cls=SliceGPTConfig, plan=plan, apply=apply, unsupported=_unsupported,
    description="rotate the residual stream by PCA (computational invariance) and slice the least important directions",
    default_mean=lambda config: config.slicing, schedule_kwargs=schedule_kwargs,
))

__all__ = ["SliceGPTConfig", "apply", "plan"]
