"""Constant vs dynamic slicing (layer-adaptive widths) with SliceGPT on SmolLM2-135M.

Same mean residual width for every schedule (the non-constant widths are rounded so that their
total equals the constant schedule's, see :func:`slicekit.schedules.resolve_schedule`), a small
sweep of the slice base, WikiText-2 test perplexity.  The calibration batches, the evaluation
windows and the layer scores are computed once; every run compresses a deep copy of the loaded
model.  Results (JSON in the benchmarks schema, and a plot of the scores and widths) go to
``benchmarks/results/``; the JSON is rewritten after every run, so an interrupted run leaves the
finished rows.

    nice -n 5 python benchmarks/dynamic_slicing.py            # the recorded settings
    python benchmarks/dynamic_slicing.py --cal-nsamples 4 --cal-seqlen 256 --eval-windows 2 \\
        --eval-seqlen 256 --out /tmp/ds.json                  # a quick smoke run
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time

from common import (
    benchmark_parser,
    calibration_set,
    command_line,
    evaluation_windows,
    scrub,
    setup,
    write_result,
)
from slicekit.evaluate import perplexity_of_windows
from slicekit.methods import MethodContext, config_to_dict, get_method
from slicekit.methods.slicegpt import SliceGPTConfig
from slicekit.models import count_parameters, load_model
from slicekit.plots import layer_widths_png
from slicekit.profiling import measure
from slicekit.schedules import (
    fractions_of,
    resolve_schedule,
    round_to_total,
    round_width,
    widths_from_fractions,
)
from slicekit.scores import LayerScores, layer_scores
from slicekit.shape import Plan, count_plan


def planned_total(model, config: SliceGPTConfig, widths: list[int]) -> int:
    """Total parameters of ``model`` sliced to ``widths`` (input width of each layer), counted on
    SliceGPT's plan by the one counter — no surgery."""
    fractions = fractions_of(widths, model.config.hidden_size)
    return count_plan(get_method("slicegpt").plan(model, config, fractions)).total


