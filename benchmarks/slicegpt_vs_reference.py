"""slicekit's SliceGPT side by side with the SliceGPT reference (issues #3 and #8).

Run with slicekit's environment.  The reference (microsoft/TransformerCompression) is *not* part of
slicekit: it must already be installed by hand in its own virtual environment (see
``/work/shared/design/reference-setup.md``), and this script only calls it through the paths the
user gives::

    --ref-python  or $SLICEKIT_REF_PYTHON   the reference venv's python
    --ref-src     or $SLICEKIT_REF_SRC      the checkout's src directory (holds slicegpt/)
    --ref-model   or $SLICEKIT_REF_MODEL    the model directory prepared for the reference
                                            (same weights as --model)

Without them the reference comparison is skipped (and the output says so); slicekit's own rows
(including the monotonicity sweep) are still measured.

Protocol: calibration ids are drawn once with slicekit's sampler and written with the evaluation
windows (WikiText-2 test, the first K windows of ``--eval-seqlen``) to a safetensors file in a
temporary directory; ``benchmarks/reference_driver.py`` (run with the reference's python) reads
them, so both tools calibrate and evaluate on exactly the same token ids.  Compressions run
alternately (slicekit in this process, the reference in a subprocess) with the same thread count.
Time and memory cover compression alone: slicekit's ``pipeline.compress`` measurement (invariance
transform + rotate-and-slice) and the reference's ``replace_layers + fuse_modules +
rotate_and_slice``.  Memory: RSS sampled every 5 ms; "added" = peak − RSS just before compression
(after ``gc.collect()`` + ``malloc_trim(0)`` in both processes), "peak" = absolute peak RSS of the
process.  Perplexity: token-level ``exp(mean NLL)`` over the same windows in both tools.

    python benchmarks/slicegpt_vs_reference.py --cal-nsamples 32 --cal-seqlen 2048 --eval-windows 16
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_file

from common import (
    benchmark_parser,
    calibration_request,
    calibration_set,
    command_line,
    evaluation_windows,
    setup,
    write_result,
)
from slicekit.evaluate import perplexity_of_windows
from slicekit.methods import get_method
from slicekit.methods.slicegpt import SliceGPTConfig
from slicekit.models import load_model
from slicekit.pipeline import clone_model, compress
from slicekit.profiling import release_memory
from slicekit.schedules import round_width

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "reference_driver.py"


def reference_paths(args) -> tuple[dict | None, str]:
    """The reference's python, src and model dir from flags or environment, or why it is skipped."""
    got, where = {}, []
    for key, env in (("python", "SLICEKIT_REF_PYTHON"), ("src", "SLICEKIT_REF_SRC"), ("model", "SLICEKIT_REF_MODEL")):
        flag = getattr(args, f"ref_{key}")
        if flag:
            got[key], src = flag, f"--ref-{key}"
        elif os.environ.get(env):
            got[key], src = os.environ[env], f"${env}"
        else:
            continue
        where.append(f"{key}={got[key]} (from {src})")
    missing = [k for k in ("python", "src", "model") if k not in got]
    if missing:
        return None, ("reference comparison SKIPPED: no " + ", ".join(
            f"--ref-{k} / $SLICEKIT_REF_{k.upper()}" for k in missing) + " given")
    bad = [p for p in (got["python"], got["src"], got["model"]) if not os.path.exists(p)]
    if bad:
        return None, f"reference comparison SKIPPED: path(s) not found: {', '.join(bad)}"
    return got, "reference (installed outside slicekit, called as a subprocess): " + "; ".join(where)


