"""PruneNet (Sengupta et al., ICLR 2025): calibration-free MLP pruning by a learned, reusable policy."""

from slicekit.methods import MethodSpec, Needs, register_method
from slicekit.methods.prunenet.config import PruneNetConfig
from slicekit.methods.prunenet.procedure import apply, plan, unsupported

register_method(MethodSpec(
    name="prunenet", config_cls=PruneNetConfig, plan=plan, apply=apply, unsupported=unsupported,
    needs=Needs(calibration=False, gradients=False, scope="global"),
    description="calibration-free: a policy learned on the weights (spectrum-preserving reward) "
                "chooses the MLP rows to keep; reusable at other ratios",
))

__all__ = ["PruneNetConfig", "apply", "plan"]
