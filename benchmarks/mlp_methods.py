"""MLP-width methods on SmolLM2-135M (issues #16, #17): PruneNet and DOTResize next to their
baselines, FASP and SliceGPT, at 10 / 20 / 25 / 30 % of decoder parameters removed.

    nice -n 10 python benchmarks/mlp_methods.py --threads 2 --limit 100

Every row is one ``pipeline.compress`` of a deep copy of the same dense model at
``target_params`` = the share of decoder parameters removed (met against the one parameter
counter; SliceGPT: the constant width whose real count, shortcut matrices included, is closest),
then the same evaluation:

* WikiText-2 test perplexity on the first ``--eval-windows`` windows of ``--eval-seqlen`` tokens
  (the windows of ``quality.py``);
* zero-shot accuracy through :func:`slicekit.zeroshot.evaluate_tasks` (lm-eval, local task files)
  on the first ``--limit`` items of each task, and the mean over tasks of the share of the dense
  model's margin over chance that survives, ``(score − chance)/(dense − chance)`` (score: acc_norm
  where lm-eval defines it, else acc);
* compression wall time and memory: ``pipeline.compress``'s measurement (process RSS sampled
  every 5 ms; peak, and peak minus the RSS just before), calibration sampling excluded.

The calibration-using methods (DOTResize, FASP, SliceGPT) get the same calibration ids, drawn once
with the shared settings of ``quality.py`` (WikiText-2 validation, documents, seed 42); PruneNet
reads none.  Rows:

* ``prunenet policy / random / magnitude``: the learned policy and the two calibration-free
  baselines at the same widths (issue #16);
* ``dotresize merge / delete``: merging through the transport plan, and the library's deletion
  baseline (same target rule); DOTResize runs layer by layer on inputs that carry the earlier
  layers' compression, so deletion's later layers see other activations and may keep other
  neurons.  The script therefore reads the neurons each run kept from the weights, reports the
  overlap, and adds ``dotresize delete, merge's neurons`` — deletion of exactly the neurons the
  merge kept — which isolates what merging adds (issue #17);
* ``fasp``, ``slicegpt``: the calibration-based references at the same real size.

Extra checks: the policy learned at 25 % is saved and reused at 30 % without retraining (time and
perplexity against learning afresh at 30 %); PruneNet at 25 % is compressed a second time with
the same seed and the weights compared bit for bit (SHA-256 of every tensor).

Resumable: each finished row is written to ``--out`` at once (``raw.rows``), and a rerun with the
same settings skips rows already there (``--fresh`` ignores them).  The learned policy is kept in
``--work-dir`` (outside the repository); if it is gone, the reuse row retrains it first (same seed,
so the same policy) without timing that.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

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
    method_config,
    resume,
    rounded,
    setup,
    tensors_digest,
    wants_zeroshot,
    write_result,
    zs_of,
)
from slicekit.models import load_model
from slicekit.pipeline import compress

#: (row name, method, config settings besides target_params), in the order they run at each share
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("prunenet policy", "prunenet", {"selection": "policy"}),
    ("prunenet random", "prunenet", {"selection": "random"}),
    ("prunenet magnitude", "prunenet", {"selection": "magnitude"}),
    ("dotresize merge", "dotresize", {"merge": "merge"}),
    ("dotresize delete", "dotresize", {"merge": "delete"}),
    ("fasp", "fasp", {}),
    ("slicegpt", "slicegpt", {}),
]
SAME_CHOICE = "dotresize delete (merge's neurons)"
REUSE = "prunenet policy reused from 25 %"
REPEAT = "prunenet policy second run (same seed)"
#: settings that must match for cached rows to be reused
CACHE_KEYS = ("model", "cal_dataset", "cal_split", "cal_nsamples", "cal_seqlen", "cal_batch_size", "seed",
              "eval_dataset", "eval_seqlen", "eval_windows", "limit", "tasks", "zs_batch_size")


# ---------------------------------------------------------------- measurements

def weights_digest(model) -> str:
    """SHA-256 over every parameter and buffer: equal digests mean bit-identical models."""
    return tensors_digest(model.state_dict().items())


def kept_neurons(dense, model) -> list[list[int]]:
    """Per layer, the original indices of the MLP neurons ``model`` kept, read off the weights.

    Every method here keeps the up/gate rows of the neurons it keeps unchanged and in ascending
    order (``keep_mlp_neurons``), so a two-pointer walk over the first up matrix finds them."""
    from slicekit.arch import get_arch
    from slicekit.methods.common import mlp_up_weights

    spec = get_arch(dense.config)
    out = []
    for a, b in zip(spec.layer_list(dense), spec.layer_list(model), strict=True):
        w0, w1 = mlp_up_weights(a, spec)[0], mlp_up_weights(b, spec)[0]
        keep, j = [], 0
        for i in range(w0.shape[0]):
            if j < w1.shape[0] and torch.equal(w0[i], w1[j]):
                keep.append(i)
                j += 1
        if j != w1.shape[0]:
            raise RuntimeError(f"layer {len(out)}: the compressed rows are not rows of the original in order")
        out.append(keep)
    return out


def pack(kept: list[list[int]], width: int) -> list[str]:
    """Kept neurons as one hex bitmask per layer (compact in the result file while it is needed)."""
    return [format(sum(1 << i for i in keep) | (1 << width), "x") for keep in kept]


def unpack(packed: list[str]) -> list[list[int]]:
    out = []
    for h in packed:
        v = int(h, 16)
        out.append([i for i in range(v.bit_length() - 1) if v >> i & 1])
    return out


def overlap(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of kept neurons two selections have in common (over all layers)."""
    common = sum(len(set(x) & set(y)) for x, y in zip(a, b, strict=True))
    return common / max(1, sum(len(x) for x in a))