def run_reference(ref: dict, data: str, out: str, slicing: float, args, extra: list[str]) -> dict:
    """The reference at ``slicing`` (its "sparsity": the share of the residual width removed)."""
    cmd = [ref["python"], str(DRIVER), "--ref-src", ref["src"], "--model-path", ref["model"], "--data", data,
           "--sparsity", str(slicing), "--cal-batch-size", str(args.cal_batch_size),
           "--round-interval", str(args.round_to), "--threads", str(args.threads), "--json-out", out, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    print("  $ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"reference driver failed (exit {proc.returncode})")
    for line in proc.stderr.splitlines():
        if line.startswith("reference "):
            print("  " + line, flush=True)
    with open(out) as fh:
        res = json.load(fh)
    res["process_seconds"] = time.perf_counter() - t0
    return res


def run_reference_nc(ref: dict, data: str, tmp: str, args) -> dict:
    print(f"slicing {args.slicing}: reference with the embedding centring undone", flush=True)
    extra = ["--skip-dense-eval", "--keep-embedding-mean"] + (["--eval-fused"] if args.ref_eval_fused else [])
    return run_reference(ref, data, os.path.join(tmp, "ref-nc.json"), args.slicing, args, extra)


def run_ours(dense, tok, batches, windows, slicing: float, args, evaluate: bool) -> dict:
    model = clone_model(dense)
    release_memory(collect=True)
    cal = calibration_request(args)
    cfg = SliceGPTConfig(slicing=slicing, round_to=args.round_to)
    report = compress(model, tok, "slicegpt", cfg, cal, progress=False, batches=batches)
    m = report.measurement
    res = {"compression": {"seconds": m.seconds, "rss_before_mib": m.rss_before / 2**20,
                           "rss_peak_mib": m.rss_peak / 2**20, "rss_added_mib": m.rss_added / 2**20},
           "params_dense": report.params_original, "params_sliced": report.params_compressed,
           "width": report.summary["attn_in_widths"][0]}
    print(f"  slicekit compression {m.seconds:.1f} s, peak RSS {m.rss_peak / 2**20:.0f} MiB "
          f"(+{m.rss_added / 2**20:.0f} MiB)", flush=True)
    if evaluate:
        nll, count = perplexity_of_windows(model, windows, progress=False)
        res["ppl_sliced"] = {"ppl": math.exp(nll), "nll": nll, "tokens": count}
        print(f"  slicekit sliced ppl {math.exp(nll):.4f}", flush=True)
    del model
    release_memory(collect=True)
    return res


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = benchmark_parser("slicegpt_vs_reference", __doc__.split("\n\n")[0], cal_nsamples=32, cal_batch_size=8,
                          threads=2)
    ap.add_argument("--ref-python", default=None)
    ap.add_argument("--ref-src", default=None)
    ap.add_argument("--ref-model", default=None)
    ap.add_argument("--slicing", type=float, default=0.25,
                    help="the share of the residual width removed at which the bars are checked")
    ap.add_argument("--sweep", type=floats, default=floats("0.1,0.2,0.3"),
                    help="extra slicing values for the monotonicity check (slicekit; comma separated)")
    ap.add_argument("--ref-sweep", action="store_true", help="also run the reference at the sweep values")
    ap.add_argument("--ref-no-centering", action="store_true",
                    help="also run the reference with its embedding centring undone (quantifies that bug)")
    ap.add_argument("--ref-eval-fused", action="store_true",
                    help="also evaluate the reference's model right after fusion (shows what centring changes)")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1, help="timed repetitions at --slicing (alternating)")
    ap.add_argument("--raw-out", default=None, help="also write every measurement (both tools) to this JSON file")
    args = ap.parse_args(argv)

    setup(args)
    ref, ref_line = reference_paths(args)
    print(ref_line, flush=True)
    notes = [ref_line]

    get_method("slicegpt")  # fail early if the method cannot be loaded
    dense, tok = load_model(args.model)
    hidden = dense.config.hidden_size
    cal = calibration_set(args, tok)
    windows, _ = evaluation_windows(args, tok)
    batches = cal.batches(args.cal_batch_size)
    print(f"calibration: {cal.description}; eval: {windows.shape[0]} windows × {windows.shape[1]} of WikiText-2 test",
          flush=True)

    t0 = time.perf_counter()
    nll, count = perplexity_of_windows(dense, windows, progress=False)
    ours_dense = math.exp(nll)
    print(f"slicekit dense ppl {ours_dense:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    sparsities = [args.slicing] + [s for s in args.sweep if s != args.slicing]
    ours: dict[float, list[dict]] = {}
    theirs: dict[float, list[dict]] = {}
    theirs_nc: dict | None = None
    with tempfile.TemporaryDirectory(prefix="slicekit-vs-ref-") as tmp:
        data = os.path.join(tmp, "ids.safetensors")
        save_file({"cal_input_ids": cal.input_ids.contiguous(), "eval_input_ids": windows.contiguous()}, data)
        for s in sparsities:
            if s != args.slicing and ref is not None and args.ref_no_centering and theirs_nc is None:
                theirs_nc = run_reference_nc(ref, data, tmp, args)
            reps = args.repeats if s == args.slicing else 1
            with_ref = ref is not None and (s == args.slicing or args.ref_sweep)
            for r in range(reps):
                print(f"slicing {s} (run {r + 1}/{reps})", flush=True)
                ours.setdefault(s, []).append(run_ours(dense, tok, batches, windows, s, args, evaluate=r == 0))
                if with_ref:
                    extra = []
                    if s != args.slicing or r > 0 or theirs:
                        extra.append("--skip-dense-eval")
                    if r > 0:
                        extra.append("--skip-sliced-eval")
                    if args.ref_eval_fused and s == args.slicing and r == 0:
                        extra.append("--eval-fused")
                    out = os.path.join(tmp, f"ref-{s}-{r}.json")
                    theirs.setdefault(s, []).append(run_reference(ref, data, out, s, args, extra))
        if ref is not None and args.ref_no_centering and theirs_nc is None:
            theirs_nc = run_reference_nc(ref, data, tmp, args)

    # ------------------------------------------------------------------ tables
    def best(runs: list[dict], key: str) -> float:  # median over repeats (mean of the middle two if even)
        return statistics.median(r["compression"][key] for r in runs)

    s0 = args.slicing
    o0 = ours[s0]
    main_cols = ["tool", "ppl dense", f"ppl sliced ({s0})", "compression s", "peak RSS MiB", "added RSS MiB",
                 "RSS before MiB", "params dense", "params sliced", "non-embedding params sliced"]
    main_rows = [["slicekit", round(ours_dense, 4), round(o0[0]["ppl_sliced"]["ppl"], 4),
                  round(best(o0, "seconds"), 2), round(best(o0, "rss_peak_mib"), 1), round(best(o0, "rss_added_mib"), 1),
                  round(best(o0, "rss_before_mib"), 1), o0[0]["params_dense"]["total"], o0[0]["params_sliced"]["total"],
                  o0[0]["params_sliced"]["non_embedding"]]]
    tables = []
    bars_rows = []
    if ref is not None:
        t0 = theirs[s0]
        t_dense = t0[0].get("ppl_dense", {}).get("ppl")
        main_rows.append(["reference", round(t_dense, 4) if t_dense else None, round(t0[0]["ppl_sliced"]["ppl"], 4),
                          round(best(t0, "seconds"), 2), round(best(t0, "rss_peak_mib"), 1),
                          round(best(t0, "rss_added_mib"), 1), round(best(t0, "rss_before_mib"), 1),
                          t0[0]["params_dense"]["total"], t0[0]["params_sliced"]["total"],
                          t0[0]["params_sliced"]["non_embedding"]])
        if theirs_nc is not None:
            c = theirs_nc["compression"]
            main_rows.append(["reference, centring undone", None, round(theirs_nc["ppl_sliced"]["ppl"], 4),
                              round(c["seconds"], 2), round(c["rss_peak_mib"], 1), round(c["rss_added_mib"], 1),
                              round(c["rss_before_mib"], 1), theirs_nc["params_dense"]["total"],
                              theirs_nc["params_sliced"]["total"], theirs_nc["params_sliced"]["non_embedding"]])
        ppl_ratio = o0[0]["ppl_sliced"]["ppl"] / t0[0]["ppl_sliced"]["ppl"]
        time_ratio = best(o0, "seconds") / best(t0, "seconds")
        add_ratio = best(o0, "rss_added_mib") / best(t0, "rss_added_mib")
        peak_ratio = best(o0, "rss_peak_mib") / best(t0, "rss_peak_mib")
        param_ratio = o0[0]["params_sliced"]["total"] / t0[0]["params_sliced"]["total"]
        bars_rows = [
            ["sliced perplexity", round(ppl_ratio, 4), "≤ 1.02", ppl_ratio <= 1.02],
            ["compression wall time", round(time_ratio, 3), "≤ 0.5", time_ratio <= 0.5],
            ["compression memory (peak − before)", round(add_ratio, 3), "≤ 0.7", add_ratio <= 0.7],
            ["compression memory (absolute peak RSS)", round(peak_ratio, 3), "≤ 0.7", peak_ratio <= 0.7],
            ["parameters after slicing", round(param_ratio, 4), "(info)", None],
        ]
        if theirs_nc is not None:
            r = o0[0]["ppl_sliced"]["ppl"] / theirs_nc["ppl_sliced"]["ppl"]
            bars_rows.append(["sliced perplexity vs reference with centring undone", round(r, 4), "≤ 1.02", r <= 1.02])
    tables.append({"title": f"SmolLM2-135M, slicing {s0}: slicekit and the SliceGPT reference", "columns": main_cols,
                   "rows": main_rows})
    if bars_rows:
        tables.append({"title": "Bars (ratio = slicekit / reference)", "columns": ["metric", "ratio", "bar", "passes"],
                       "rows": bars_rows})
    sweep_rows = []
    for s in sorted(ours):
        row = [s, round_width(hidden, s, args.round_to), round(ours[s][0]["ppl_sliced"]["ppl"], 4),
               round(ours[s][0]["compression"]["seconds"], 2), ours[s][0]["params_sliced"]["total"]]
        if s in theirs:
            row += [round(theirs[s][0]["ppl_sliced"]["ppl"], 4), round(theirs[s][0]["compression"]["seconds"], 2)]
        else:
            row += [None, None]
        sweep_rows.append(row)
    ppls = [r[2] for r in sweep_rows]
    monotone = all(a < b for a, b in itertools.pairwise(ppls))
    tables.append({"title": "Slicing sweep (same calibration ids and windows)",
                   "columns": ["slicing", "width", "slicekit ppl", "slicekit s", "slicekit params",
                               "reference ppl", "reference s"], "rows": sweep_rows})
    notes.append(f"slicekit perplexity rises monotonically with slicing over {sorted(ours)}: {monotone}")
    if ref is not None:
        t0 = theirs[s0][0]
        if "ppl_fused" in t0:
            notes.append(f"reference after fusion only (no slicing): ppl {t0['ppl_fused']['ppl']:.4f} vs dense "
                         f"{t0['ppl_dense']['ppl']:.4f} — fuse_modules centres the embedding rows although the "
                         "model uses RMSNorm, which changes the dense model")
        if theirs_nc is not None and "ppl_fused" in theirs_nc:
            notes.append(f"reference after fusion with the centring undone: ppl {theirs_nc['ppl_fused']['ppl']:.4f}")
    notes += [
        "Calibration ids drawn once by slicekit's 'documents' sampler and given to both tools as token ids; "
        "evaluation windows identical (first K non-overlapping windows of WikiText-2 test).",
        "Time/memory cover compression only: slicekit pipeline.compress measurement (make_invariant + "
        "rotate-and-slice); reference replace_layers + fuse_modules + rotate_and_slice.",
        "added RSS = peak RSS during compression − RSS just before it (after gc.collect + malloc_trim); "
        "peak RSS = absolute process peak (depends on each process's baseline: slicekit's process also holds "
        "the dense model it was cloned from and its evaluation state).",
        f"Both tools: {args.threads} torch threads, float32 on CPU; the reference runs in its own venv "
        "(transformers 4.41) as a subprocess. Times on a CPU shared with other work: indicative.",
    ]
    result = {
        "title": "SliceGPT: slicekit vs the reference implementation",
        "command": command_line("slicegpt_vs_reference.py", argv),
        "settings": {"model": args.model, "slicing": s0, "sweep": sorted(ours), "calibration": cal.description,
                     "cal_batch_size": args.cal_batch_size, "eval_windows": int(windows.shape[0]),
                     "eval_seqlen": args.eval_seqlen, "threads": args.threads, "repeats": args.repeats,
                     "round_to": args.round_to, "reference": ref_line},
        "tables": tables,
        "notes": notes,
        "plots": [],
    }
    if args.raw_out:
        raw = {"slicekit": {str(k): v for k, v in ours.items()}, "reference": {str(k): v for k, v in theirs.items()},
               "reference_centring_undone": theirs_nc, "slicekit_dense_nll": nll, "eval_tokens": count}
        with open(args.raw_out, "w") as fh:
            json.dump(raw, fh, indent=2, default=str)
    write_result(args.out, result)
    for t in tables:
        print(f"\n{t['title']}\n  " + " | ".join(t["columns"]))
        for row in t["rows"]:
            print("  " + " | ".join(str(x) for x in row))
    print("\n" + "\n".join(notes[:2]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
