"""Streaming compression of a model bigger than the memory it may use (issue #20).

    nice -n 10 python benchmarks/streaming.py

A randomly initialised Llama of at least 4 GiB (float32, sharded safetensors, SmolLM2's tokenizer)
is written by :func:`slicekit.synthetic.write_random_llama` into ``--work-dir`` (outside the
repository), then every run is the real command line, ``slicekit compress``, in a child process
whose peak RSS (``getrusage``, loading, compression and saving included) is what it reports:

* ``--dry-run --stream``: the prediction, before any weight is read;
* ``--stream``: SliceGPT and FASP, layer by layer from the shards;
* the same compression in memory, and the logits of both outputs on the same tokens;
* SliceGPT ``--stream`` killed (SIGKILL) once half its layers are done, then the same command
  again: the output must equal the uninterrupted one tensor for tensor;
* SmolLM2-135M (GGUF, in memory): prediction against the measured peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import command_line, tensors_digest, write_result

PY = sys.executable


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def compress_cmd(model: str, method: str, out: str | None, extra: list[str], args: argparse.Namespace) -> list[str]:
    cmd = [PY, "-m", "slicekit.cli", "compress", "--model", model, "--method", method, "--json", "--quiet",
           "--cal-nsamples", str(args.cal_nsamples), "--cal-seqlen", str(args.cal_seqlen),
           "--cal-batch-size", str(args.cal_batch_size), "--target-params", "0.25", *extra]
    return cmd + (["--out", out] if out else [])


def run_json(cmd: list[str], threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    doc["wall_s"] = time.perf_counter() - t0
    return doc


def output_digest(directory: str) -> str:
    """SHA-256 over every tensor of a saved output (name, dtype, shape, bytes)."""
    from safetensors.torch import load_file

    return tensors_digest(kv for f in sorted(Path(directory).glob("*.safetensors")) for kv in load_file(str(f)).items())


def logits_error(a_dir: str, b_dir: str, tokens) -> tuple[float, float]:
    """Relative and max absolute difference of the two outputs' logits (loaded one at a time)."""
    import torch

    from slicekit.checkpoint import load

    outs = []
    for d in (a_dir, b_dir):
        model, _ = load(d)
        with torch.no_grad():
            outs.append(model(input_ids=tokens).logits)
        del model
    a, b = outs
    return ((a - b).norm() / b.norm()).item(), (a - b).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "slicekit-streaming"))
    p.add_argument("--layers", type=int, default=76, help="default %(default)s (4.0 GiB at hidden 1024)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--cal-nsamples", type=int, default=8)
    p.add_argument("--cal-seqlen", type=int, default=128)
    p.add_argument("--cal-batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default="slicegpt,fasp")
    p.add_argument("--smollm2", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--smollm2-methods", default=None, help="methods of the SmolLM2 rows (default: --methods)")
    p.add_argument("--resume-test", action=argparse.BooleanOptionalAction, default=True,
                   help="kill the first method's streamed run halfway and rerun it (default on)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of methods not run now from the existing result file (same model settings)")
    p.add_argument("--out", default="streaming")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    syn = work / "synthetic"
    from slicekit.models import load_model

    if not (syn / "model.safetensors.index.json").exists():
        log("writing the synthetic model")
        _, tok = load_model("smollm2-135m", require_adapter=False)
        from slicekit.synthetic import write_random_llama

        write_random_llama(str(syn), layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                           heads=args.heads, vocab=len(tok), tokenizer=tok)
    size = sum(f.stat().st_size for f in syn.glob("*.safetensors"))
    log(f"synthetic model: {size / 2**30:.2f} GiB on disk")
    rows, notes = [], []
    digests: dict[str, str] = {}
    tokens = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    for method in args.methods.split(","):
        dry = run_json(compress_cmd(str(syn), method, None, ["--stream", "--dry-run"], args), args.threads)
        pred = dry["dry_run"]["host_peak_mib"]
        log(f"{method}: predicted {pred:.0f} MiB streamed")
        outs = {}
        for mode, extra in (("streamed", ["--stream"]), ("in memory", [])):
            out = str(work / f"{method}-{mode.replace(' ', '-')}")
            shutil.rmtree(out, ignore_errors=True)
            doc = run_json(compress_cmd(str(syn), method, out, extra, args), args.threads)
            outs[mode] = out
            peak = doc["process_peak_rss_mib"]
            p_mode = pred if mode == "streamed" else run_json(
                compress_cmd(str(syn), method, None, ["--dry-run"], args), args.threads)["dry_run"]["host_peak_mib"]
            rows.append([method, mode, round(size / 2**20), round(peak), round(p_mode), round(p_mode / peak, 3),
                         round(doc["wall_s"], 1), doc["params"]["compressed"]["total"]])
            log(f"{method} {mode}: peak {peak:.0f} MiB (predicted {p_mode:.0f}), {doc['wall_s']:.0f} s")
        rel, mx = logits_error(outs["streamed"], outs["in memory"], tokens)
        notes.append(f"{method}: logits of the streamed output against the in-memory one on 2×64 random tokens: "
                     f"relative error {rel:.2e}, max abs {mx:.2e}")
        log(notes[-1])
        digests[method] = output_digest(outs["streamed"])
        shutil.rmtree(outs["in memory"], ignore_errors=True)
    if args.resume_test:
        resume_test(args, syn, size, work, digests, rows, notes)
    if args.smollm2:
        smollm2_rows(args, rows, notes)
    finish(args, argv, work, rows, notes)
    return 0


def resume_test(args: argparse.Namespace, syn: Path, size: int, work: Path, digests: dict, rows: list,
                notes: list) -> None:
    """Kill the first method's streamed run after half its layers (SIGKILL), rerun the command."""
    method = args.methods.split(",")[0]
    out = str(work / f"{method}-resumed")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out + ".partial", ignore_errors=True)
    cmd = compress_cmd(str(syn), method, out, ["--stream"], args)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    progress = Path(out + ".partial") / "progress.json"
    done = 0
    while proc.poll() is None:
        if progress.exists():
            with contextlib.suppress(json.JSONDecodeError, KeyError):
                done = json.loads(progress.read_text())["done"]
        if done >= args.layers // 2:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.5)
    log(f"killed after {done} of {args.layers} layers")
    doc = run_json(cmd, args.threads)
    same = output_digest(out) == digests[method]
    rows.append([method, f"streamed, killed after {done} layers, rerun", round(size / 2**20),
                 round(doc["process_peak_rss_mib"]), None, None, round(doc["wall_s"], 1),
                 doc["params"]["compressed"]["total"]])
    notes.append(f"{method}: the run killed (SIGKILL) after {done} of {args.layers} layers and rerun with the same "
                 f"command wrote an output {'identical, tensor for tensor (SHA-256),' if same else 'DIFFERENT from'} "
                 "to the uninterrupted streamed run's")
    log(notes[-1])


def smollm2_rows(args: argparse.Namespace, rows: list, notes: list) -> None:
    for method in (args.smollm2_methods or args.methods).split(","):
        dry = run_json(compress_cmd("smollm2-135m", method, None, ["--dry-run"], args), args.threads)
        doc = run_json(compress_cmd("smollm2-135m", method, None, [], args), args.threads)
        pred, peak = dry["dry_run"]["host_peak_mib"], doc["process_peak_rss_mib"]
        rows.append([f"{method} (SmolLM2-135M GGUF)", "in memory", None, round(peak), round(pred),
                     round(pred / peak, 3), round(doc["wall_s"], 1), doc["params"]["compressed"]["total"]])
        log(f"smollm2 {method}: peak {peak:.0f} MiB, predicted {pred:.0f}")


def finish(args: argparse.Namespace, argv: list[str] | None, work: Path, rows: list, notes: list) -> None:
    command = command_line("streaming.py", argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("work_dir", "merge")}
    out_path = Path(args.out) if Path(args.out).suffix == ".json" else Path(__file__).parent / "results" / f"{args.out}.json"
    if args.merge and out_path.exists():
        old = json.loads(out_path.read_text())
        same = all(old["settings"].get(k) == settings[k] for k in ("layers", "hidden", "intermediate", "heads",
                                                                    "cal_nsamples", "cal_seqlen", "cal_batch_size"))
        if same:
            mine = set(args.methods.split(","))
            smol = set((args.smollm2_methods or args.methods).split(",")) if args.smollm2 else set()

            def replaced(row: list) -> bool:
                method = row[0].split(" ")[0]
                return method in (smol if "SmolLM2" in row[0] else mine)

            rows = [r for r in old["tables"][0]["rows"] if not replaced(r)] + rows
            notes = [n for n in old["notes"] if n.split(":")[0] not in mine and not n.startswith("synthetic")] + notes
            command = f"{old['command']} && {command}"
    for d in work.glob("*-streamed"):
        shutil.rmtree(d, ignore_errors=True)
    doc = {"title": "Streaming compression: a 4 GiB model under a 1.5 GB budget (#20)",
           "command": command,
           "settings": settings,
           "tables": [{"title": "Peak RSS of the whole `slicekit compress` process (loading, compression, saving)",
                       "columns": ["method", "mode", "model MiB on disk", "measured peak MiB", "predicted MiB",
                                   "predicted / measured", "wall s", "params after"],
                       "rows": rows}],
           "notes": [*notes, f"synthetic Llama: {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, " f"{args.heads} heads, SmolLM2 tokenizer (vocabulary 49,152), float32, random N(0, 0.02²) " "weights; calibration " f"{args.cal_nsamples}×{args.cal_seqlen} tokens of WikiText-2 validation; 25 % of decoder " "parameters removed; CPU, " f"{args.threads} threads"]}
    path = write_result(args.out, doc)
    log(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