# ---------------------------------------------------------------- rows

# ---------------------------------------------------------------- tables


def _cells(row: dict[str, Any], dense: dict[str, Any], tasks: list[str]) -> list[Any]:
    d0 = dense["params"]["decoder"]
    dec = row["params"]["decoder"]
    zs, zd = zs_of(row), zs_of(dense)
    scores = [None if zs is None else round(zs.scores[t].score, 4) for t in tasks]
    return [row["name"], row["target"], dec, round(1 - dec / d0, 4), row["params"]["total"], round(row["ppl"], 2),
            *scores, None if zs is None else round(zs.average(tasks), 4), rounded(above_chance(zs, zd, tasks), 3),
            None if row.get("seconds") is None else round(row["seconds"], 1),
            None if row.get("cpu_seconds") is None else round(row["cpu_seconds"], 1),
            None if row.get("rss_peak_mib") is None else round(row["rss_peak_mib"]),
            None if row.get("rss_added_mib") is None else round(row["rss_added_mib"])]


def _quality_reference(args, rows: dict[str, dict[str, Any]], shares: list[float]) -> dict[str, Any] | None:
    """FASP and SliceGPT perplexities from ``results/quality.json`` at the sizes where this run has
    no row of its own — only when that file used the same calibration and windows (its dense
    perplexity is printed next to this run's so the match can be checked)."""
    path = Path(__file__).resolve().parent / "results" / "quality.json"
    if not path.exists():
        return None
    q = json.loads(path.read_text())
    st = q.get("settings", {})
    if any(st.get(k) != getattr(args, k) for k in ("cal_nsamples", "cal_seqlen", "eval_seqlen", "eval_windows")):
        return None
    table = q["tables"][0]
    col = {c: i for i, c in enumerate(table["columns"])}
    out = []
    for r in table["rows"]:
        method, share = r[col["method"]], float(r[col["target share"]])
        if method == "dense" or (method in ("fasp", "slicegpt") and share in shares
                                 and f"{method}@{share:g}" not in rows):
            out.append([method, share, r[col["params decoder"]], r[col["achieved share"]], r[col["WikiText-2 ppl"]],
                        r[col["compress s"]], r[col["peak RSS MiB"]]])
    if len(out) <= 1:
        return None
    dense = rows.get("dense")
    return {"title": f"FASP and SliceGPT from results/quality.json ({q.get('date')}, same calibration and windows; "
                     f"its dense ppl {out[0][4]:.4f}, this run's {dense['ppl'] if dense else float('nan'):.4f}) — "
                     "rows this run did not recompute",
            "columns": ["method", "target", "decoder params", "removed (real)", "WikiText-2 ppl", "compress s",
                        "peak RSS MiB"],
            "rows": out}


