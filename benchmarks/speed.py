"""Inference speed of each method's compressed SmolLM2-135M against the dense model.

    python benchmarks/speed.py [--methods fasp,slicegpt global] [--repeats 5]

Each compressed model removes ``--share`` (25 %) of the decoder parameters, real count (SliceGPT in
both rotations: per-layer with shortcut matrices, and the global rotation's vanilla model), built
with a small calibration set (speed does not depend on it); each is saved once to measure its file
and format, and its KV cache is measured per token.  Then all models are measured in alternating rounds in this one process (`slicekit.bench`):
prefill tokens/s at 1 × 2048 and 8 × 512, decode tokens/s at batch 1 and 8 with the KV cache.
The "ideal" column is the ratio of matrix FLOPs per token (linears, shortcut matrices, head).
A timing-only variant of the SliceGPT model with its shortcut matrices dropped (not equivalent,
never saved) shows what the shortcuts cost.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile

import torch

from common import (
    VARIANTS,
    benchmark_parser,
    calibration_request,
    calibration_set,
    command_line,
    setup,
    variant_config,
    write_result,
)
from slicekit.arch import get_arch
from slicekit.bench import BenchSettings, bench_models, kv_cache_bytes_per_token, linear_flops_per_token
from slicekit.checkpoint import save
from slicekit.models import count_parameters, load_model
from slicekit.pipeline import compress

#: every method at the share removed; SliceGPT in both rotations; PruneNet's shape without its policy
DEFAULT_LABELS = ("fasp", "modegpt", "modegpt fast", "slicegpt", "slicegpt global", "prunenet random", "dotresize",
                  "disp")


def file_mib(model, tok) -> tuple[float, str]:
    """The weights a float32 save writes (MiB) and the format it writes ("vanilla"/"slicekit")."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "m")
        fmt = save(model, tok, out)
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    return size / 2**20, fmt


