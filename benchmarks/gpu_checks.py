"""The GPU checks of issue #20, as one script: SmolLM2-135M compressed, evaluated and benchmarked
on ``cuda`` through the command line a user runs, plus a two-device ``--device-map`` when more
than one GPU is visible.

    python benchmarks/gpu_checks.py            # writes results/gpu_checks.json

Every step is the real ``slicekit`` command in a child process; the script stops at the first
failure, printing its error.  Without a CUDA device it says so and exits with status 2 (the same
code paths run on the CPU in the test suite: the engine moves one layer at a time to
``--device``, whatever it is).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import command_line, write_result


def run(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "slicekit.cli", *args, "--json", "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    doc["wall_s"] = time.perf_counter() - t0
    print(f"ok ({doc['wall_s']:.0f} s): slicekit {' '.join(args)}", flush=True)
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="slicegpt,fasp,modegpt")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "slicekit-gpu-checks"))
    p.add_argument("--out", default="gpu_checks")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device visible: nothing to check here (the CPU test suite runs the same code paths)")
        return 2
    n_gpus = torch.cuda.device_count()
    shutil.rmtree(args.work_dir, ignore_errors=True)
    os.makedirs(args.work_dir)
    cal = ["--cal-nsamples", "64", "--cal-seqlen", "2048"]
    ev = ["--seqlen", "2048", "--max-windows", "32"]
    rows = []
    dense = run(["eval", "--model", args.model, "--device", "cuda", *ev])
    rows.append(["dense", "eval cuda", round(dense["ppl"], 3), None, None, round(dense["wall_s"], 1)])
    for method in args.methods.split(","):
        out = os.path.join(args.work_dir, method)
        comp = run(["compress", "--model", args.model, "--method", method, "--target-params", "0.25", "--device", "cuda",
                    "--out", out, *cal])
        ev_doc = run(["eval", "--model", out, "--device", "cuda", *ev])
        bench = run(["bench", "--model", out, "--baseline", args.model, "--device", "cuda"])
        ratio = bench.get("ratios", {}).get("prefill_tokens_per_s", {})
        rows.append([method, "compress + eval + bench cuda", round(ev_doc["ppl"], 3),
                     round(comp["compression"]["cuda_peak_mib"]), json.dumps(ratio), round(comp["wall_s"], 1)])
        if n_gpus > 1:
            two = run(["eval", "--model", out, "--device-map", "balanced", *ev])
            rows.append([method, f"eval --device-map balanced ({n_gpus} GPUs)", round(two["ppl"], 3), None, None,
                         round(two["wall_s"], 1)])
    doc = {"title": "GPU checks (#20)", "command": command_line("gpu_checks.py", argv),
           "settings": {"model": args.model, "gpus": n_gpus, "device": torch.cuda.get_device_name(0)},
           "tables": [{"title": "SmolLM2-135M on CUDA, 25 % of decoder parameters removed",
                       "columns": ["model", "check", "WikiText-2 ppl (32×2048)", "compress CUDA peak MiB",
                                   "prefill speed-up vs dense", "wall s"], "rows": rows}],
           "notes": ["calibration 64×2048 tokens of WikiText-2 validation"]}
    print(f"wrote {write_result(args.out, doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