def build_document(rows: dict[str, dict[str, Any]], extra: dict[str, Any], args, command: str,
                   cal_desc: str, eval_desc: str, n_windows: int) -> dict[str, Any]:
    tasks = args.tasks.split(",")
    shares = sorted(float(s) for s in args.shares.split(","))
    dense = rows.get("dense")
    tables: list[dict[str, Any]] = []
    notes: list[str] = []
    zd = zs_of(dense) if dense is not None else None
    if dense is not None:
        cols = ["model", "target", "decoder params", "removed (real)", "total params", "WikiText-2 ppl",
                *[f"{t} ({zd.scores[t].metric})" for t in tasks], "zero-shot mean", "above-chance retained",
                "compress s", "compress CPU s", "peak RSS MiB", "added RSS MiB"]
        body = [_cells(dense, dense, tasks)]
        for share in shares:
            for name in [v[0] for v in VARIANTS] + [SAME_CHOICE]:
                key = f"{name}@{share:g}"
                if key in rows:
                    body.append(_cells(rows[key], dense, tasks))
        tables.append({"title": f"SmolLM2-135M at equal real decoder size: WikiText-2 test ppl ({n_windows} × "
                                f"{args.eval_seqlen} tokens) and zero-shot accuracy (first {args.limit} items per task)",
                       "columns": cols, "rows": body})
        # PruneNet: learned policy against the calibration-free baselines
        pn = []
        for share in shares:
            got = {s: rows.get(f"prunenet {s}@{share:g}") for s in ("policy", "random", "magnitude")}
            if all(got.values()):
                pn.append([share, *[round(got[s]["ppl"], 2) for s in ("policy", "random", "magnitude")],
                           *[rounded(above_chance(zs_of(got[s]), zd, tasks), 3)
                             for s in ("policy", "random", "magnitude")],
                           round(extra.get("overlap_policy_magnitude", {}).get(f"{share:g}", float("nan")), 3)])
        if pn:
            tables.append({"title": "PruneNet: learned policy vs the calibration-free baselines (same widths)",
                           "columns": ["target", "ppl policy", "ppl random", "ppl magnitude",
                                       "above-chance policy", "above-chance random", "above-chance magnitude",
                                       "neurons shared policy/magnitude"],
                           "rows": pn})
        # DOTResize: merge vs deletion
        dr = []
        for share in shares:
            m, d, s = (rows.get(f"{n}@{share:g}") for n in ("dotresize merge", "dotresize delete", SAME_CHOICE))
            if m and d:
                dr.append([share, m["params"]["decoder"], round(m["ppl"], 2), round(d["ppl"], 2),
                           None if s is None else round(s["ppl"], 2),
                           rounded(above_chance(zs_of(m), zd, tasks), 3),
                           rounded(above_chance(zs_of(d), zd, tasks), 3),
                           None if s is None else rounded(above_chance(zs_of(s), zd, tasks), 3),
                           round(extra.get("overlap_merge_delete", {}).get(f"{share:g}", float("nan")), 4)])
        if dr:
            tables.append({"title": "DOTResize: merging vs deleting at equal width",
                           "columns": ["target", "decoder params", "ppl merge", "ppl delete (library)",
                                       "ppl delete (merge's neurons)", "above-chance merge",
                                       "above-chance delete (library)", "above-chance delete (merge's neurons)",
                                       "neurons shared merge/delete (library)"],
                           "rows": dr})
        # policy reuse
        fresh, reused = rows.get("prunenet policy@0.3"), rows.get(REUSE + "@0.3")
        if fresh and reused:
            tables.append({"title": "PruneNet policy learned at 25 %, reused at 30 % without retraining",
                           "columns": ["run", "decoder params", "compress s", "compress CPU s", "policy s", "ppl",
                                       "zero-shot mean",
                                       "above-chance retained"],
                           "rows": [[r["name"], r["params"]["decoder"], round(r["seconds"], 1),
                                     rounded(r.get("cpu_seconds"), 1),
                                     round(r["summary"].get("policy_seconds", float("nan")), 1), round(r["ppl"], 2),
                                     None if zs_of(r) is None else round(zs_of(r).average(tasks), 4),
                                     rounded(above_chance(zs_of(r), zd, tasks), 3)]
                                    for r in (fresh, reused)]})
        ref = _quality_reference(args, rows, shares)
        if ref is not None:
            tables.append(ref)
    if "determinism" in extra:
        notes.append(extra["determinism"])
    notes += extra.get("observations", [])
    notes += extra.get("manual", [])  # checks made outside this script, recorded by hand with their commands
    notes += [
        f"calibration (DOTResize, FASP, SliceGPT; PruneNet reads none): {cal_desc}, batches of {args.cal_batch_size} "
        "— the settings of quality.py's results",
        f"perplexity: first {n_windows} windows × {args.eval_seqlen} tokens of {eval_desc}, token-level, the same "
        "windows for every row (as quality.py)",
        f"zero-shot: lm-eval {dense['zeroshot']['lm_eval_version'] if dense else '?'} through "
        f"slicekit.zeroshot.evaluate_tasks, 0-shot, first {args.limit} items of each task from the local files "
        f"(batch size {args.zs_batch_size}); metric acc_norm for piqa/arc_easy/hellaswag, acc for winogrande; "
        + ABOVE_CHANCE_WORDS
        + left_out_note(zd, tasks) + ". With "
        f"{args.limit} items a task's accuracy has a standard error of about "
        f"{100 * math.sqrt(0.25 / args.limit):.1f} points: differences of a few points are noise",
        "target = share of decoder parameters removed (every method's target_params against the one counter); "
        "decoder params / removed (real) are the compressed model's real counts; SliceGPT's include its "
        "shortcut matrices (its width is a multiple of 8, so it lands near, not on, the target) and its total "
        "includes the untied LM head",
        "compress s / RSS: pipeline.compress's measurement (wall time of planning + the method; process RSS "
        "read from /proc every 5 ms — not ru_maxrss, not tracemalloc: absolute peak, and peak minus RSS just "
        "before); compress CPU s: the process's CPU time over the same call (all threads), less sensitive "
        "to the machine's load than the wall clock. The process also holds the dense "
        "model and evaluation state, so compare 'added'; a shared 2-core CPU under load: compare ratios, "
        "not absolutes",
    ]
    settings = {k: getattr(args, k) for k in (*CACHE_KEYS, "threads")}
    threads = sorted({r["threads"] for r in rows.values() if r.get("threads")})
    if threads:  # rows resumed from an earlier run may have used other thread counts (same numbers to ~1e-6)
        settings["threads of the rows"] = threads
    settings["shares"] = args.shares
    settings["zeroshot_shares"] = args.zeroshot_shares
    return {"title": "MLP-width methods on SmolLM2-135M: PruneNet and DOTResize next to baselines, FASP and SliceGPT",
            "command": command, "settings": settings, "tables": tables, "notes": notes, "plots": [],
            "raw": {"rows": rows, "extra": extra}}


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("mlp_methods", __doc__.splitlines()[0], threads=2, cal_nsamples=8, cal_seqlen=1024,
                         eval_windows=4)
    p.add_argument("--shares", default="0.25,0.3,0.1,0.2",
                   help="shares of decoder parameters removed, in the order they run (default %(default)s: "
                        "the headline size first, so a cut-short run still answers the issues)")
    p.add_argument("--tasks", default=",".join(TASKS), help="zero-shot tasks (default %(default)s)")
    p.add_argument("--limit", type=int, default=100, help="zero-shot items per task (default %(default)s)")
    p.add_argument("--zeroshot-shares", default=None,
                   help="shares at which zero-shot runs too (default: all of --shares; '' = dense only)")
    p.add_argument("--zs-batch-size", type=int, default=8, help="lm-eval batch size (default %(default)s)")
    p.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "slicekit-mlp-methods"),
                   help="where the learned PruneNet policy is kept between runs (default %(default)s)")
    p.add_argument("--fresh", action="store_true", help="ignore rows cached in --out")
    args = p.parse_args(argv)
    if args.zeroshot_shares is None:
        args.zeroshot_shares = args.shares
    setup(args)
    out = Path(args.out)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    shares = [float(s) for s in args.shares.split(",")]
    only = {s for s in args.only.split(",") if s}

    rows: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {"overlap_merge_delete": {}, "overlap_policy_magnitude": {}, "observations": []}
    raw, command = resume(out, args, CACHE_KEYS, "mlp_methods.py", argv)
    if raw:
        rows, extra = raw["rows"], {**extra, **raw["extra"]}

    dense, tok = load_model(args.model)
    dense.eval()
    calset = calibration_set(args, tok)
    batches = calset.batches(args.cal_batch_size)
    windows, eval_desc = evaluation_windows(args, tok)
    n_windows = int(windows.shape[0])

    def save() -> None:
        _observe(rows, extra, shares, args)
        write_result(out, build_document(rows, extra, args, command, calset.description, eval_desc, n_windows))

    def wanted(name: str) -> bool:
        return not only or name in only

    if "dense" not in rows:
        log("[dense] evaluating")
        rows["dense"] = evaluate_row("dense", "dense", 0.0, dense, tok, windows, args)
        save()

    policy25 = work / "prunenet_policy_25.safetensors"

    def determinism() -> None:
        """PruneNet determinism: a second training + compression with the same seed, weights compared."""
        first = rows.get("prunenet policy@0.25")
        if first is None or "determinism" in extra or not wanted(REPEAT):
            return
        m = copy.deepcopy(dense)
        again = work / "prunenet_policy_25_again.safetensors"
        t0 = time.perf_counter()
        compress(m, tok, "prunenet", method_config("prunenet", 0.25, save_policy=str(again)), progress=False)
        seconds = time.perf_counter() - t0
        digest = weights_digest(m)
        same_policy = _same_tensors(policy25, again) if policy25.exists() else None
        verdict = "bit-identical" if digest == first["digest"] else "DIFFERENT"
        extra["determinism"] = (
            f"determinism: PruneNet (policy, seed {first['settings'].get('policy_seed')}) at 25 % compressed twice "
            f"from the same dense model: SHA-256 of all weights {first['digest'][:16]}… vs {digest[:16]}… — "
            f"{verdict}; saved policies {'identical' if same_policy else 'differ' if same_policy is False else 'n/a'}"
            f" (second run {seconds:.1f} s)")
        log(extra["determinism"])
        del m
        save()

    def stale(key: str, share: float) -> bool:
        return key not in rows or (not rows[key].get("zeroshot") and wants_zeroshot(args, share))

    def variant(name: str, share: float) -> None:
        key = f"{name}@{share:g}"
        if not wanted(name) or not stale(key, share):
            return
        method, settings = next((m, dict(c)) for n, m, c in VARIANTS if n == name)
        if name == "prunenet policy" and share == 0.25:
            settings["save_policy"] = str(policy25)
        keep = name in ("dotresize merge", "dotresize delete", "prunenet policy", "prunenet magnitude")
        row, model = compress_row(name, method, share, settings, dense, tok, batches, windows, args, keep=keep)
        if model is not None:
            row["kept"] = pack(kept_neurons(dense, model), dense.config.intermediate_size)
        if name == "prunenet policy" and share == 0.25:
            row["digest"] = weights_digest(model)
        del model
        gc.collect()
        rows[key] = row
        _compare_choices(rows, extra, share)
        save()

    def same_choice(share: float) -> None:
        """Deletion of exactly the neurons the merge kept (no calibration needed: plain surgery)."""
        key = f"{SAME_CHOICE}@{share:g}"
        merge = rows.get(f"dotresize merge@{share:g}")
        if stale(key, share) and merge is not None and "kept" in merge and wanted(SAME_CHOICE):
            rows[key] = _delete_these(dense, tok, windows, args, share, merge)
            save()

    def reuse() -> None:
        """The policy learned at 25 % applied at 30 %, no retraining."""
        if not stale(REUSE + "@0.3", 0.3) or not wanted(REUSE):
            return
        if not policy25.exists():
            log("[reuse] policy file missing: relearning it at 25 % (same seed, not timed)")
            m = copy.deepcopy(dense)
            compress(m, tok, "prunenet", method_config("prunenet", 0.25, save_policy=str(policy25)), progress=False)
            del m
        row, _ = compress_row(REUSE, "prunenet", 0.3, {"selection": "policy", "policy": str(policy25)}, dense,
                              tok, batches, windows, args)
        rows[REUSE + "@0.3"] = row
        save()

    def tidy() -> None:
        """Drop the kept-neuron masks of a size once its comparisons are done."""
        for share in shares:
            # a row still to be redone (e.g. one without its zero-shot) is not done: the deletion of the
            # merge's neurons still needs the merge's masks
            done = all(not stale(f"{n}@{share:g}", share) for n, _, _ in VARIANTS if wanted(n))
            if done and (not stale(f"{SAME_CHOICE}@{share:g}", share) or not wanted(SAME_CHOICE)):
                for n, _, _ in VARIANTS:
                    rows.get(f"{n}@{share:g}", {}).pop("kept", None)

    # the bars first: every row of the first size; then the reuse at 30 % and the other rows at 30 %,
    # with the slow ones (a fresh policy at 30 %, the determinism rerun at 25 %) last; then the other
    # sizes in the order given
    jobs: list[tuple[str, float]] = [(n, shares[0]) for n, _, _ in VARIANTS] + [(SAME_CHOICE, shares[0])]
    if 0.3 in shares and 0.25 in shares:
        jobs += [(REUSE, 0.3), *[(n, 0.3) for n, _, _ in VARIANTS if n != "prunenet policy"], (SAME_CHOICE, 0.3),
                 ("prunenet policy", 0.3), (REPEAT, 0.25)]
    for share in shares[1:]:
        jobs += [(n, share) for n, _, _ in VARIANTS] + [(SAME_CHOICE, share)]
    for name, share in dict.fromkeys(jobs):
        if name == SAME_CHOICE:
            same_choice(share)
        elif name == REUSE:
            reuse()
        elif name == REPEAT:
            determinism()
        else:
            variant(name, share)
        tidy()
    determinism()
    save()
    log(f"wrote {out}")
    return 0


