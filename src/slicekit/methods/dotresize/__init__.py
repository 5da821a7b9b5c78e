"""DOTResize (Verma, Murray, Duh 2025): reduce a width by merging neurons with optimal transport —
the MLP intermediate width, or the residual width on the rotation-invariant model."""

from slicekit.methods import MethodSpec, register_method
from slicekit.methods.dotresize.config import DOTResizeConfig
from slicekit.methods.dotresize.procedure import apply, plan, schedule_kwargs, unsupported

register_method(MethodSpec(
    name="dotresize", config_cls=DOTResizeConfig, plan=plan, apply=apply, unsupported=unsupported,
    description="merge neurons (MLP width, or the residual width with width=hidden) into fewer through an "
                "entropic optimal-transport plan (POT Sinkhorn) instead of deleting them",
    schedule_kwargs=schedule_kwargs,
))

__all__ = ["DOTResizeConfig", "apply", "plan"]
