"""DISP-LLM on SmolLM2-135M (issue #18) next to SliceGPT, FASP and MoDeGPT at equal real size.

    nice -n 10 python benchmarks/disp.py --threads 2 --limit 30

Every row is one ``pipeline.compress`` of a deep copy of the same dense model at ``target_params``
= the share of decoder parameters removed (25 % and 50 % by default), then the evaluation of the
other quality benchmarks (``common.evaluate_row``): WikiText-2 test perplexity on the first
``--eval-windows`` windows, zero-shot accuracy on the first ``--limit`` items of each task, and the
share of the dense model's margin over chance that survives.

**DISP's training budget** is the point of this benchmark: the hypernetwork trains on
``--train-tokens`` tokens of WikiText-2 validation drawn as ``train_tokens / train_seqlen``
distinct sequences of ``--train-seqlen`` tokens (one pass, no text reused; same seed and sampler
as the calibration of the other methods, which get the shared 8 × 1024-token calibration of
``quality.py``), in batches of ``--cal-batch-size``.  The reference trains on about 41M tokens on
GPUs; a CPU can afford a few ten thousand, and the result file says how many and how long.  The
row records the training log (cross-entropy and the kept share of the Gumbel masks, first and
last tenth of the steps), the kept share of the learned *hard* masks (score > 0) against the
target, and the share the target solver then meets exactly on the one counter.

Resumable: each finished row is written to ``--out`` at once, and a rerun with the same settings
skips rows already there (``--fresh`` ignores them).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common import (
    ABOVE_CHANCE_WORDS,
    TASKS,
    above_chance,
    benchmark_parser,
    calibration_set,
    compress_row,
    evaluate_row,
    evaluation_windows,
    left_out_note,
    log,
    resume,
    rounded,
    setup,
    write_result,
    zs_of,
)
from slicekit.models import load_model

#: settings that must match for cached rows to be reused
CACHE_KEYS = ("model", "cal_dataset", "cal_split", "cal_nsamples", "cal_seqlen", "cal_batch_size", "seed",
              "eval_dataset", "eval_seqlen", "eval_windows", "limit", "tasks", "zs_batch_size", "train_tokens",
              "train_seqlen", "disp_lam")
#: where the paper's headline comparison sits (LLaMA-2-7B, 50 %: DISP 9.84 vs SliceGPT 24.82 WikiText-2 ppl)
PAPER = {"share": 0.5, "disp": 9.84, "slicegpt": 24.82}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = benchmark_parser("disp", __doc__, cal_nsamples=8, cal_seqlen=1024, eval_windows=4)
    p.add_argument("--shares", default="0.25,0.5", help="shares of decoder parameters removed (default %(default)s)")
    p.add_argument("--methods", default="disp,slicegpt,fasp,modegpt",
                   help="rows at each share, in the order they run (default %(default)s)")
    p.add_argument("--train-tokens", type=int, default=65_536, help="DISP training tokens (default %(default)s)")
    p.add_argument("--train-seqlen", type=int, default=256, help="DISP training sequence length (default %(default)s)")
    p.add_argument("--disp-lrs", default="",
                   help="extra DISP rows at these AdamW learning rates (default: only the method's own, 1e-3, "
                        "which is the paper's for ~10k steps; a CPU budget of a few hundred steps needs more)")
    p.add_argument("--disp-lam", type=float, default=None, help="DISP regulariser weight λ (default: the method's)")
    p.add_argument("--tasks", default=",".join(TASKS), help="zero-shot tasks (default %(default)s)")
    p.add_argument("--limit", type=int, default=100, help="zero-shot items per task (default %(default)s)")
    p.add_argument("--zeroshot-shares", default=None,
                   help="shares at which zero-shot runs too (default: all of --shares; '' = dense only)")
    p.add_argument("--zs-batch-size", type=int, default=8, help="lm-eval batch size (default %(default)s)")
    p.add_argument("--only", default="", help="comma-separated methods to run (default: all of --methods)")
    p.add_argument("--fresh", action="store_true", help="ignore rows cached in --out")
    p.add_argument("--redo", default="",
                   help="comma-separated row labels (e.g. 'disp lr=0.01') to recompute at every share even if "
                        "cached, after a change to the method")
    args = p.parse_args(argv)
    if args.zeroshot_shares is None:
        args.zeroshot_shares = args.shares
    if args.train_tokens < args.train_seqlen or args.train_seqlen < 2:
        p.error("--train-tokens must hold at least one sequence of --train-seqlen ≥ 2 tokens")
    return args


def disp_rows(args: argparse.Namespace) -> dict[str, float | None]:
    """DISP's row labels and their learning rates (None: the method's default)."""
    return {"disp": None, **{f"disp lr={float(x):g}": float(x) for x in args.disp_lrs.split(",") if x}}


def labels(args: argparse.Namespace) -> list[str]:
    """Every row label at a share, in the order they run (DISP's variants where ``disp`` is listed)."""
    out: list[str] = []
    for m in (m for m in args.methods.split(",") if m):
        out += list(disp_rows(args)) if m == "disp" else [m]
    return out


def disp_settings(args: argparse.Namespace, lr: float | None) -> dict[str, Any]:
    """DISP's config settings besides the target: one pass over the training sequences."""
    out: dict[str, Any] = {"train_tokens": args.train_tokens}
    if lr is not None:
        out["lr"] = lr
    if args.disp_lam is not None:
        out["lam"] = args.disp_lam
    return out


def training_args(args: argparse.Namespace) -> argparse.Namespace:
    """The calibration request of DISP's training text (recorded in its row's report)."""
    ns = argparse.Namespace(**vars(args))
    ns.cal_nsamples = args.train_tokens // args.train_seqlen
    ns.cal_seqlen = args.train_seqlen
    return ns


# ---------------------------------------------------------------- tables


def build_document(rows: dict[str, dict[str, Any]], args: argparse.Namespace, command: str, cal_desc: str,
                   train_desc: str, eval_desc: str, n_windows: int) -> dict[str, Any]:
    tasks = args.tasks.split(",")
    shares = [float(s) for s in args.shares.split(",")]
    methods = labels(args)
    dense = rows.get("dense")
    zd = zs_of(dense) if dense else None
    tables: list[dict[str, Any]] = []
    notes: list[str] = []
    if dense is not None:
        d0 = dense["params"]["decoder"]
        cols = ["method", "target", "decoder params", "removed (real)", "total params", "WikiText-2 ppl",
                *[f"{t} ({zd.scores[t].metric})" for t in tasks], "zero-shot mean", "above-chance retained",
                "compress s", "peak RSS MiB"]
        body = []
        for key in ["dense"] + [f"{m}@{s:g}" for s in shares for m in methods]:
            r = rows.get(key)
            if r is None:
                continue
            zs = zs_of(r)
            body.append([r["name"], r["target"], r["params"]["decoder"], round(1 - r["params"]["decoder"] / d0, 4),
                         r["params"]["total"], round(r["ppl"], 2),
                         *[None if zs is None else round(zs.scores[t].score, 4) for t in tasks],
                         None if zs is None else round(zs.average(tasks), 4),
                         rounded(above_chance(zs, zd, tasks), 3) if key != "dense" else None,
                         rounded(r.get("seconds"), 1), rounded(r.get("rss_peak_mib"), 0)])
        tables.append({"title": f"SmolLM2-135M at equal real decoder size: WikiText-2 test ppl ({n_windows} × "
                                f"{args.eval_seqlen} tokens) and zero-shot accuracy (first {args.limit} items per task)",
                       "columns": cols, "rows": body})
        train = []
        for s, (label, lr) in ((s, x) for s in shares for x in disp_rows(args).items()):
            r = rows.get(f"{label}@{s:g}")
            if r is None or "training" not in r.get("summary", {}):
                continue
            t, target = r["summary"]["training"], 1 - s
            hard = r["summary"]["learned_kept_fraction"]
            train.append([label, s, r["settings"].get("lr", lr), r["settings"].get("noise_anneal", 0.0),
                          t["tokens"], t["steps"], args.train_seqlen, round(t["seconds"] / 60, 1),
                          round(t["tokens"] / t["seconds"], 1), round(t["ce_first"], 3), round(t["ce_last"], 3),
                          round(t["kept_first"], 4), round(t["kept_last"], 4), round(hard, 4), round(target, 4),
                          round(100 * (hard - target) / target, 2), round(r["summary"]["kept_fraction"], 4)])
        if train:
            tables.append({"title": "DISP training budget and where its masks ended",
                           "columns": ["row", "target", "lr", "noise anneal", "tokens", "steps", "seqlen", "training min",
                                       "tokens/s",
                                       "CE first", "CE last tenth", "kept (Gumbel) first", "kept (Gumbel) last tenth",
                                       "kept (hard masks)", "target kept", "hard vs target %",
                                       "kept after solver"],
                           "rows": train})
        notes += observations(rows, shares, methods, tasks, zd)
    notes += [
        f"DISP training text: {train_desc}, batches of {args.cal_batch_size} sequences "
        f"({args.train_tokens:,} tokens, one pass: every token seen once)",
        f"calibration (SliceGPT, FASP, MoDeGPT): {cal_desc}, batches of {args.cal_batch_size} — the settings of "
        "quality.py's and mlp_methods.py's results",
        f"perplexity: first {n_windows} windows × {args.eval_seqlen} tokens of {eval_desc}, token-level, the same "
        "windows for every row",
        f"zero-shot: slicekit.zeroshot.evaluate_tasks (lm-eval), 0-shot, first {args.limit} items of each task "
        f"from the local files (batch size {args.zs_batch_size}); " + ABOVE_CHANCE_WORDS
        + left_out_note(zd, tasks),
        "target = share of decoder parameters removed, met by every method against the one counter (SliceGPT: "
        "the constant width, a multiple of 8, whose real count with its shortcut matrices is closest); decoder "
        "params are the compressed model's real counts (DISP's index buffers are integers, not parameters)",
        "compress s includes DISP's training; peak RSS is the process's (it also holds the dense model)",
        "noise anneal: the final share of the training steps over which the Gumbel noise shrinks to zero "
        "(DISPConfig.noise_anneal, 0.25 by default since it was added; 0 = the paper's full noise throughout, as "
        "the rows made before it ran); with it the regulariser acts on the deterministic masks the surgery applies",
    ]
    return {"title": "DISP-LLM vs SliceGPT, FASP and MoDeGPT on SmolLM2-135M at equal real size (#18)",
            "command": command,
            "settings": {k: getattr(args, k) for k in (*CACHE_KEYS, "shares", "methods", "threads")},
            "tables": tables, "notes": notes, "plots": [], "raw": {"rows": rows}}


def observations(rows: dict[str, dict[str, Any]], shares: list[float], methods: list[str], tasks: list[str],
                 zd) -> list[str]:
    """Plain statements of what the numbers say, computed from them."""
    out = []
    for s in shares:
        got = {m: rows[f"{m}@{s:g}"] for m in methods if f"{m}@{s:g}" in rows}
        mine = [m for m in got if m.startswith("disp")]
        if not mine or len(got) < 2:
            continue
        ranked = sorted(got, key=lambda m: got[m]["ppl"])
        out.append(f"at {100 * s:g} % removed, perplexity ranks " + " < ".join(
            f"{m} {got[m]['ppl']:.1f}" for m in ranked))
        best = min(mine, key=lambda m: got[m]["ppl"])
        if "slicegpt" in got:
            ratio = got["slicegpt"]["ppl"] / got[best]["ppl"]
            line = f"SliceGPT / DISP perplexity at {100 * s:g} % (best DISP row, {best}): {ratio:.2f}"
            if abs(s - PAPER["share"]) < 1e-9:
                line += (f" (the paper, LLaMA-2-7B at 50 %: {PAPER['slicegpt'] / PAPER['disp']:.2f} = "
                         f"{PAPER['slicegpt']} / {PAPER['disp']})")
            out.append(line)
        for m in mine:
            r = got[m]
            if "training" not in r.get("summary", {}):
                continue
            hard, target = r["summary"]["learned_kept_fraction"], 1 - s
            within = abs(hard - target) <= 0.01 * target
            out.append(f"{m} at {100 * s:g} %: the learned hard masks keep {100 * hard:.2f} % of the decoder "
                       f"parameters against the target {100 * target:.2f} % — "
                       + ("within 1 %" if within else "NOT within 1 %") + " of the target; the target solver "
                       f"then keeps {100 * r['summary']['kept_fraction']:.2f} %")
    return out


# ---------------------------------------------------------------- run

def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    setup(args)
    out = Path(args.out)
    shares = [float(s) for s in args.shares.split(",")]
    only = {m for m in args.only.split(",") if m}
    lrs = disp_rows(args)
    rows: dict[str, dict[str, Any]] = {}
    raw, command = resume(out, args, CACHE_KEYS, "disp.py", argv)
    rows = raw.get("rows", rows)

    dense, tok = load_model(args.model)
    dense.eval()
    calset = calibration_set(args, tok)
    batches = calset.batches(args.cal_batch_size)
    targs = training_args(args)
    trainset = calibration_set(targs, tok)
    train_batches = trainset.batches(args.cal_batch_size)
    windows, eval_desc = evaluation_windows(args, tok)
    n_windows = int(windows.shape[0])

    def save() -> None:
        write_result(out, build_document(rows, args, command, calset.description, trainset.description, eval_desc,
                                         n_windows))

    if "dense" not in rows:
        log("[dense] evaluating")
        rows["dense"] = evaluate_row("dense", "dense", 0.0, dense, tok, windows, args)
        save()
    for share in shares:
        for label in labels(args):
            key = f"{label}@{share:g}"
            method = "disp" if label in lrs else label
            if (only and label not in only and method not in only) or key in rows:
                continue
            if method == "disp":
                row, _ = compress_row(label, method, share, disp_settings(args, lrs[label]), dense, tok,
                                      train_batches, windows, targs)
            else:
                row, _ = compress_row(method, method, share, {}, dense, tok, batches, windows, args)
            rows[key] = row
            save()
    save()
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
