"""FASP (Hu et al., 2025): fast, accurate structured pruning of interlinked matrix pairs.

Removing input column ``j`` of the second matrix of a pair makes row ``j`` of the first one dead,
so both go together at no extra loss; columns are scored Wanda-style,
``S_j = ‖W_{:,j}‖₁·‖X_{:,j}‖₂`` (X the second matrix's input), the lowest are dropped, and the
kept columns are restored by least squares on the calibration Gram matrix, layer by layer on
inputs that already carry the earlier layers' pruning.  ``sparsity`` is the share of decoder
parameters removed, spread over layers by any schedule of :mod:`slicekit.schedules`.

**MLP**: gate/up rows (both halves of Phi-3's fused ``gate_up_proj``; OPT/GPT-2/NeoX/Phi-2
``fc1``-style rows and biases) ↔ down-projection columns.

**Mixture of experts** (Mixtral, Qwen3-MoE, Qwen2-MoE): every routed expert of a layer is its own
pair (gate/up rows ↔ down columns), scored and restored on the calibration tokens the layer's
router sends it; all experts of a layer keep one width (in multiples of 8), each its own
neurons.  The router and Qwen2-MoE's shared expert keep their size; an expert no calibration
token reaches keeps the weight-magnitude choice unrestored.  Details and memory bound
(``E·F²`` float64 per layer): :mod:`slicekit.methods.fasp.experts`.

**Attention — the Q/K/head choice.**  The paper prunes value rows ↔ output columns and does not
say whether Q/K are touched.  The installed transformers attention modules use one ``head_dim``
for queries, keys and values, so removing single value/output dimensions inside a head would need
a custom attention forward (forbidden: we never copy transformers code).  slicekit therefore
removes **whole KV groups**: a key/value head's rows of W_K and W_V, the rows of W_Q of every query
head that reads it, and those query heads' columns of W_O — i.e. Q and K are pruned exactly
along with V, never partially.  A group is scored by the FASP column score summed over its W_O
columns; the kept W_O columns are restored by least squares.  With multi-head attention a group
is one head; with GQA the query-per-KV ratio stays the same, so ``num_key_value_groups`` needs no
change, and only families whose attention reads head counts from module attributes get
``attributes`` in the shape description (OPT ``num_heads``; GPT-2 ``num_heads`` and
``split_size``).  Phi-3 reads its query width from the config object all layers share, so its
attention is kept whole (MLP pruning only).  By default a layer losing the share ``s`` of its
parameters loses ``floor(s·groups)`` groups and the MLP the rest; ``attention_sparsity`` sets the
group share explicitly and ``mlp_only`` keeps attention whole (a uniform MLP width then saves as a
vanilla Hugging Face checkpoint).

**Restoration**: ``W_S ← (W·G[:,S] + δ·W[:,S])·(G[S,S] + δI)⁻¹`` — the damped least squares of the
brief with the ridge anchored at the plain-removal weights instead of zero
(:func:`slicekit.linalg.anchored_gram` + :func:`slicekit.linalg.lstsq_restore`), so that it is
never worse than plain removal on the calibration data and is exact when nothing is removed.
δ defaults to ``(|S| / tokens)·mean(diag G[S,S])``: with few calibration tokens per kept column the
plain least squares overfits (worse than plain removal on held-out text), so the ridge shrinks
towards plain removal; with many tokens it vanishes.  Biases of the second matrix are kept
unchanged.
"""

from slicekit.methods import MethodSpec, register_method
from slicekit.methods.fasp.config import FASPConfig
from slicekit.methods.fasp.procedure import apply, plan, unsupported

register_method(MethodSpec(
    name="fasp", config_cls=FASPConfig, plan=plan, apply=apply, unsupported=unsupported,
    description="remove interlinked MLP neurons and attention KV groups by a Wanda-style score, "
                "restore the kept weights by least squares",
))

__all__ = ["FASPConfig", "apply", "plan"]