def matched_widths(model, config: SliceGPTConfig, fractions: list[float], budget: int) -> tuple[list[int], int]:
    """The largest total width (in steps of ``round_to``) whose largest-remainder rounding of
    ``fractions`` has at most ``budget`` parameters (counted on the plan)."""
    full, multiple = model.config.hidden_size, config.round_to
    total = sum(widths_from_fractions(full, fractions, multiple))
    while True:
        widths = round_to_total(fractions, full, total, multiple, config.max_layer_sparsity)
        count = planned_total(model, config, widths)
        if count <= budget:
            return widths, count
        total -= multiple


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("dynamic_slicing", __doc__)
    p.add_argument("--slicing", type=float, default=0.25, help="mean share of the residual width removed")
    p.add_argument("--slice-bases", default="0.05,0.15,0.20")
    p.add_argument("--modegpt-epsilons", default="", help="also MoDeGPT's allocation at these ε (comma list)")
    p.add_argument("--matched-slice-bases", default="",
                   help="also dynamic slicing at these slice bases with the total width lowered until the real "
                        "parameter count is at most the constant schedule's (comma list)")
    p.add_argument("--resume", action="store_true",
                   help="keep the dense result, layer scores and finished runs of an existing --out file")
    p.add_argument("--round-to", type=int, default=8)
    args = p.parse_args(argv)
    setup(args)
    command = command_line("dynamic_slicing.py", argv)
    plot_name = os.path.splitext(os.path.basename(args.out))[0] + ".png"
    progress = sys.stderr.isatty()
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    t_start = time.perf_counter()
    model, tok = load_model(args.model)
    hidden = model.config.hidden_size
    calset = calibration_set(args, tok)
    batches, cal_desc = calset.batches(args.cal_batch_size), calset.description
    windows, test_description = evaluation_windows(args, tok)
    log(f"calibration: {cal_desc}; evaluation: {windows.shape[0]} × {args.eval_seqlen} of {test_description}")

    previous = None
    if args.resume and os.path.isfile(args.out):
        with open(args.out) as fh:
            previous = json.load(fh)
        if scrub(previous["settings"]["calibration"]) != cal_desc:
            raise SystemExit(f"--resume: {args.out} was calibrated on {previous['settings']['calibration']}")
    if previous is not None:
        dense, ntok = previous["dense"], windows.shape[0] * (args.eval_seqlen - 1)
        scores = LayerScores.from_lr(previous["settings"]["layer_scores"]["lr"])
        score_seconds = previous["settings"]["layer_scores"]["seconds"]
        log(f"resuming {args.out}: {len(previous['runs'])} finished runs")
        command = previous["command"] + " && " + command.strip()
    else:
        t = time.perf_counter()
        nll, ntok = perplexity_of_windows(model, windows, progress=progress)
        dense = {"ppl": math.exp(nll), "params": count_parameters(model), "seconds": time.perf_counter() - t}
        log(f"dense: ppl {dense['ppl']:.3f} ({dense['seconds']:.0f} s)")
        t = time.perf_counter()
        scores = layer_scores(model, batches, progress=progress)
        score_seconds = time.perf_counter() - t
    log(f"layer scores ({score_seconds:.0f} s): LR {[round(v, 4) for v in scores.lr]}")

    runs: list[tuple[str, SliceGPTConfig]] = [("constant", SliceGPTConfig(slicing=args.slicing, round_to=args.round_to))]
    for sb in [float(x) for x in args.slice_bases.split(",") if x]:
        runs.append((f"dynamic SB={sb:g}", SliceGPTConfig(slicing=args.slicing, round_to=args.round_to,
                                                          schedule="dynamic", slice_base=sb)))
    for eps in [float(x) for x in args.modegpt_epsilons.split(",") if x]:
        runs.append((f"modegpt ε={eps:g}", SliceGPTConfig(slicing=args.slicing, round_to=args.round_to,
                                                          schedule="modegpt", epsilon=eps)))

    for sb in [float(x) for x in args.matched_slice_bases.split(",") if x]:
        runs.append((f"dynamic SB={sb:g}, params-matched", SliceGPTConfig(
            slicing=args.slicing, round_to=args.round_to, schedule="dynamic", slice_base=sb)))

    n_layers = len(scores.lr)
    rows, widths_by_run, details = [], {}, []
    for d in (previous or {}).get("runs", []):
        p_ = d["params"]
        rows.append((d["name"], sum(d["widths"]) / n_layers, d["ppl"], p_["total"], p_["non_embedding"],
                     p_["decoder"], d["compress_seconds"]))
        widths_by_run[d["name"]] = d["widths"]
        details.append(d)
    settings = {
        "model": args.model, "hidden_size": hidden, "layers": n_layers, "slicing": args.slicing,
        "round_to": args.round_to, "calibration": cal_desc, "calibration_batch_size": args.cal_batch_size,
        "evaluation": f"{windows.shape[0]} windows × {args.eval_seqlen} tokens of {test_description} "
                      f"({ntok} scored tokens)",
        "dtype": "float32", "device": "cpu", "slice_head": False, "damping": 0.01,
        "layer_scores": {"lr": scores.lr, "bi": scores.bi, "seconds": round(score_seconds, 1),
                         "note": "measured once on the original model, shared by all scored runs"},
    }

    def write(final: bool) -> None:
        constant_params = rows[0][3] if rows else None
        table = []
        for name, mean_w, ppl, total, non_emb, dec, secs in rows:
            rel = "" if constant_params is None else f"{(total - constant_params) / constant_params:+.2%}"
            table.append([name, mean_w, round(ppl, 3), total, rel, non_emb, dec, round(secs, 1)])
        notes = [
            f"All schedules have the same total residual width (Σ_l d_l = {n_layers} × "
            f"{round_width(hidden, args.slicing, args.round_to)}); dynamic widths are rounded to multiples "
            f"of {args.round_to} by largest remainder to hit that total exactly.",
            "Parameter counts are real counts of the compressed models. They differ between schedules "
            "even at equal total width for two reasons: the token embedding is vocab × d_0 (d_0 = the "
            f"first layer's input width, {model.config.vocab_size:,} rows per unit of width) and the "
            "shortcut matrices are "
            "d_l × d_(l+1) (quadratic in the widths). 'non-embedding' and 'decoder' show the part "
            "that does not depend on d_0.",
            "The LM head is untied from the embeddings (SliceGPT needs it) and kept at full width, as "
            "in the reference: that is why every compressed model is larger in total than the dense "
            "model with its tied embedding table.",
            "Layer scores (LR = mean over tokens of cos(block input, block output), BI = 1 − LR) were "
            "taken on the original model; for SmolLM2 (RMSNorm) the invariance transforms do not "
            "change the residual stream, so they equal the scores of the invariant model.",
            "Reduced protocol for a shared 2-core CPU: 16 × 2048 calibration tokens (reference: 128 × "
            "2048 from the training split) and 16 of the test windows; numbers are comparable with "
            "each other, not with published full-protocol perplexities.",
        ]
        if any(r[0].endswith("params-matched") for r in rows):
            notes.append("'params-matched' runs: the same dynamic fractions, with the total width lowered in "
                         f"steps of {args.round_to} (largest-remainder rounding) until the real total parameter "
                         "count is at most the constant schedule's; the count is predicted on SliceGPT's plan by "
                         "the one parameter counter and asserted equal to the real count of the compressed model.")
        if not final:
            notes.insert(0, "PARTIAL: the run was still in progress when this file was written.")
        out = {
            "title": "Dynamic slicing vs constant slicing (SliceGPT, SmolLM2-135M, mean slicing "
                     f"{args.slicing:g})",
            "command": command.strip(),
            "settings": settings,
            "tables": [
                {"title": f"WikiText-2 test perplexity and real parameter counts (dense: ppl "
                          f"{dense['ppl']:.3f}, {dense['params']['total']:,} parameters)",
                 "columns": ["schedule", "mean width", "ppl", "params total", "vs constant",
                             "params non-embedding", "params decoder", "compress s"],
                 "rows": table},
                {"title": "Per-layer widths (input width of each decoder layer)",
                 "columns": ["schedule", *[str(i) for i in range(n_layers)]],
                 "rows": [[name, *w] for name, w in widths_by_run.items()]},
            ],
            "notes": notes,
            "plots": [plot_name],
            "dense": dense,
            "runs": details,
            "total_seconds": round(time.perf_counter() - t_start, 1),
        }
        write_result(args.out, out)
        png = layer_widths_png(widths_by_run, hidden, {"LR": scores.lr, "BI": scores.bi},
                               f"{args.model}, SliceGPT at mean slicing {args.slicing:g}")
        with open(os.path.join(os.path.dirname(os.path.abspath(args.out)), plot_name), "wb") as fh:
            fh.write(png)

    for name, cfg in runs:
        if name in widths_by_run:
            continue
        fractions = resolve_schedule(cfg.schedule, cfg.slicing, n_layers, scores=scores, slice_base=cfg.slice_base,
                                     epsilon=cfg.epsilon, cap=cfg.max_layer_sparsity, full_width=hidden,
                                     multiple=cfg.round_to)
        predicted = None
        if name.endswith("params-matched"):
            const = details[0]
            assert const["name"] == "constant", "the constant run comes first"
            widths, predicted = matched_widths(model, cfg, fractions, const["params"]["total"])
            fractions = fractions_of(widths, hidden)
        # The layer scores were measured once, so the schedule is resolved here and the method's own
        # plan and surgery run at those fractions (what the pipeline does after scoring).
        entry = get_method("slicegpt")
        m = copy.deepcopy(model)
        with measure() as meas:
            plan = entry.plan(m, cfg, fractions)
            summary = entry.apply(m, plan, cfg, MethodContext(batches, progress=progress, fractions=fractions))
        wrong = plan.differences(Plan.of(m))
        assert not wrong, wrong[:3]
        widths = summary["attn_in_widths"]
        assert widths == widths_from_fractions(hidden, fractions, cfg.round_to)
        t = time.perf_counter()
        nll, _ = perplexity_of_windows(m, windows, progress=progress)
        ppl = math.exp(nll)
        params = count_parameters(m)
        assert params == count_plan(plan).as_dict(), (params, count_plan(plan))
        if predicted is not None:
            assert predicted == params["total"], (predicted, params["total"])
        widths_by_run[name] = widths
        rows.append((name, sum(widths) / n_layers, ppl, params["total"], params["non_embedding"], params["decoder"],
                     meas.seconds))
        details.append({"name": name, "config": config_to_dict(cfg), "widths": widths, "ppl": ppl, "nll": nll,
                        "params": params, "compress_seconds": round(meas.seconds, 1),
                        "eval_seconds": round(time.perf_counter() - t, 1),
                        "rss_peak_mib": round(meas.rss_peak / 2**20)})
        log(f"{name}: ppl {ppl:.3f}, params {params['total']:,} (non-emb {params['non_embedding']:,}), "
            f"compress {meas.seconds:.0f} s, widths {widths}")
        del m
        write(final=False)
    write(final=True)
    log(f"done in {time.perf_counter() - t_start:.0f} s → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
