"""Inference speed of each method's compressed SmolLM2-135M against the dense model.

    python benchmarks/speed.py [--methods slicegpt,modegpt,fasp] [--repeats 3]

Each compressed model is built at 25 % (SliceGPT: slicing 0.25 of the residual width, the paper's
setting; the others: ``target_params`` 0.25 of decoder parameters removed) with a small calibration
set (speed does not depend on it),
then all models are measured in alternating rounds in this one process (`slicekit.bench`):
prefill tokens/s at 1 × 2048 and 8 × 512, decode tokens/s at batch 1 and 8 with the KV cache.
The "ideal" column is the ratio of matrix FLOPs per token (linears, shortcut matrices, head).
A timing-only variant of the SliceGPT model with its shortcut matrices dropped (not equivalent,
never saved) shows what the shortcuts cost.
"""

from __future__ import annotations

import copy
import sys

import torch

from common import (
    benchmark_parser,
    calibration_request,
    calibration_set,
    command_line,
    method_config,
    setup,
    write_result,
)
from slicekit.arch import get_arch
from slicekit.bench import BenchSettings, bench_models, linear_flops_per_token
from slicekit.methods import available_methods
from slicekit.methods.slicegpt import SliceGPTConfig
from slicekit.models import count_parameters, load_model
from slicekit.pipeline import compress


def main(argv: list[str] | None = None) -> None:
    ap = benchmark_parser("speed", __doc__.splitlines()[0], evaluation=False, cal_nsamples=8, cal_seqlen=512,
                          cal_batch_size=8)
    ap.add_argument("--methods", default=",".join(available_methods()))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--share", type=float, default=0.25, help="share of decoder parameters removed (not SliceGPT)")
    ap.add_argument("--disp-train-tokens", type=int, default=8192,
                    help="DISP's training budget here (default %(default)s: its shape meets the target exactly "
                         "whatever the budget, and speed depends on the shape, not on the masks' quality)")
    args = ap.parse_args(argv)
    setup(args)
    torch.manual_seed(0)
    dense, tok = load_model(args.model)
    cal = calibration_request(args)
    calset = calibration_set(args, tok)
    batches, cal_desc = calset.batches(args.cal_batch_size), calset.description
    models = {"dense": dense}
    for method in [m for m in args.methods.split(",") if m]:
        m = copy.deepcopy(dense)
        if method == "slicegpt":
            config = SliceGPTConfig(slicing=0.25)
        elif method == "disp":
            config = method_config(method, args.share, train_tokens=args.disp_train_tokens)
        else:
            config = method_config(method, args.share)
        compress(m, tok, method, config, cal, progress=False, batches=batches)
        models[method] = m
        print(f"built {method}: {count_parameters(m)}", file=sys.stderr, flush=True)
    if "slicegpt" in models:
        ablated = copy.deepcopy(models["slicegpt"])
        for layer in get_arch(ablated.config).layer_list(ablated):
            for key in ("attn_shortcut", "mlp_shortcut"):
                p = getattr(layer, key)
                if p is not None and p.shape[0] == p.shape[1]:
                    setattr(layer, key, None)
        models["slicegpt (no shortcuts, timing only)"] = ablated
    settings = BenchSettings(repeats=args.repeats)
    results = bench_models(models, settings)
    base = results["dense"].medians()
    flops0 = linear_flops_per_token(dense)
    rows = []
    for name, res in results.items():
        med = res.medians()
        params = count_parameters(models[name])
        row = [name, params["total"], params["decoder"], round(flops0 / linear_flops_per_token(models[name]), 3)]
        for key in ("1x2048", "8x512"):
            row += [round(med["prefill_tokens_per_s"][key], 1),
                    round(med["prefill_tokens_per_s"][key] / base["prefill_tokens_per_s"][key], 3)]
        for key in ("1", "8"):
            row += [round(med["decode_tokens_per_s"][key], 1),
                    round(med["decode_tokens_per_s"][key] / base["decode_tokens_per_s"][key], 3)]
        row.append(round(med["peak_rss_mib"]))
        rows.append(row)
    cols = ["model", "params total", "params decoder", "ideal (FLOPs)", "prefill 1×2048 tok/s", "ratio",
            "prefill 8×512 tok/s", "ratio", "decode b1 tok/s", "ratio", "decode b8 tok/s", "ratio", "peak RSS MiB"]
    notes = [f"calibration for building the models: {cal_desc} (speed does not depend on it)",
             f"{settings.repeats} alternating rounds after a warm-up; medians; decode = {settings.new_tokens} new "
             f"tokens after a {settings.prompt_len}-token prompt, KV cache on",
             "ideal = dense matrix FLOPs per token / model matrix FLOPs per token (linears + shortcuts + head)"]
    if "disp" in models:
        notes.append(f"DISP trained on {args.disp_train_tokens:,} tokens here (its gathers and scatters by index are "
                     "timed; its quality is in disp.json)")
    sg = next((r for r in rows if r[0] == "slicegpt"), None)
    ab = next((r for r in rows if r[0].startswith("slicegpt (no")), None)
    if sg and ab:
        notes.append(f"shortcut matrices: SliceGPT prefill 8×512 at {sg[7]:.3f}× dense with them, {ab[7]:.3f}× "
                     f"without (timing only) — they cost {100 * (1 - sg[6] / ab[6]):.1f} % of prefill throughput")
    doc = {"title": "Inference speed on CPU (SmolLM2-135M, 25 % models)",
           "command": command_line("speed.py", argv),
           "settings": {"repeats": settings.repeats, "prompt_len": settings.prompt_len,
                        "new_tokens": settings.new_tokens, "threads": torch.get_num_threads()},
           "tables": [{"title": "tokens/s (median) and ratio to dense", "columns": cols, "rows": rows}],
           "notes": notes}
    print(write_result(args.out, doc))
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
