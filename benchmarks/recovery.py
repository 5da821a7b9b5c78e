"""Recovery training after compression on SmolLM2-135M (issue #14): every method at 25 % and 50 %
of decoder parameters removed, before and after a distillation from the dense model on Brown.

    nice -n 10 python benchmarks/recovery.py --threads 2 --limit 30

Every row is one ``pipeline.compress`` of a deep copy of the same dense model at ``target_params``
= the share of decoder parameters removed (met against the one parameter counter; SliceGPT: the
constant width whose real count, shortcut matrices included, is closest), evaluated, then trained
in place by :func:`slicekit.recover.recover` with the dense model as teacher, and evaluated again:

* WikiText-2 test perplexity on the first ``--eval-windows`` windows (those of ``quality.py``);
* Brown test perplexity on its first ``--eval-windows`` windows: Brown's test split is its first
  50 texts and recovery reads the other 450 (``slicekit.data``), so neither evaluation overlaps
  the recovery text; Brown after recovery is *in-domain* (same corpus, other texts), WikiText-2
  is not;
* zero-shot accuracy (lm-eval, local task files, first ``--limit`` items of each task) and the
  mean share of the dense model's margin over chance that survives, over the tasks where the
  dense model beats chance.

"gap closed" is ``1 − (ppl_after/dense − 1)/(ppl_before/dense − 1)``: issue #14's bar asks for at
least half on WikiText-2 for the best method at 25 %, within 30 minutes of recovery on this CPU.
Recovery settings (``--rec-*``) are the same for every row and recorded in the file, with each
row's measured tokens/s and minutes.

Resumable: each finished row is written to ``--out`` at once, and a rerun with the same settings
skips rows already there (``--fresh`` ignores them, ``--redo`` recomputes the named rows).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from pathlib import Path
from typing import Any

from common import (
    ABOVE_CHANCE_WORDS,
    TASKS,
    VARIANTS,
    above_chance,
    above_chance_interval,
    benchmark_parser,
    calibration_request,
    calibration_set,
    evaluate_row,
    evaluation_windows,
    interval_text,
    left_out_note,
    log,
    method_config,
    perplexity,
    resume,
    rounded,
    same_settings,
    scored_tasks,
    scrub,
    setup,
    write_result,
    zs_of,
)
from slicekit.models import load_model

#: settings that must match for cached rows to be reused
CACHE_KEYS = ("model", "cal_dataset", "cal_split", "cal_nsamples", "cal_seqlen", "cal_batch_size", "seed",
              "eval_dataset", "eval_seqlen", "eval_windows", "limit", "tasks", "zs_batch_size", "rec_dataset",
              "rec_tokens", "rec_seqlen", "rec_batch_size", "rec_mode", "rec_lr", "rec_precision", "rec_loss",
              "rec_hidden_distill", "rec_sample_tokens", "rec_train_embeddings",
              "disp_train_tokens")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = benchmark_parser("recovery", __doc__, cal_nsamples=8, cal_seqlen=1024, eval_windows=4)
    p.add_argument("--methods", default="fasp,modegpt,slicegpt,prunenet random,dotresize,disp",
                   help=f"rows at each share, in order; any of {', '.join(VARIANTS)} (default %(default)s)")
    p.add_argument("--shares", default="0.25,0.5", help="shares of decoder parameters removed (default %(default)s)")
    g = p.add_argument_group("recovery (slicekit.recover.RecoverConfig)")
    g.add_argument("--rec-dataset", default="brown",
                   help="recovery text (default %(default)s: its train split); 'teacher' samples it from the dense "
                        "model, and the sampling time counts in the row's recovery minutes")
    g.add_argument("--rec-sample-tokens", type=int, default=None,
                   help="with --rec-dataset teacher: tokens to sample (default: --rec-tokens, one epoch)")
    g.add_argument("--rec-tokens", type=int, default=65_536, help="token budget per row (default %(default)s)")
    g.add_argument("--rec-seqlen", type=int, default=512, help="default %(default)s")
    g.add_argument("--rec-batch-size", type=int, default=4, help="default %(default)s")
    g.add_argument("--rec-mode", default="full", choices=("lora", "full"), help="default %(default)s")
    g.add_argument("--rec-lr", type=float, default=2e-4, help="default %(default)s")
    g.add_argument("--rec-precision", default="auto", choices=("auto", "fp32", "bf16"), help="default %(default)s")
    g.add_argument("--rec-loss", default="distill", choices=("distill", "ce"), help="default %(default)s")
    g.add_argument("--rec-train-embeddings", action="store_true",
                   help="full mode: train the token embeddings (and a head tied to them) too")
    g.add_argument("--rec-hidden-distill", type=float, default=0.0,
                   help="weight of the decoder-layer hidden-state term (methods that keep the stream's basis; "
                        "default %(default)s)")
    p.add_argument("--disp-train-tokens", type=int, default=32_768,
                   help="DISP hypernetwork training tokens (sequences of 128; default %(default)s)")
    p.add_argument("--tasks", default=",".join(TASKS), help="zero-shot tasks (default %(default)s)")
    p.add_argument("--limit", type=int, default=30, help="zero-shot items per task (default %(default)s)")
    p.add_argument("--zs-batch-size", type=int, default=8, help="lm-eval batch size (default %(default)s)")
    p.add_argument("--dense-from", default=None,
                   help="take the dense row from this result file of recovery.py when its evaluation settings "
                        "(model, WikiText-2/Brown windows, tasks, --limit) are this run's: the dense model does "
                        "not depend on the recovery settings, and at 500 items a task it costs 14 min")
    p.add_argument("--before-from", default=None,
                   help="take each row's before-recovery evaluation from this result file of recovery.py when it "
                        "was compressed and evaluated with this run's settings and the freshly compressed model "
                        "has the same parameter count and WikiText-2 perplexity (checked, 40 s); otherwise the "
                        "row is evaluated as usual.  Compression is deterministic, and at 500 items a task the "
                        "zero-shot evaluation costs 11 min a row")
    p.add_argument("--save-models", default=None, metavar="DIR",
                   help="save each recovered model to DIR/<label>-<share> (slicekit.save, atomic), so that it can "
                        "be evaluated further (e.g. `slicekit eval --tasks … --limit 1000`) without training again")
    p.add_argument("--fresh", action="store_true", help="ignore rows cached in --out")
    p.add_argument("--redo", default="", help="comma-separated row labels to recompute even if cached")
    args = p.parse_args(argv)
    args.zeroshot_shares = args.shares  # zero-shot at every share (common.wants_zeroshot)
    unknown = [m for m in args.methods.split(",") if m and m not in VARIANTS]
    if unknown:
        p.error(f"unknown --methods {unknown}: use any of {', '.join(VARIANTS)}")
    return args


def rec_config(args: argparse.Namespace, method: str | None = None):
    """The recovery settings of a row: the hidden-state term only where the compressed stream is
    still in the dense model's basis (not SliceGPT's rotated one)."""
    from slicekit.recover import RecoverConfig

    hidden = 0.0 if method == "slicegpt" else args.rec_hidden_distill
    return RecoverConfig(dataset=args.rec_dataset, seqlen=args.rec_seqlen, batch_size=args.rec_batch_size,
                         tokens=args.rec_tokens, mode=args.rec_mode, lr=args.rec_lr, precision=args.rec_precision,
                         loss=args.rec_loss, hidden_distill=hidden, sample_tokens=args.rec_sample_tokens,
                         sample_length=args.rec_seqlen, train_embeddings=args.rec_train_embeddings)


def evaluate(name: str, method: str, share: float, model, tok, windows, brown, args, report=None) -> dict[str, Any]:
    row = evaluate_row(name, method, share, model, tok, windows, args, report)
    t0 = time.perf_counter()
    row["brown_ppl"] = perplexity(model, brown)
    row["brown_seconds"] = time.perf_counter() - t0
    return row


def run_row(label: str, share: float, dense, tok, batches, disp_batches, windows, brown, args) -> dict[str, Any]:
    from slicekit.pipeline import compress
    from slicekit.recover import recover

    method, settings = VARIANTS[label]
    if method == "disp":
        settings = {**settings, "train_tokens": args.disp_train_tokens}
    model = copy.deepcopy(dense)
    gc.collect()
    log(f"[{label} @ {share:g}] compressing")
    report = compress(model, tok, method, method_config(method, share, **settings), calibration_request(args),
                      progress=False, batches=disp_batches if method == "disp" else batches)
    before = None
    if args.before_from:
        before = before_row_from(Path(args.before_from), args, f"{label}@{share:g}", model, windows)
    if before is None:
        before = evaluate(label, method, share, model, tok, windows, brown, args, report)
        before["settings"] = {k: v for k, v in before["settings"].items() if k not in ("save_policy", "policy")}
    log(f"[{label} @ {share:g}] before: ppl {before['ppl']:.2f}, brown {before['brown_ppl']:.2f}; recovering")
    rec = recover(model, tok, rec_config(args, method), teacher=dense, progress=False)
    if args.save_models:
        from slicekit.checkpoint import save as save_model

        where = Path(args.save_models) / f"{label.replace(' ', '-')}-{share:g}"
        save_model(model, tok, str(where), info={"recovery": rec.summary()})
        log(f"[{label} @ {share:g}] saved the recovered model to {where}")
    after = evaluate(label, method, share, model, tok, windows, brown, args)
    curve = rec.loss_curve
    tenth = max(1, len(curve) // 10)
    summary = {**rec.summary(), "hidden_distill": rec.settings["hidden_distill"],
               "setup_seconds": rec.setup_seconds, "trainable_params": rec.trainable_params,
               "loss_first_tenth": sum(c["loss"] for c in curve[:tenth]) / tenth,
               "loss_last_tenth": sum(c["loss"] for c in curve[-tenth:]) / tenth}
    log(f"[{label} @ {share:g}] after: ppl {after['ppl']:.2f}, brown {after['brown_ppl']:.2f} "
        f"({rec.tokens} tokens in {rec.seconds / 60:.1f} min, {rec.tokens_per_s:.0f} tok/s"
        + (f"; sampling the text took {rec.sample_seconds / 60:.1f} min" if rec.sample_seconds else "") + ")")
    del model
    gc.collect()
    return {"label": label, "method": method, "target": share, "before": before, "after": after,
            "recovery": summary}


# ---------------------------------------------------------------- tables


def budget_seconds(rec: dict[str, Any]) -> float:
    """A row's recovery time against the budget: the training loop, plus the sampling of the text
    when it came from the teacher (a cost a corpus does not have, so it counts)."""
    return rec["train_seconds"] + rec.get("sample_seconds", 0.0)


def ran_in(rows: dict[str, Any]) -> str:
    """What precision the rows' recovery really ran in, where the note's setting does not say it.

    Why: ``auto`` picks bf16 or float32 by the CPU, and a row resumed on another machine can differ,
    so the note names what the reports recorded rather than what was asked for.
    """
    used = sorted({r["recovery"]["precision"] for r in rows.values() if isinstance(r, dict) and "recovery" in r})
    return f" (ran in {' and '.join(used)})" if used else ""


def gap_closed(before: float, after: float, dense: float) -> float:
    """Share of the perplexity gap to the dense model that recovery closed (1 = all of it)."""
    return 1 - (after / dense - 1) / (before / dense - 1)


def build_document(rows: dict[str, Any], args: argparse.Namespace, command: str, cal_desc: str, eval_desc: str,
                   brown_desc: str, n_windows: int) -> dict[str, Any]:
    tasks = args.tasks.split(",")
    shares = [float(s) for s in args.shares.split(",")]
    labels = [m for m in args.methods.split(",") if m]
    dense = rows.get("dense")
    tables: list[dict[str, Any]] = []
    notes: list[str] = []
    zd = zs_of(dense) if dense is not None else None
    if dense is not None:
        d0 = dense["params"]["decoder"]
        cols = ["method", "target", "removed (real)", "total params", "WikiText-2 ppl before", "after", "gap closed",
                "Brown ppl before", "after (in-domain)" if args.rec_dataset == "brown" else "after",
                "zero-shot mean before", "after",
                "above-chance retained before", "after", "after, 95 % interval", "after, plain acc",
                "recovery tokens", "recovery min", "tokens/s"]
        body = [["dense", 0, 0, dense["params"]["total"], rounded(dense["ppl"], 2), None, None,
                 rounded(dense["brown_ppl"], 2), None, rounded(zd.average(tasks), 4), None, None, None, None, None,
                 None, None, None]]
        for s in shares:
            for label in labels:
                r = rows.get(f"{label}@{s:g}")
                if r is None:
                    continue
                b, a, rec = r["before"], r["after"], r["recovery"]
                zb, za = zs_of(b), zs_of(a)
                body.append([label, s, round(1 - b["params"]["decoder"] / d0, 4), b["params"]["total"],
                             rounded(b["ppl"], 2), rounded(a["ppl"], 2), rounded(gap_closed(b["ppl"], a["ppl"], dense["ppl"]), 3),
                             rounded(b["brown_ppl"], 2), rounded(a["brown_ppl"], 2),
                             rounded(zb.average(tasks), 4) if zb else None, rounded(za.average(tasks), 4) if za else None,
                             rounded(above_chance(zb, zd, tasks), 3), rounded(above_chance(za, zd, tasks), 3),
                             interval_text(above_chance_interval(za, zd, tasks)),
                             rounded(above_chance(za, zd, tasks, "acc"), 3), rec["tokens"], rounded(budget_seconds(rec) / 60, 1), rounded(rec["tokens_per_s"], 1)])
        tables.append({"title": f"SmolLM2-135M before and after recovery: WikiText-2 test ppl ({n_windows} × "
                                f"{args.eval_seqlen} tokens), Brown test ppl, zero-shot (first {args.limit} items per task)",
                       "columns": cols, "rows": body})
        per_task = []
        for key in ["dense"] + [f"{m}@{s:g}" for s in shares for m in labels]:
            r = rows.get(key)
            if r is None:
                continue
            for stage, row in (("", r),) if key == "dense" else (("before", r["before"]), ("after", r["after"])):
                z = zs_of(row)
                if z is not None:
                    per_task.append([key.replace("@", " @ "), stage, *[round(z.scores[t].score, 4) for t in tasks]])
        tables.append({"title": "zero-shot accuracy per task (acc_norm where lm-eval reports it)",
                       "columns": ["row", "stage", *tasks], "rows": per_task})
        notes += observations(rows, shares, labels, dense, zd, tasks)
    rc = rec_config(args)
    notes += [
        f"recovery: slicekit.recover.recover, {rc.mode} fine-tuning"
        + (" (the token embeddings and the head tied to them trained too)" if rc.train_embeddings else "")
        + f", loss {args.rec_loss} "
        f"({'KL to the dense model, T = 1' if args.rec_loss == 'distill' else 'next-token CE'}"
        + (f" + {args.rec_hidden_distill} × relative MSE of every decoder layer's output, except for SliceGPT, whose "
           "stream is rotated" if args.rec_hidden_distill else "")
        + f"), AdamW lr {rc.lr}, "
        f"{int(rc.warmup * 100)} % warm-up then cosine, {rc.tokens:,} tokens of {data_words(args, rc)} "
        f"per row in batches of {rc.batch_size} × {rc.seqlen}, precision {args.rec_precision}"
        + (" (bf16 autocast where the CPU multiplies bf16 natively)" if args.rec_precision == "auto" else "")
        + f"{ran_in(rows)}, seed 42; the same for every row",
        f"calibration: {cal_desc}, batches of {args.cal_batch_size}; DISP trains its hypernetwork on "
        f"{args.disp_train_tokens:,} tokens of the same text (sequences of 128) at lr 1e-2",
        f"perplexity: first {n_windows} windows × {args.eval_seqlen} tokens of {eval_desc} and of {brown_desc}, "
        "token-level, the same windows for every row",
        f"zero-shot: slicekit.zeroshot.evaluate_tasks (lm-eval), 0-shot, first {args.limit} items of each task; "
        + ABOVE_CHANCE_WORDS + left_out_note(zd, tasks) + "; 'plain acc' is the same measure in acc on every "
        "task (the form issue #14's bar is written in)"
        + (", over the same tasks" if zd is not None and scored_tasks(zd, tasks, "acc") == scored_tasks(zd, tasks)
           else left_out_note(zd, tasks, "acc"))
        + "; its 95 % interval is a paired bootstrap over the items (2,000 draws: "
        "both models scored on the same resampled items, tasks resampled independently; "
        "ZeroShotResult.above_chance_interval), empty for rows saved before per-item outcomes were kept",
        "gap closed = 1 − (after/dense − 1)/(before/dense − 1) on WikiText-2; recovery min is the training loop's "
        "wall time (teacher forward included)"
        + (", plus the time spent sampling the text from the teacher" if rc.teacher_text else "")
        + " on this shared machine",
    ]
    if dense is not None and dense.get("taken_from"):
        notes.append(f"the dense row was evaluated for {dense['taken_from']} with this file's evaluation settings "
                     "and taken from there (--dense-from): the dense model does not depend on recovery settings")
    reused = sorted({r["before"]["taken_from"] for r in rows.values() if (r.get("before") or {}).get("taken_from")})
    if reused:
        notes.append(f"before-recovery evaluations marked taken_from were made for {', '.join(reused)} with this "
                     "file's compression and evaluation settings and reused (--before-from), after checking that "
                     "the model compressed here has the same parameter count and WikiText-2 perplexity "
                     "(ppl_check); compression is deterministic")
    who = "every method" if len(labels) > 2 else " and ".join(labels)
    on = ("text sampled from the dense model" if rc.teacher_text
          else "Brown" if args.rec_dataset == "brown" else scrub(args.rec_dataset))
    return {"title": f"Recovery after compression on SmolLM2-135M: {who} before and after distillation on {on} (#14)",
            "command": command,
            "settings": {k: getattr(args, k) for k in (*CACHE_KEYS, "shares", "methods", "threads")},
            "tables": tables, "notes": notes, "plots": [], "raw": {"rows": rows}}


def data_words(args: argparse.Namespace, rc) -> str:
    """What the recovery text was, in the words of a note."""
    if rc.teacher_text:
        sampled = rc.sample_tokens or rc.tokens
        return (f"text sampled from the dense model ({sampled:,} tokens in samples of {rc.sample_length} from BOS, "
                f"temperature {rc.sample_temperature:g}, top-p {rc.sample_top_p:g}; "
                f"{rc.tokens / sampled:.2g} epochs)")
    return f"{args.rec_dataset} (train split)"


def observations(rows, shares, labels, dense, zd, tasks) -> list[str]:
    """Plain statements computed from the numbers: the issue's bar, per share."""
    out = []
    for s in shares:
        got = {m: rows[f"{m}@{s:g}"] for m in labels if f"{m}@{s:g}" in rows}
        if not got:
            continue
        best = min(got, key=lambda m: got[m]["after"]["ppl"])
        r = got[best]
        closed = gap_closed(r["before"]["ppl"], r["after"]["ppl"], dense["ppl"])
        kept = above_chance(zs_of(r["after"]), zd, tasks)
        interval = above_chance_interval(zs_of(r["after"]), zd, tasks)
        kept_acc = above_chance(zs_of(r["after"]), zd, tasks, "acc")
        interval_acc = above_chance_interval(zs_of(r["after"]), zd, tasks, "acc")
        out.append(f"at {100 * s:g} % removed the best row after recovery is {best}: WikiText-2 ppl "
                   f"{r['before']['ppl']:.2f} → {r['after']['ppl']:.2f} (dense {dense['ppl']:.2f}), "
                   f"{100 * closed:.1f} % of the gap closed ({'≥' if closed >= 0.5 else '<'} 50 %), above-chance "
                   f"zero-shot retained {kept if kept is None else round(kept, 3)} "
                   f"({'≥' if kept is not None and kept >= 0.75 else '<'} 0.75"
                   + (f"; 95 % paired-bootstrap interval {interval[0]:.2f} to {interval[1]:.2f}, "
                      + ("which lies wholly above 0.75" if interval[0] >= 0.75 else
                         "which lies wholly below 0.75" if interval[1] < 0.75 else "which contains 0.75")
                      if interval else "")
                   + ")" + (f"; in plain acc on every task {kept_acc:.3f}" if kept_acc is not None else "")
                   + (f" (interval {interval_acc[0]:.2f} to {interval_acc[1]:.2f})" if interval_acc else "")
                   + f"; in {budget_seconds(r['recovery']) / 60:.1f} min of recovery")
    return out


