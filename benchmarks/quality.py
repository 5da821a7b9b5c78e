"""Quality per real parameter: every method × share of decoder parameters removed, on SmolLM2-135M.

    python benchmarks/quality.py [--methods slicegpt,modegpt,fasp] [--shares 0.1,0.2,0.25,0.3]

Every method gets the same target, ``target_params`` = the share of decoder parameters removed,
met by the pipeline against the one parameter counter (SliceGPT: the constant width whose real
count, shortcut matrices included, is closest).  Calibration: WikiText-2 validation (the train
split is not shipped), fixed seed; evaluation: the same first K windows of WikiText-2 test and of
the Brown corpus (out of domain) for every model.  Writes ``--out`` (results/quality.json; +
quality.png next to it, perplexity against decoder parameters: the Pareto front) and cost.json
next to it (compression wall time and peak memory of each method at 25 %).  Rerunning gives the
same perplexities: sampling is seeded and CPU float32 is deterministic; the script re-compresses
one point and checks it (the "determinism check" note).
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import torch

from common import (
    benchmark_parser,
    calibration_request,
    calibration_set,
    command_line,
    evaluation_windows,
    method_config,
    setup,
    write_result,
)
from slicekit.evaluate import perplexity_of_windows
from slicekit.methods import available_methods
from slicekit.models import count_parameters, load_model
from slicekit.pipeline import compress


def _ppl(model, windows) -> float:
    return math.exp(perplexity_of_windows(model, windows, progress=False)[0])


def main(argv: list[str] | None = None) -> None:
    ap = benchmark_parser("quality", __doc__.splitlines()[0], eval_windows=8)
    ap.add_argument("--methods", default=",".join(available_methods()))
    ap.add_argument("--shares", default="0.1,0.2,0.25,0.3")
    ap.add_argument("--ood-dataset", default="brown", help="the out-of-domain evaluation text (default %(default)s)")
    ap.add_argument("--append", action="store_true", help="keep rows of methods not rerun now")
    args = ap.parse_args(argv)
    setup(args)
    out = Path(args.out)
    torch.manual_seed(0)
    dense, tok = load_model(args.model)
    cal = calibration_request(args)
    calset = calibration_set(args, tok)
    batches, cal_desc = calset.batches(args.cal_batch_size), calset.description
    wiki, _ = evaluation_windows(args, tok)
    brown, _ = evaluation_windows(args, tok, args.ood_dataset)
    p0 = count_parameters(dense)
    rows = {("dense", 0.0): ["dense", 0.0, 0.0, p0["total"], p0["non_embedding"], p0["decoder"],
                              _ppl(dense, wiki), _ppl(dense, brown), None, None]}
    cost = {}
    if args.append and out.exists():
        for r in json.loads(out.read_text())["tables"][0]["rows"]:
            rows.setdefault((r[0], r[1]), r)
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        for share in [float(s) for s in args.shares.split(",")]:
            m = copy.deepcopy(dense)
            config = method_config(method, share)
            report = compress(m, tok, method, config, cal, progress=False, batches=batches)
            pc = report.params_compressed
            achieved = 1 - pc["decoder"] / p0["decoder"]
            row = [method, share, round(achieved, 4), pc["total"], pc["non_embedding"], pc["decoder"],
                   _ppl(m, wiki), _ppl(m, brown), round(report.measurement.seconds, 1),
                   round(report.measurement.rss_peak / 2**20)]
            rows[(method, share)] = row
            print(row, file=sys.stderr, flush=True)
            if share == 0.25:
                cost[method] = [method, round(report.measurement.seconds, 1), round(report.measurement.rss_before / 2**20),
                                round(report.measurement.rss_peak / 2**20), round(report.measurement.rss_added / 2**20)]
            del m
    notes = [f"calibration: {cal_desc}",
             f"evaluation: first {wiki.shape[0]} windows × {args.eval_seqlen} tokens of WikiText-2 test and of Brown "
             f"({wiki.shape[0] * (args.eval_seqlen - 1)} scored tokens each); the full WikiText-2 test set has "
             f"{_all_windows(args, tok)} windows",
             "target = share of decoder-layer parameters removed (every method's target_params, met against the "
             "one parameter counter); achieved = real share (SliceGPT: the width whose real count incl. shortcut "
             "matrices is closest); totals include SliceGPT's untied LM head"]
    if args.append and out.exists():  # keep the determinism check of an earlier run
        notes += [n for n in json.loads(out.read_text()).get("notes", []) if n.startswith("determinism check")]
    if methods and "slicegpt" in methods:  # determinism: recompress one point and compare
        m = copy.deepcopy(dense)
        compress(m, tok, "slicegpt", method_config("slicegpt", 0.25), cal, progress=False, batches=batches)
        again = _ppl(m, wiki)
        first = rows[("slicegpt", 0.25)][6] if ("slicegpt", 0.25) in rows else None
        notes.append(f"determinism check: SliceGPT at 0.25 recompressed gives WikiText-2 ppl {again!r} vs {first!r} "
                     f"({'identical' if again == first else 'DIFFERENT'})")
    ordered = sorted(rows.values(), key=lambda r: (r[0] != "dense", r[0], r[1]))
    cols = ["method", "target share", "achieved share", "params total", "params non-emb", "params decoder",
            "WikiText-2 ppl", "Brown ppl", "compress s", "peak RSS MiB"]
    command = command_line("quality.py", argv)
    doc = {"title": "Quality per parameter (SmolLM2-135M)", "command": command,
           "settings": vars(args), "tables": [{"title": "perplexity against real parameter counts",
                                               "columns": cols, "rows": ordered}],
           "notes": notes, "plots": ["quality.png"]}
    _plot(ordered, out.parent / "quality.png")
    write_result(out, doc)
    if cost:
        cost_path = out.parent / "cost.json"
        merged = {}
        if args.append and cost_path.exists():
            merged = {r[0]: r for r in json.loads(cost_path.read_text())["tables"][0]["rows"]}
        merged.update(cost)
        write_result(cost_path, {
            "title": "Compression cost at 25 % (SmolLM2-135M, CPU)",
            "command": command,
            "settings": {"calibration": cal_desc},
            "tables": [{"title": "wall time and memory of compression alone (calibration sampling excluded)",
                        "columns": ["method", "seconds", "RSS before MiB", "peak RSS MiB", "added MiB"],
                        "rows": list(merged.values())}],
            "notes": ["measured in the quality run on a shared 2-core machine: compare ratios, not absolutes"]})
    print("done", file=sys.stderr)


def _all_windows(args, tok) -> int:
    """How many windows the whole evaluation split has (for the notes)."""
    from slicekit.data import load_text
    from slicekit.evaluate import eval_windows

    return int(eval_windows(tok, load_text(args.eval_dataset, purpose="eval"), args.eval_seqlen).shape[0])


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, col, name in ((axes[0], 6, "WikiText-2 test"), (axes[1], 7, "Brown")):
        by = {}
        for r in rows:
            by.setdefault(r[0], []).append((r[5] / 1e6, r[col]))
        dense = by.pop("dense", [])
        for method, pts in sorted(by.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        if dense:
            ax.scatter([dense[0][0]], [dense[0][1]], marker="*", s=150, color="k", label="dense", zorder=5)
        ax.set_xlabel("decoder parameters (millions, real)")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
