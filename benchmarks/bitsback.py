"""Bits-back packing of SliceGPT models: file sizes, the saving against its estimate, cost, outputs.

    nice -n 10 python benchmarks/bitsback.py [--fractions 0.1,0.25,0.5] [--timing-fraction 0.25]

SmolLM2-135M (float32) is sliced with SliceGPT at each fraction of the residual width (the
pipeline, calibration drawn once from the data directory and shared) and saved with
``slicekit.save``.  Each checkpoint is packed at its own precision (float32: one step per
row = one ulp at the row's RMS) with bits-back and the information-theoretic estimate, and again
with the same quantiser and coder but without bits-back.  Sizes are compared with the
checkpoint's ``*.safetensors`` files (same precision: float32).  The perplexity of the checkpoint
and of the packed file loaded directly (``slicekit.load(FILE)``) are measured on the same few
windows, and the relative error of their logits on the first window.

Encode and decode time and peak memory at ``--timing-fraction`` are measured in fresh child
processes (``pack``/``unpack`` alone; peak resident memory includes the interpreter and imports,
stated separately), so that the parent's models do not count.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import (
    benchmark_parser,
    calibration_request,
    calibration_set,
    command_line,
    evaluation_windows,
    scrub,
    setup,
    write_result,
)

MB = 1e6


def _child(argv: list[str]) -> None:
    """``--child pack SRC OUT [plain]`` / ``--child unpack FILE DIR``: one operation, timed, in a fresh
    process; prints one JSON line (wall and CPU seconds, peak RSS after imports and at the end)."""
    op, src, dst, *rest = argv
    import constriction  # noqa: F401  (imported before the baseline, like the rest)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from slicekit.bitsback import pack, unpack
    from slicekit.checkpoint import load  # noqa: F401

    rss_imports = _peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    if op == "pack":
        report = pack(src, dst, bits_back="plain" not in rest)
        extra = {"file_bytes": report.file_bytes, "saved_bits": report.saved_bits}
    else:
        unpack(src, dst)
        extra = {}
    out = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
           "rss_after_imports": rss_imports, "rss_peak": _peak_rss(),
           **extra}
    print(json.dumps(out))


def _peak_rss() -> int:
    """This process's peak resident memory in bytes: ``VmHWM``, which (unlike ``ru_maxrss``, kept
    across ``exec`` on Linux) belongs to this process's own memory map, not to its parent's."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(op: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", op, *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {op} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _ppl(model, windows) -> float:
    from slicekit.evaluate import perplexity_of_windows

    return math.exp(perplexity_of_windows(model, windows, progress=False)[0])


def _rel_logits(a, b, window) -> float:
    with torch.no_grad():
        la, lb = a(input_ids=window[None]).logits, b(input_ids=window[None]).logits
    return ((la - lb).norm() / lb.norm()).item()


