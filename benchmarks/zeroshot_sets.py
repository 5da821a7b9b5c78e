"""Above-chance zero-shot retention of one model against the dense one, on task sets larger than
a benchmark's first-N items, from saved ``slicekit eval --save-json`` results.

Why a separate script: the recovery benchmark scores the first 500 items of each task, where the
95 % interval of above-chance retention is about ±0.1 wide, so a claim such as "retains 0.75"
cannot be settled there.  Scoring the full task sets (or thousands of items) takes hours on a CPU,
so it is done by ``slicekit eval`` runs that may go on in parallel, in several processes, over
different task subsets; this script joins their JSON files — one set for the dense model, one for
the compressed model, the same tasks and item counts in each — and reports the measure in both
readings the library offers (each task's primary metric, acc_norm where lm-eval defines it; and
plain acc on every task), each with its paired-bootstrap interval.

``--prefix-items N`` also reports the measure on the first N items of every task, recomputed from
the per-item outcomes: lm-eval's ``--limit N`` scores exactly those items, so the numbers must
agree with a benchmark run at ``--limit N`` (a consistency check of the larger evaluation).

    slicekit eval --model smollm2-135m --tasks piqa,arc_easy,winogrande --save-json dense_a.json
    slicekit eval --model smollm2-135m --tasks hellaswag --limit 2000 --save-json dense_b.json
    slicekit eval --model compressed/ --tasks piqa,arc_easy,winogrande --save-json model_a.json
    slicekit eval --model compressed/ --tasks hellaswag --limit 2000 --save-json model_b.json
    python benchmarks/zeroshot_sets.py --dense dense_a.json dense_b.json \\
        --model model_a.json model_b.json --label "compressed" --prefix-items 500 --out results/x.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from common import RESULTS, command_line, interval_text, log, rounded, write_result
from slicekit.errors import SlicekitError
from slicekit.zeroshot import MARGIN_Z, ZeroShotResult

READINGS = {"primary": "each task's primary metric (acc_norm on piqa, arc, hellaswag)",
            "acc": "plain acc on every task"}


def load_joined(paths: list[str]) -> ZeroShotResult:
    """One result holding the tasks of every file in ``paths`` (a task may appear in one only)."""
    joined: ZeroShotResult | None = None
    for path in paths:
        try:
            part = ZeroShotResult.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise SlicekitError(f"cannot read zero-shot result {path}: {err}") from err
        if joined is None:
            joined = dataclasses.replace(part, scores=dict(part.scores), limit=None)
            continue
        twice = set(joined.scores) & set(part.scores)
        if twice:
            raise SlicekitError(f"task(s) {', '.join(sorted(twice))} appear in more than one of {', '.join(paths)}")
        if (part.lm_eval_version, part.num_fewshot, part.seed) != (joined.lm_eval_version, joined.num_fewshot,
                                                                   joined.seed):
            raise SlicekitError(f"{path} was made with other lm-eval settings than {paths[0]}")
        joined.scores.update(part.scores)
        joined.seconds += part.seconds
    if joined is None:
        raise SlicekitError("no zero-shot result files given")
    return joined


def first_items(result: ZeroShotResult, n: int) -> ZeroShotResult:
    """``result`` restricted to the first ``n`` items of every task, recomputed from the per-item
    outcomes (standard errors as lm-eval computes them: the sample standard deviation / √n)."""

    def stats(text: str | None) -> tuple[float | None, float | None, str | None]:
        if text is None:
            return None, None, None
        cut = text[:n]
        p = cut.count("1") / len(cut)
        return p, math.sqrt(p * (1 - p) / max(len(cut) - 1, 1)), cut

    scores = {}
    for name, s in result.scores.items():
        if s.outcomes is None:
            raise SlicekitError(f"{name}: no per-item outcomes kept; cannot take its first {n} items")
        if s.items < n:
            raise SlicekitError(f"{name} has {s.items} items, fewer than --prefix-items {n}")
        primary, primary_se, outcomes = stats(s.outcomes)
        if s.metric == "acc_norm":
            acc, acc_se, acc_outcomes = stats(s.acc_outcomes)
            if acc is None:
                raise SlicekitError(f"{name}: no plain-acc outcomes kept; cannot take its first {n} items")
            scores[name] = dataclasses.replace(s, acc=acc, acc_stderr=acc_se, acc_norm=primary,
                                               acc_norm_stderr=primary_se, items=n, outcomes=outcomes,
                                               acc_outcomes=acc_outcomes)
        else:
            scores[name] = dataclasses.replace(s, acc=primary, acc_stderr=primary_se, items=n, outcomes=outcomes)
    return dataclasses.replace(result, scores=scores, limit=n)


def retention_rows(label: str, model: ZeroShotResult, dense: ZeroShotResult, items: str) -> list[list]:
    """One table row per reading: tasks averaged, point estimate, 95 % paired-bootstrap interval."""
    rows = []
    for metric, words in READINGS.items():
        tasks = model.above_chance_tasks(dense, metric)
        value = model.above_chance_retention(dense, tasks, metric=metric) if tasks else None
        interval = model.above_chance_interval(dense, tasks, metric=metric) if tasks else None
        rows.append([label, items, words, ", ".join(tasks) or "none", rounded(value, 4), interval_text(interval)])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", nargs="+", required=True, help="the dense model's slicekit eval JSON file(s)")
    p.add_argument("--model", nargs="+", required=True, help="the compressed model's JSON file(s), same tasks")
    p.add_argument("--label", required=True, help="the compressed model's name in the tables")
    p.add_argument("--prefix-items", type=int, default=None,
                   help="also report the first N items of every task (a check against --limit N runs)")
    p.add_argument("--eval-command", action="append", default=[],
                   help="a command that made an input file (recorded in the result; repeatable)")
    p.add_argument("--note", action="append", default=[], help="a note to record (repeatable)")
    p.add_argument("--out", default=str(RESULTS / "zeroshot_sets.json"), help="result JSON file")
    args = p.parse_args(argv)
    dense, model = load_joined(args.dense), load_joined(args.model)
    if set(dense.scores) != set(model.scores):
        raise SlicekitError(f"the dense files hold {', '.join(sorted(dense.scores))} but the model files hold "
                            f"{', '.join(sorted(model.scores))}")
    per_task = []
    for name, d in dense.scores.items():
        m = model.scores[name]
        per_task.append([name, d.items, rounded(d.chance, 4), rounded(d.acc, 4), rounded(d.acc_norm, 4),
                         rounded(m.acc, 4), rounded(m.acc_norm, 4), rounded(d.margin_z("acc"), 1),
                         rounded(d.margin_z("primary"), 1)])
    items = ", ".join(f"{n} {s.items}" for n, s in dense.scores.items())
    rows = retention_rows(args.label, model, dense, items)
    if args.prefix_items:
        rows += retention_rows(args.label, first_items(model, args.prefix_items),
                               first_items(dense, args.prefix_items), f"first {args.prefix_items} of each")
    left = {metric: [n for n in dense.scores if n not in model.above_chance_tasks(dense, metric)]
            for metric in READINGS}
    notes = [
        "'above-chance retained' = mean over tasks of (score − chance)/(dense − chance), in the reading named; "
        f"tasks where the dense model does not beat chance by {MARGIN_Z:g} standard errors in that reading are "
        "left out (" + "; ".join(f"{metric}: {', '.join(v) or 'none'}" for metric, v in left.items()) + "); "
        "interval: paired bootstrap over the items, 2,000 draws (ZeroShotResult.above_chance_interval)",
        f"lm-eval {dense.lm_eval_version}, {dense.num_fewshot}-shot, seed {dense.seed}; scoring took "
        f"{dense.seconds / 60:.0f} min (dense) and {model.seconds / 60:.0f} min ({args.label}), summed over "
        "the input runs",
        *args.note,
    ]
    if args.prefix_items:
        notes.append(f"'first {args.prefix_items} of each' recomputes both models' scores from the per-item "
                     f"outcomes of the same runs: the items lm-eval scores with --limit {args.prefix_items}")
    doc = {
        "title": f"Zero-shot above-chance retention on full task sets: {args.label}",
        "command": " && ".join([*args.eval_command, command_line("zeroshot_sets.py", argv)]),
        "settings": {"dense": args.dense, "model": args.model, "label": args.label,
                     "prefix_items": args.prefix_items},
        "tables": [
            {"title": "per task: accuracy of both models (z = the dense model's standard errors above chance)",
             "columns": ["task", "items", "chance", "dense acc", "dense acc_norm", "model acc", "model acc_norm",
                         "dense z (acc)", "dense z (primary)"],
             "rows": per_task},
            {"title": "above-chance retention in both readings, with 95 % paired-bootstrap intervals",
             "columns": ["model", "items", "reading", "tasks averaged", "above-chance retained", "95 % interval"],
             "rows": rows},
        ],
        "notes": notes,
        "raw": {"dense": dense.as_dict(), "model": model.as_dict()},
    }
    path = write_result(args.out, doc)
    for row in rows:
        log(f"{row[1]}: {row[2]}: {row[4]} ({row[5]}) over {row[3]}")
    log(f"wrote {path}")


if __name__ == "__main__":
    try:
        main()
    except SlicekitError as err:
        sys.exit(f"error: {err}")
