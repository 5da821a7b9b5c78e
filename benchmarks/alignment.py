"""Do unaligned widths cost speed on this CPU?  The evidence behind the ``round_to`` defaults (#15).

    python benchmarks/alignment.py [--repeats 7] [--threads 2]

Compressed widths are multiples of ``round_to`` (default 8).  Matrix kernels tile their loops,
and a width that is not a multiple of the tile pays for a partial tile, so a coarser rounding
(64, 128) could buy speed at a small quality cost.  This measures the cost directly on the shapes
SmolLM2-135M's compressed layers have (and widths that are not multiples of 8, as an unrounded
method would leave): transformers' own ``LlamaMLP`` (gate, up, down) over
8 × 512 tokens, at MLP widths around 1024 (what 25 % removes) and at residual widths around 432
and 384 (SliceGPT's global and per-layer widths at 25 %) with the MLP width of 1536, in float32
and in bfloat16.  All shapes are timed in alternating rounds in this one process; the reported
*efficiency* is FLOPs per second relative to the median of the same sweep, so a partial tile (or
any other width the kernels dislike) shows as a dip below its neighbours.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from common import benchmark_parser, command_line, setup, write_result

#: sweep -> (hidden, intermediate) shapes
SWEEPS: dict[str, list[tuple[int, int]]] = {
    "MLP width (hidden 576)": [(576, w) for w in (1024, 1016, 1000, 1008, 960, 1032, 1088, 1152, 1001, 1017)],
    "residual width (MLP 1536)": [(d, 1536) for d in (384, 392, 400, 424, 432, 440, 448, 512, 385, 431)],
}


def time_mlp(mlp: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        mlp(x)
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = benchmark_parser("alignment", __doc__.splitlines()[0], evaluation=False)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", default="8x512", help="batch × sequence (default %(default)s)")
    args = ap.parse_args(argv)
    setup(args)
    b, t = (int(v) for v in args.tokens.split("x"))
    torch.manual_seed(0)
    tables = []
    for dtype in (torch.float32, torch.bfloat16):
        mlps = {}
        for sweep, shapes in SWEEPS.items():
            for d, w in shapes:
                # one 64-wide head, so the attention settings validate for any hidden width (the MLP ignores them)
                config = LlamaConfig(hidden_size=d, intermediate_size=w, hidden_act="silu", num_attention_heads=1,
                                     num_key_value_heads=1, head_dim=64)
                mlps[(sweep, d, w)] = (LlamaMLP(config).to(dtype).eval(), torch.randn(b, t, d, dtype=dtype))
        times: dict[tuple[str, int, int], list[float]] = {k: [] for k in mlps}
        for mlp, x in mlps.values():  # warm-up
            time_mlp(mlp, x)
        for _ in range(args.repeats):
            for key, (mlp, x) in mlps.items():
                times[key].append(time_mlp(mlp, x))
        rows = []
        for sweep, shapes in SWEEPS.items():
            secs = {(d, w): statistics.median(times[(sweep, d, w)]) for d, w in shapes}
            rates = {k: 2 * b * t * 3 * k[0] * k[1] / sec for k, sec in secs.items()}
            ref = statistics.median(rates.values())
            for d, w in shapes:
                rows.append([sweep, d, w, d % 64 == 0 and w % 64 == 0, round(1e3 * secs[(d, w)], 2),
                             round(rates[(d, w)] / 1e9, 1), round(rates[(d, w)] / ref, 3)])
                print(rows[-1], file=sys.stderr, flush=True)
        tables.append({"title": f"LlamaMLP over {b} × {t} tokens, {str(dtype).removeprefix('torch.')}: median ms and "
                                "efficiency (GFLOP/s relative to the sweep's median)",
                       "columns": ["sweep", "hidden", "intermediate", "both multiples of 64", "ms", "GFLOP/s",
                                   "efficiency"],
                       "rows": rows})
    doc = {"title": "Unaligned widths on this CPU: the evidence for the round_to defaults (#15)",
           "command": command_line("alignment.py", argv),
           "settings": {"repeats": args.repeats, "tokens": args.tokens, "threads": torch.get_num_threads()},
           "tables": tables,
           "notes": [f"{args.repeats} alternating rounds after a warm-up, medians; transformers' LlamaMLP "
                     "(3 matrices, SiLU gate), random weights (speed does not depend on values)"]}
    print(write_result(args.out, doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
