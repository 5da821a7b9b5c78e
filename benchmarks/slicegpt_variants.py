"""SliceGPT's variants at equal real size on SmolLM2-135M (issue #15): per-layer rotations (the
paper's, shortcut matrices, custom loader) against one global rotation (a plain config with a
smaller hidden size), with the head untied (exact) or kept tied (diagonal final norm).

    nice -n 10 python benchmarks/slicegpt_variants.py

Every row is one ``pipeline.compress`` of a deep copy of the dense model at ``target_params``
(share of decoder parameters removed, real count), on the same calibration ids, then:
WikiText-2 perplexity on the first ``--eval-windows`` windows; total and decoder parameters; the
saved directory's weight bytes and format (``vanilla``: loads with plain transformers, checked by
loading it with ``AutoModelForCausalLM.from_pretrained`` without remote code and comparing
logits); prefill (8×512) and decode (batch 8) tokens/s against dense in alternating rounds
(:func:`slicekit.bench.bench_models`), next to the FLOP-ideal ratio.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile

import torch

from common import benchmark_parser, calibration_set, command_line, evaluation_windows, setup, write_result
from slicekit.bench import BenchSettings, bench_models, linear_flops_per_token, ratios
from slicekit.checkpoint import save
from slicekit.evaluate import perplexity_of_windows
from slicekit.methods.slicegpt import SliceGPTConfig
from slicekit.models import count_parameters, directory_weight_bytes, load_model
from slicekit.pipeline import compress

VARIANTS = {
    "per-layer rotations (default)": dict(rotation="layer"),
    "global rotation, head untied": dict(rotation="global"),
    "global rotation, head kept tied": dict(rotation="global", keep_tie=True),
}


def ppl_of(model, windows) -> float:
    nll, _ = perplexity_of_windows(model, windows, progress=False)
    return math.exp(nll)


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("slicegpt_variants", __doc__.splitlines()[0], threads=2, cal_nsamples=8, cal_seqlen=1024,
                         eval_windows=4)
    p.add_argument("--shares", default="0.25", help="shares of decoder parameters removed (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="speed rounds (default %(default)s)")
    args = p.parse_args(argv)
    setup(args)
    dense, tok = load_model(args.model)
    batches = calibration_set(args, tok).batches(args.cal_batch_size)
    windows, eval_desc = evaluation_windows(args, tok)
    work = tempfile.mkdtemp(prefix="slicekit-variants-")
    rows = []
    dense_dir = os.path.join(work, "dense")
    save(dense, tok, dense_dir)
    dense_counts = count_parameters(dense)
    dense_ppl = ppl_of(dense, windows)
    dense_flops = linear_flops_per_token(dense)
    rows.append(["dense", None, dense_ppl, dense_counts["total"], dense_counts["decoder"], round(directory_weight_bytes(dense_dir) / 2**20, 1),
                 "vanilla", None, None, None, None])
    try:
        for share in [float(s) for s in args.shares.split(",")]:
            for name, settings in VARIANTS.items():
                model = copy.deepcopy(dense)
                report = compress(model, tok, "slicegpt", SliceGPTConfig(target_params=share, **settings),
                                  batches=batches, progress=False)
                ppl = ppl_of(model, windows)
                out = os.path.join(work, "out")
                fmt = save(model, tok, out)
                size = directory_weight_bytes(out)
                plain_ok = None
                if fmt == "vanilla":
                    from transformers import AutoModelForCausalLM

                    plain = AutoModelForCausalLM.from_pretrained(out).eval()
                    x = windows[:1, :256]
                    with torch.no_grad():
                        a, b = plain(input_ids=x).logits, model(input_ids=x).logits
                    plain_ok = f"{((a - b).norm() / b.norm()).item():.1e}"
                    del plain
                speed = bench_models({"model": model, "dense": dense},
                                     BenchSettings(repeats=args.repeats, prefill_shapes=((8, 512),), decode_batches=(8,)))
                r = ratios(speed["model"], speed["dense"])
                counts = report.params_compressed
                width = report.summary.get("width", report.summary.get("mean_width"))
                rows.append([name, share, ppl, counts["total"], counts["decoder"], round(size / 2**20, 1), fmt,
                             plain_ok, width, round(r["prefill"]["8x512"], 3), round(r["decode"]["8"], 3)])
                rows[-1].append(round(dense_flops / linear_flops_per_token(model), 3))
                print(rows[-1], flush=True)
                shutil.rmtree(out, ignore_errors=True)
                del model
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows[0].append(1.0)
    doc = {"title": "SliceGPT variants at equal real size: per-layer vs one global rotation (#15)",
           "command": command_line("slicegpt_variants.py", argv),
           "settings": {k: v for k, v in vars(args).items()},
           "tables": [{"title": f"SmolLM2-135M; perplexity: {eval_desc}",
                       "columns": ["variant", "decoder share removed", "WikiText-2 ppl", "total params",
                                   "decoder params", "weights MiB", "format", "plain-transformers logits rel. error",
                                   "residual width", "prefill 8×512 vs dense", "decode b8 vs dense",
                                   "FLOP-ideal ratio"],
                       "rows": rows}],
           "notes": ["global rotation: one PCA basis of the trace-normalised Gram matrices of every stream interface; "
                     "the output is the family's own config with hidden_size = width (head_dim kept, rms_norm_eps "
                     "scaled by D/width, norm weights √(D/width)), so it loads without remote code",
                     "keep_tie approximates the final norm's scale by diag(Q_dᵀ·diag(γ)·Q_d) so that the head can stay "
                     "the rotated embedding"]}
    print(write_result(args.out, doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