def _same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _compare_choices(rows: dict[str, dict[str, Any]], extra: dict[str, Any], share: float) -> None:
    s = f"{share:g}"
    m, d = rows.get(f"dotresize merge@{s}"), rows.get(f"dotresize delete@{s}")
    if m and d and "kept" in m and "kept" in d:
        mk, dk = unpack(m["kept"]), unpack(d["kept"])
        extra["overlap_merge_delete"][s] = overlap(mk, dk)
        extra.setdefault("layers_differing_merge_delete", {})[s] = [
            i for i, (x, y) in enumerate(zip(mk, dk, strict=True)) if x != y]
    p, g = rows.get(f"prunenet policy@{s}"), rows.get(f"prunenet magnitude@{s}")
    if p and g and "kept" in p and "kept" in g:
        extra["overlap_policy_magnitude"][s] = overlap(unpack(p["kept"]), unpack(g["kept"]))


def _delete_these(dense, tok, windows, args, share: float, merge: dict[str, Any]) -> dict[str, Any]:
    """Plain deletion (no re-projection) of exactly the neurons the merge run kept."""
    from slicekit.arch import get_arch
    from slicekit.methods.common import keep_mlp_neurons

    model = copy.deepcopy(dense)
    spec = get_arch(model.config)
    with torch.no_grad():
        for layer, keep in zip(spec.layer_list(model), unpack(merge["kept"]), strict=True):
            if len(keep) < int(layer.get_submodule(spec.block.mlp_down).weight.shape[1]):
                keep_mlp_neurons(layer, spec, torch.tensor(keep))
    log(f"[{SAME_CHOICE} @ {share:g}] evaluating")
    row = evaluate_row(SAME_CHOICE, "dotresize", share, model, tok, windows, args)
    if row["params"] != merge["params"]:
        raise RuntimeError(f"deleting the merge's neurons gives {row['params']}, the merge {merge['params']}")
    del model
    return row