def main(argv: list[str] | None = None) -> None:
    ap = benchmark_parser("speed", __doc__.splitlines()[0], evaluation=False, cal_nsamples=8, cal_seqlen=512,
                          cal_batch_size=8)
    ap.add_argument("--methods", default=",".join(DEFAULT_LABELS),
                    help=f"any of {', '.join(VARIANTS)} (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32,
                    help="tokens generated per decode timing (default %(default)s; more = a longer, steadier window)")
    ap.add_argument("--share", type=float, default=0.25, help="share of decoder parameters removed (real count)")
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
    for label in [m for m in args.methods.split(",") if m]:
        m = copy.deepcopy(dense)
        extra = {"train_tokens": args.disp_train_tokens} if VARIANTS.get(label, ("",))[0] == "disp" else {}
        method, config = variant_config(label, args.share, **extra)
        compress(m, tok, method, config, cal, progress=False, batches=batches)
        models[label] = m
        print(f"built {label}: {count_parameters(m)}", file=sys.stderr, flush=True)
    if "slicegpt" in models:
        ablated = copy.deepcopy(models["slicegpt"])
        for layer in get_arch(ablated.config).layer_list(ablated):
            for key in ("attn_shortcut", "mlp_shortcut"):
                p = getattr(layer, key)
                if p is not None and p.shape[0] == p.shape[1]:
                    setattr(layer, key, None)
        models["slicegpt (no shortcuts, timing only)"] = ablated
    files = {name: file_mib(m, tok) for name, m in models.items() if "timing only" not in name}
    settings = BenchSettings(repeats=args.repeats, new_tokens=args.new_tokens)
    results = bench_models(models, settings)
    base = results["dense"].medians()
    cols = ["model", "format", "params total", "params decoder", "file MiB (fp32)", "KV bytes/token",
            "ideal (FLOPs)", "prefill 1×2048 tok/s", "ratio", "prefill 8×512 tok/s", "ratio", "8×512 / ideal",
            "decode b1 tok/s", "ratio", "decode b8 tok/s", "ratio", "peak RSS MiB"]
    #: column name -> index; the two decode ratios by their batch
    col = {c: i for i, c in enumerate(cols) if c != "ratio"} | {"decode b8 ratio": cols.index("decode b8 tok/s") + 1}
    flops0 = linear_flops_per_token(dense)
    rows = []
    for name, res in results.items():
        med = res.medians()
        params = count_parameters(models[name])
        ideal = flops0 / linear_flops_per_token(models[name])
        mib, fmt = files.get(name, (None, "—"))
        row = [name, fmt, params["total"], params["decoder"], None if mib is None else round(mib, 1),
               kv_cache_bytes_per_token(models[name]), round(ideal, 3)]
        for key in ("1x2048", "8x512"):
            ratio = med["prefill_tokens_per_s"][key] / base["prefill_tokens_per_s"][key]
            row += [round(med["prefill_tokens_per_s"][key], 1), round(ratio, 3)]
        row.append(round(ratio / ideal, 3))  # 8×512, the bar's shape
        for key in ("1", "8"):
            row += [round(med["decode_tokens_per_s"][key], 1),
                    round(med["decode_tokens_per_s"][key] / base["decode_tokens_per_s"][key], 3)]
        row.append(round(med["peak_rss_mib"]))
        rows.append(row)

    notes = [f"calibration for building the models: {cal_desc} (speed does not depend on it)",
             f"{settings.repeats} alternating rounds after a warm-up; medians; decode = {settings.new_tokens} new "
             f"tokens after a {settings.prompt_len}-token prompt, KV cache on",
             "ideal = dense matrix FLOPs per token / model matrix FLOPs per token (linears + shortcuts + head)"]
    if "disp" in models:
        notes.append(f"DISP trained on {args.disp_train_tokens:,} tokens here (its gathers and scatters by index are "
                     "timed; its quality is in disp.json)")
    sg = next((r for r in rows if r[0] == "slicegpt"), None)
    ab = next((r for r in rows if r[0].startswith("slicegpt (no")), None)
    at = cols.index("prefill 8×512 tok/s")
    if sg and ab:
        notes.append(f"shortcut matrices: SliceGPT prefill 8×512 at {sg[at + 1]:.3f}× dense with them, "
                     f"{ab[at + 1]:.3f}× without (timing only) — they cost {100 * (1 - sg[at] / ab[at]):.1f} % of "
                     "prefill throughput")
    groups: dict[tuple, list[list]] = {}
    for r in rows[1:]:
        if r[col["format"]] == "vanilla":  # a plain config: same hyper-parameters = same shape
            groups.setdefault((r[col["params total"]], r[col["params decoder"]], r[col["ideal (FLOPs)"]]), []).append(r)
    for same in (g for g in groups.values() if len(g) > 1):
        def spread(key: str, same: list[list] = same) -> str:
            vals = [r[col[key]] for r in same]
            return f"{min(vals):.3f}–{max(vals):.3f}"
        notes.append(f"{', '.join(r[0] for r in same)} have the same shape (vanilla configs, equal counts): their "
                     f"spread — prefill 8×512 / ideal {spread('8×512 / ideal')}, decode b8 ratio "
                     f"{spread('decode b8 ratio')} — is this machine's measurement noise")
    dense_row = rows[0]
    short = []
    for r in rows[1:]:
        if "timing only" in r[0]:
            continue
        misses = [f"8×512 at {r[col['8×512 / ideal']]:.3f} of ideal"] if r[col["8×512 / ideal"]] < 0.9 else []
        misses += [f"decode b8 {r[col['decode b8 ratio']]:.3f}×"] if r[col["decode b8 ratio"]] < 1.10 else []
        misses += ["total params not below dense"] if r[col["params total"]] >= dense_row[col["params total"]] else []
        misses += ["file not below dense"] if (r[col["file MiB (fp32)"]] or 0) >= dense_row[col["file MiB (fp32)"]] else []
        if misses:
            short.append(f"{r[0]} ({', '.join(misses)})")
    notes.append("issue #15's bar (prefill 8×512 ≥ 0.9 of the FLOP-ideal, decode b8 ≥ 1.10× dense, total parameters "
                 "and file below dense): " + ("every model meets it in this run" if not short
                                              else "missed in this run by " + "; ".join(short)))
    notes.append(f"every compressed model removes {args.share:.0%} of the decoder parameters (real count, the one "
                 "counter); 'prunenet random' has the learned policy's shape (speed depends on the shape only)")
    notes.append("file MiB: the safetensors weights `slicekit.checkpoint.save` writes in float32 (--save-dtype "
                 "bfloat16 halves them); format 'vanilla' = a plain family config that loads without remote code")
    doc = {"title": "Inference speed on CPU (SmolLM2-135M, 25 % models)",
           "command": command_line("speed.py", argv),
           "settings": {"share": args.share, "repeats": settings.repeats, "prompt_len": settings.prompt_len,
                        "new_tokens": settings.new_tokens, "threads": torch.get_num_threads()},
           "tables": [{"title": "tokens/s (median) and ratio to dense", "columns": cols, "rows": rows}],
           "notes": notes,
           # every round's tokens/s, so that the spread behind each median can be read
           "raw": {name: {"prefill_tokens_per_s": res.prefill_tps, "decode_tokens_per_s": res.decode_tps}
                   for name, res in results.items()}}
    print(write_result(args.out, doc))
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
