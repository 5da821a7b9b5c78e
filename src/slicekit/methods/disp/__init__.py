"""DISP-LLM (Gao et al., NeurIPS 2024): dimension-independent structural pruning.

Each decoder layer reads its own subset of the residual dimensions (after its input norm, which
still normalises the whole stream) and writes its own subset back (a scatter-add); the MLP
intermediate width is pruned too.  The five subsets per layer are learned by a small hypernetwork
(bi-GRU over a fixed input, Gumbel-sigmoid, straight-through hard masks) on the frozen model, with
``CE + λ·|log(P/p)|`` where ``P`` is the kept share of decoder parameters from the one counter.
The residual stream keeps its width and there are no extra matrices; the checkpoint stores the
indices as integer buffers (loader feature ``residual_index``).
"""

from slicekit.methods import MethodSpec, Needs, register_method
from slicekit.methods.disp.config import DISPConfig
from slicekit.methods.disp.procedure import apply, learn, plan, unsupported

register_method(MethodSpec(
    name="disp", config_cls=DISPConfig, plan=plan, apply=apply, learn=learn, unsupported=unsupported,
    needs=Needs(calibration=True, gradients=True, scope="global"),
    description="learn per-layer subsets of the residual dimensions (read and written separately) and MLP "
                "neurons with a hypernetwork; layers gather and scatter into the full-width stream",
))

__all__ = ["DISPConfig", "apply", "learn", "plan"]