def _weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1:])
        return
    ap = benchmark_parser("bitsback", __doc__.splitlines()[0], cal_nsamples=8, cal_seqlen=256,
                          eval_seqlen=512, eval_windows=4, threads=1)
    ap.add_argument("--fractions", default="0.1,0.25,0.5", help="SliceGPT slicing fractions (default %(default)s)")
    ap.add_argument("--timing-fraction", type=float, default=0.25,
                    help="where encode/decode time and memory are measured (default %(default)s)")
    ap.add_argument("--work", default=None, help="keep checkpoints and packed files here (default: a temporary "
                                                 "directory, deleted)")
    args = ap.parse_args(argv)
    setup(args)
    if args.threads:  # the timed children: torch and BLAS with as many threads as the parent
        os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    from slicekit import load as sk_load
    from slicekit import save
    from slicekit.bitsback import pack
    from slicekit.methods.slicegpt import SliceGPTConfig
    from slicekit.models import count_parameters, load_model
    from slicekit.pipeline import compress

    started, cpu_started = time.perf_counter(), _cpu_seconds()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="slicekit-bitsback-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dense, tok = load_model(args.model)
    cal = calibration_request(args)
    calset = calibration_set(args, tok)
    batches = calset.batches(args.cal_batch_size)
    windows, eval_desc = evaluation_windows(args, tok)
    fractions = [float(f) for f in args.fractions.split(",") if f]
    rows, bits_rows, timing_rows, records = [], [], [], []
    try:
        for frac in fractions:
            tag = f"{round(frac * 100)}"
            model = copy.deepcopy(dense)
            compress(model, tok, "slicegpt", SliceGPTConfig(slicing=frac), cal, progress=False, batches=batches)
            params = count_parameters(model)["total"]
            ckpt = work / f"slicegpt_{tag}"
            save(model, tok, str(ckpt))
            before = _ppl(model, windows)
            bb = pack(str(ckpt), str(work / f"{tag}.skpack"), estimate=True)
            plain = pack(str(ckpt), str(work / f"{tag}_plain.skpack"), bits_back=False)
            unpacked, _ = sk_load(str(work / f"{tag}.skpack"))
            after = _ppl(unpacked, windows)
            rel = _rel_logits(unpacked, model, windows[0])
            del unpacked
            st = _weights_bytes(ckpt)
            used = [s for s in bb.interfaces if s.status == "bits-back"]
            dofs = sum(s.width * (s.width - 1) // 2 for s in bb.interfaces)
            saving = (plain.file_bytes - bb.file_bytes) / plain.file_bytes
            estimate = bb.estimate_bits / 8 / plain.file_bytes
            rows.append([f"{tag} %", params, round(st / MB, 2), round(plain.file_bytes / MB, 2),
                         round(bb.file_bytes / MB, 2), round(100 * bb.file_bytes / st, 1), round(100 * saving, 2),
                         round(100 * estimate, 2), f"{len(used)} / {len(bb.interfaces)}", round(before, 4),
                         round(after, 4), f"{100 * (after - before) / before:+.1e}", f"{rel:.1e}"])
            bits_rows.append([f"{tag} %", round(dofs / 1e6, 2), round(sum(s.popped_bits for s in used) / 1e6, 2),
                              round(sum(s.correction_bits for s in used) / 1e6, 2),
                              round(sum(s.rotation_cost_bits for s in used) / 1e6, 2),
                              round(bb.saved_bits / 1e6, 2), round(bb.estimate_bits / 1e6, 2),
                              round(bb.saved_bits / max(dofs, 1), 1)])
            records.append({"slicing": frac, "bitsback": {**bb.as_dict(), "path": Path(bb.path).name}, "plain_bytes": plain.file_bytes,
                            "safetensors_file_bytes": st, "ppl_before": before, "ppl_after": after,
                            "logits_rel_error": rel, "pack_seconds_in_process": bb.seconds})
            print(json.dumps({"slicing": frac, "row": rows[-1]}), file=sys.stderr, flush=True)
            if math.isclose(frac, args.timing_fraction):
                for name, op, a, b, extra in (
                        ("pack, bits-back", "pack", ckpt, work / "t.skpack", []),
                        ("pack, no bits-back", "pack", ckpt, work / "t_plain.skpack", ["plain"]),
                        ("unpack, bits-back", "unpack", work / "t.skpack", work / "t_unpacked", []),
                        ("unpack, no bits-back", "unpack", work / "t_plain.skpack", work / "t_unpacked_plain", [])):
                    t = _timed(op, str(a), str(b), *extra)
                    timing_rows.append([name, round(t["wall_s"], 1), round(t["cpu_s"], 1),
                                        round(t["rss_after_imports"] / 2**20), round(t["rss_peak"] / 2**20)])
                    print(json.dumps({"timing": timing_rows[-1]}), file=sys.stderr, flush=True)
            del model
            for p in work.glob(f"{tag}*.skpack"):
                p.unlink()
            if not args.work:
                shutil.rmtree(ckpt, ignore_errors=True)
                for p in work.glob("t*"):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    size_cols = ["slicing", "params total", "safetensors MB (float32)", "packed, no bits-back MB",
                 "packed, bits-back MB", "packed / safetensors %", "bits-back saving %", "estimate %",
                 "interfaces used", "ppl before", "ppl after", "ppl change %", "logits rel. error"]
    bits_cols = ["slicing", "rotation dofs (M)", "popped Mbit", "corrections Mbit", "rotated weights dearer Mbit",
                 "net saved Mbit", "estimate Mbit", "net bits per dof"]
    time_cols = ["operation", "wall s", "CPU s", "RSS after imports MiB", "peak RSS MiB"]
    tables = [{"title": "file size of the packed model (MB = 10^6 bytes)", "columns": size_cols, "rows": rows},
              {"title": "where the bits go", "columns": bits_cols, "rows": bits_rows}]
    if timing_rows:
        tables.append({"title": f"encode / decode at {round(args.timing_fraction * 100)} % (fresh process each, "
                                f"{args.threads or 'default'} torch thread(s))", "columns": time_cols,
                       "rows": timing_rows})
    notes = [
        f"calibration: {calset.description}",
        f"evaluation: first {windows.shape[0]} windows × {args.eval_seqlen} tokens of {eval_desc} "
        f"({windows.shape[0] * (args.eval_seqlen - 1)} scored tokens); 'ppl after' is the packed file loaded "
        "directly with slicekit.load(FILE); logits rel. error = ‖after − before‖/‖before‖ on the first window",
        "precision: the checkpoint's own (float32): a step of one ulp at each row's RMS (docs/bitsback.md)",
        "safetensors = the checkpoint's *.safetensors files (float32, header included); the packed file also "
        "holds config, tokenizer and loader (zlib, inside the ANS stream)",
        "bits-back saving = (no bits-back − bits-back) / no bits-back, whole files; estimate = the "
        "information-theoretic estimate summed over all interfaces, over the same denominator (paper: 3-5 %)",
        f"whole run: {time.perf_counter() - started:.0f} s wall, {_cpu_seconds() - cpu_started:.0f} s CPU "
        "(this process and the timed children; wall times on a shared 2-core machine under load run up to 2x "
        "the CPU times: compare CPU)",
    ]
    doc = {"title": "Bits-back packing of SliceGPT models (SmolLM2-135M)",
           "command": command_line("bitsback.py", argv),
           "settings": {**vars(args), "calibration": dataclasses.asdict(cal)},
           "tables": tables, "notes": notes, "records": scrub(records)}
    path = write_result(args.out, doc)
    for table in tables:
        print(f"\n**{table['title']}**\n")
        print("| " + " | ".join(table["columns"]) + " |")
        print("|" + "---|" * len(table["columns"]))
        for r in table["rows"]:
            print("| " + " | ".join(str(c) for c in r) + " |")
    print("\n" + "\n".join(f"- {n}" for n in scrub(notes)))
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