def _observe(rows: dict[str, dict[str, Any]], extra: dict[str, Any], shares: list[float], args) -> None:
    """Plain statements of what the numbers say (computed, not written in advance)."""
    dense = rows.get("dense")
    if dense is None:
        return
    tasks = args.tasks.split(",")
    zd = zs_of(dense)
    obs = []

    def ret(r: dict[str, Any]) -> float:
        v = above_chance(zs_of(r), zd, tasks)
        return float("nan") if v is None else v

    def tally(a: str, b: str) -> str | None:
        pairs = [(rows[f"{a}@{s:g}"], rows[f"{b}@{s:g}"]) for s in shares
                 if f"{a}@{s:g}" in rows and f"{b}@{s:g}" in rows]
        if not pairs:
            return None
        ppl = sum(x["ppl"] < y["ppl"] for x, y in pairs)
        scored = [(x, y) for x, y in pairs if x.get("zeroshot") and y.get("zeroshot")]
        acc = sum(ret(x) > ret(y) for x, y in scored)
        return (f"{a} vs {b}: lower perplexity at {ppl} of {len(pairs)} sizes"
                + (f", higher above-chance retention at {acc} of {len(scored)} with zero-shot" if scored else ""))

    for a, b in (("prunenet policy", "prunenet random"), ("prunenet policy", "prunenet magnitude"),
                 ("dotresize merge", "dotresize delete"), ("dotresize merge", SAME_CHOICE),
                 ("dotresize merge", "fasp"), ("prunenet policy", "fasp"), ("dotresize merge", "slicegpt"),
                 ("prunenet policy", "slicegpt")):
        t = tally(a, b)
        if t:
            obs.append(t)
    counts = {}
    for s in shares:
        decs = {rows[f"{n}@{s:g}"]["params"]["decoder"] for n, _, _ in VARIANTS[:5] if f"{n}@{s:g}" in rows}
        fasp = rows.get(f"fasp@{s:g}")
        counts[f"{s:g}"] = {"prunenet/dotresize": sorted(decs),
                            "fasp": fasp["params"]["decoder"] if fasp else None,
                            "slicegpt": rows[f"slicegpt@{s:g}"]["params"]["decoder"] if f"slicegpt@{s:g}" in rows
                            else None}
    extra["decoder_counts"] = counts
    equal = all(len(c["prunenet/dotresize"]) <= 1 for c in counts.values())
    obs.append("real decoder counts: the five PruneNet/DOTResize rows of each size have "
               + ("the same count" if equal else "DIFFERENT counts") + " ("
               + "; ".join(f"{s}: {c['prunenet/dotresize']}, FASP {c['fasp']}, SliceGPT {c['slicegpt']}"
                           for s, c in counts.items()) + ")")
    if extra.get("overlap_merge_delete"):
        obs.append("DOTResize neuron choice: merge and the library's delete keep "
                   + ", ".join(f"{100 * v:.2f} % the same neurons at {s}" for s, v in extra["overlap_merge_delete"].items())
                   + " (layers that differ: "
                   + "; ".join(f"{s}: {v if v else 'none'}" for s, v in extra.get("layers_differing_merge_delete", {}).items())
                   + ")")
    extra["observations"] = obs


if __name__ == "__main__":
    raise SystemExit(main())
