"""DOTResize (Verma, Murray, Duh 2025): reduce the MLP width by merging neurons with optimal transport."""

from slicekit.methods import MethodSpec, register_method
from slicekit.methods.dotresize.config import DOTResizeConfig
from slicekit.methods.dotresize.procedure import apply, plan

register_method(MethodSpec(
    name="dotresize", config_cls=DOTResizeConfig, plan=plan, apply=apply,
    description="merge MLP neurons into fewer through an entropic optimal-transport plan (POT Sinkhorn) "
                "instead of deleting them",
))

__all__ = ["DOTResizeConfig", "apply", "plan"]