# ---------------------------------------------------------------- run

#: settings the dense row depends on (the rest concern compression and recovery)
DENSE_KEYS = ("model", "eval_dataset", "eval_seqlen", "eval_windows", "limit", "tasks", "zs_batch_size")


#: settings a row's compressed model and its before-recovery evaluation depend on
BEFORE_KEYS = (*DENSE_KEYS, "cal_dataset", "cal_split", "cal_nsamples", "cal_seqlen", "cal_batch_size", "seed",
               "disp_train_tokens")


def before_row_from(path: Path, args: argparse.Namespace, key: str, model, windows) -> dict[str, Any] | None:
    """Row ``key``'s before-recovery evaluation from another result file of this script, or None.

    Reused only when that file compressed and evaluated with this run's settings and the model
    just compressed here is the same one: equal parameter counts and WikiText-2 perplexity within
    1e-5 relative (the check costs one perplexity pass; the zero-shot pass it saves costs ~20×
    more).  Anything else -- no such file or row, other settings, another model -- returns None and
    the row is evaluated as usual, so a stale file can cost time but never report a wrong number."""
    from slicekit.models import count_parameters

    try:
        doc = json.loads(path.read_text())
        before = doc["raw"]["rows"][key]["before"]
        ppl = float(before["ppl"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        log(f"[{key}] --before-from {path}: no usable row ({type(err).__name__}: {err}); evaluating")
        return None
    if not same_settings(doc.get("settings", {}), args, BEFORE_KEYS):
        log(f"[{key}] --before-from {path} compressed or evaluated with other settings; evaluating")
        return None
    params = count_parameters(model)
    fresh = perplexity(model, windows)
    if params != before.get("params") or abs(fresh - ppl) > 1e-5 * ppl:
        log(f"[{key}] --before-from {path}: another model (ppl {fresh:.4f} vs {ppl:.4f}, "
            f"params {params['total']:,} vs {(before.get('params') or {}).get('total')}); evaluating")
        return None
    log(f"[{key}] before-recovery evaluation taken from {path} (same settings, ppl {fresh:.4f} checked)")
    return {**before, "taken_from": path.name, "ppl_check": fresh}


def dense_row_from(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The dense row of another result file of this script, refused unless it was evaluated
    exactly as this run evaluates (same model, windows, tasks and item limit)."""
    try:
        doc = json.loads(path.read_text())
        row = doc["raw"]["rows"]["dense"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"--dense-from {path}: no dense row there ({err})") from err
    if not same_settings(doc.get("settings", {}), args, DENSE_KEYS):
        theirs = {k: doc.get("settings", {}).get(k) for k in DENSE_KEYS}
        raise SystemExit(f"--dense-from {path} was evaluated with other settings: {theirs}")
    log(f"[dense] taken from {path} (same evaluation settings)")
    return {**row, "taken_from": path.name}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    setup(args)
    out = Path(args.out)
    shares = [float(s) for s in args.shares.split(",")]
    labels = [m for m in args.methods.split(",") if m]
    raw, command = resume(out, args, CACHE_KEYS, "recovery.py", argv)
    rows: dict[str, Any] = raw.get("rows", {})

    dense, tok = load_model(args.model)
    dense.eval()
    calset = calibration_set(args, tok)
    batches = calset.batches(args.cal_batch_size)
    dargs = argparse.Namespace(**vars(args))
    dargs.cal_nsamples, dargs.cal_seqlen = args.disp_train_tokens // 128, 128
    disp_batches = calibration_set(dargs, tok).batches(args.cal_batch_size) if "disp" in labels else None
    windows, eval_desc = evaluation_windows(args, tok)
    brown, brown_desc = evaluation_windows(args, tok, "brown")

    def save() -> None:
        write_result(out, build_document(rows, args, command, calset.description, eval_desc, brown_desc,
                                         int(windows.shape[0])))

    if "dense" not in rows and args.dense_from:
        rows["dense"] = dense_row_from(Path(args.dense_from), args)
    if "dense" not in rows:
        log("[dense] evaluating")
        rows["dense"] = evaluate("dense", "dense", 0.0, dense, tok, windows, brown, args)
        save()
    for share in shares:
        for label in labels:
            key = f"{label}@{share:g}"
            if key in rows:
                continue
            rows[key] = run_row(label, share, dense, tok, batches, disp_batches, windows, brown, args)
            save()
    save()
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
