"""Bits-back coding of rotational symmetry (He, Flamich & Hernández-Lobato, 2024): smaller files
for rotated models, same outputs.

After SliceGPT's rotation every residual interface of width ``d`` has an ``O(d)`` symmetry (see
:mod:`slicekit.bitsback.interfaces`): storing one particular member of each orbit spends bits
on a choice that does not matter.  :func:`pack` quantises the weights to a stated precision and
entropy codes them with ``constriction``'s ANS stack; at each interface the encoder *decodes* a
rotation from the stack (taking bits back), stores the canonical form of the weights rotated by
it, and the decoder recovers the rotation from the weights and pushes its bits back.

- canonical form and the code of ``R``: :mod:`slicekit.bitsback.rotation` (a pivoted QR frame of
  the interface's own weights, rotations built row by row with Householder steps from symbols
  on a gnomonic chart; corrections for quantisation noise, fragile-rounding list, CRC);
- precision and coding model: :mod:`slicekit.bitsback.coding`;
- stack order, undo, decode: :mod:`slicekit.bitsback.packing`;
- file format (versioned JSON header, binary sections, SHA-256): :mod:`slicekit.bitsback.container`.

Public API::

    report = pack(DIR_OR_MODEL, "model.skpack", bits=None, precision=None, bits_back=True)
    unpack("model.skpack", OUT_DIR)          # a checkpoint directory slicekit.load reads
    model, tokenizer = load_packed("model.skpack")
    is_packed(path); inspect(path); rotation_interfaces(model)
    slicekit.load("model.skpack")            # slicekit.checkpoint.load takes a packed file too

Command line: ``slicekit pack DIR OUT [--bits N | --precision P] [--no-bits-back] [--estimate]`` and
``slicekit unpack OUT DIR`` (:mod:`slicekit.cli`).
"""

from slicekit.bitsback.container import is_packed
from slicekit.bitsback.interfaces import Interface, Member, rotate_model, rotation_interfaces
from slicekit.bitsback.packing import InterfaceStats, PackReport, decode, inspect, load_packed, pack, unpack

__all__ = ["Interface", "InterfaceStats", "Member", "PackReport", "decode", "inspect", "is_packed", "load_packed",
           "pack", "rotate_model", "rotation_interfaces", "unpack"]
