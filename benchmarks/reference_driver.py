"""Run the SliceGPT reference (microsoft/TransformerCompression) on calibration ids and eval windows given by us.

This script is run with the *reference's* Python (its own virtual environment, transformers 4.41),
never with slicekit's.  It imports the reference's package ``slicegpt`` from ``--ref-src`` (the
``src`` directory of a local checkout).  Nothing of the reference is copied here: the script only
calls its public functions (``hf_utils.get_model_and_tokenizer``, ``layernorm_fusion.replace_layers``
/ ``fuse_modules``, ``rotate.rotate_and_slice`` with a ``ConstSlicingScheduler``).

Inputs come from ``--data``, a safetensors file written by ``benchmarks/slicegpt_vs_reference.py``:
``cal_input_ids`` (N × L, int64; the calibration samples, drawn once by slicekit's sampler) and
``eval_input_ids`` (W × S, int64; the test windows).  Both tools therefore see exactly the same
token ids; the reference's own sampler and tokenizer are not used.

Measured (compression only): wall time and RSS (sampled every 5 ms in a thread) of
``replace_layers + fuse_modules + rotate_and_slice``; ``rss_before`` is taken after ``gc.collect()``
and ``malloc_trim(0)``, so memory freed earlier in the process is not counted as headroom.
Perplexity: token-level, ``exp(mean NLL)`` over every predicted token of every window (float64
accumulation) — the same protocol as ``slicekit.evaluate``.  Parameters: real tensors of the model
after slicing (the reference unties the head and adds shortcut matrices).

Example (reference venv)::

    /path/to/ref/venv/bin/python benchmarks/reference_driver.py --ref-src /path/to/TransformerCompression/src \\
        --model-path /path/to/smollm2-135m-ref --data ids.safetensors --sparsity 0.25 --json-out ref.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import sys
import threading
import time


def current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so that an RSS baseline
    does not include memory the allocator merely keeps."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """``with PeakRSS() as m:`` → ``m.seconds``, ``m.rss_before``, ``m.rss_peak`` (5 ms sampling)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.seconds = 0.0
        self.rss_before = self.rss_peak = 0
        self.samples = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.rss_peak = max(self.rss_peak, current_rss())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.rss_before = self.rss_peak = current_rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.rss_peak = max(self.rss_peak, current_rss())

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "rss_before_mib": self.rss_before / 2**20,
                "rss_peak_mib": self.rss_peak / 2**20,
                "rss_added_mib": max(0, self.rss_peak - self.rss_before) / 2**20, "rss_samples": self.samples}


def perplexity(model, windows, batch_size: int = 1) -> dict:
    """Token-level perplexity over all windows (slicekit's protocol)."""
    import torch

    total, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in torch.split(windows, batch_size):
            logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)
            total += nll.double().sum().item()
            count += nll.numel()
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count,
            "windows": int(windows.shape[0]), "seconds": time.perf_counter() - t0}


def count_parameters(model, adapter) -> dict:
    """Real parameters (shared tensors once): total, without embeddings and head, shortcut matrices."""
    import torch

    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb_head: set[int] = set()
    emb = 0
    for w in [*(m.weight for m in adapter.get_embeddings()), adapter.get_lm_head().weight]:
        if id(w) not in emb_head:
            emb_head.add(id(w))
            emb += w.numel()
    shortcuts = 0
    for la in adapter.get_layers():
        for name in ("attn_shortcut_Q", "mlp_shortcut_Q"):
            q = getattr(la.layer, name, None)
            if isinstance(q, torch.Tensor):
                shortcuts += q.numel()
    return {"total": total, "non_embedding": total - emb, "shortcut_matrices": shortcuts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref-src", required=True, help="the reference checkout's src directory (holds slicegpt/)")
    ap.add_argument("--model-path", required=True, help="model directory in the reference's transformers format")
    ap.add_argument("--model-name", default="meta-llama/Llama-2-7b-hf",
                    help="only selects the reference's adapter (Llama for a Llama-architecture model)")
    ap.add_argument("--data", required=True, help="safetensors with cal_input_ids (N×L) and eval_input_ids (W×S)")
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--cal-batch-size", type=int, default=8)
    ap.add_argument("--round-interval", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-batch-size", type=int, default=1)
    ap.add_argument("--skip-dense-eval", action="store_true")
    ap.add_argument("--skip-sliced-eval", action="store_true")
    ap.add_argument("--eval-fused", action="store_true",
                    help="also evaluate the model right after layer-norm fusion (not timed)")
    ap.add_argument("--keep-embedding-mean", action="store_true",
                    help="undo fuse_modules' centring of the embedding rows (which changes an RMSNorm model) "
                         "by restoring the embedding weights after fusion; everything else unchanged")
    ap.add_argument("--json-out", required=True)
    args = ap.parse_args()

    sys.path.insert(0, os.path.abspath(args.ref_src))
    import slicegpt
    import torch
    from safetensors.torch import load_file
    from slicegpt import hf_utils, layernorm_fusion, rotate
    from slicegpt.config import config
    from slicegpt.slicing_scheduler import ConstSlicingScheduler

    torch.set_num_threads(args.threads)
    config.device = torch.device("cpu")
    config.dtype = torch.float32
    if not 0 <= args.sparsity < 1:
        raise SystemExit("sparsity must be in [0, 1)")

    data = load_file(args.data)
    cal_ids, eval_ids = data["cal_input_ids"].long(), data["eval_input_ids"].long()
    res: dict = {"settings": vars(args).copy(), "slicegpt_path": os.path.dirname(slicegpt.__file__),
                 "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                              "transformers": __import__("transformers").__version__},
                 "threads": torch.get_num_threads(), "cal_shape": list(cal_ids.shape),
                 "eval_shape": list(eval_ids.shape)}

    adapter, _tok = hf_utils.get_model_and_tokenizer(args.model_name, args.model_path, dtype=torch.float32)
    model = adapter.model
    model.eval()
    res["adapter"] = type(adapter).__name__
    res["params_dense"] = count_parameters(model, adapter)
    if not args.skip_dense_eval:
        res["ppl_dense"] = perplexity(model, eval_ids, args.eval_batch_size)
        print(f"reference dense ppl {res['ppl_dense']['ppl']:.4f}", file=sys.stderr, flush=True)

    new_dim = int((1 - args.sparsity) * adapter.hidden_size)
    new_dim -= new_dim % args.round_interval
    res["new_embedding_dimension"] = new_dim
    # The batches the reference's dataloader would yield: dicts with input_ids and an all-ones mask.
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in torch.split(cal_ids, args.cal_batch_size)]

    release_free_memory()
    seconds = 0.0
    with PeakRSS() as fuse_m:
        saved = [m.weight.data.clone() for m in adapter.get_embeddings()] if args.keep_embedding_mean else None
        layernorm_fusion.replace_layers(adapter)
        layernorm_fusion.fuse_modules(adapter)
        if saved is not None:
            for m, w in zip(adapter.get_embeddings(), saved):
                m.weight.data = w
            del saved
    seconds += fuse_m.seconds
    if args.eval_fused:
        res["ppl_fused"] = perplexity(model, eval_ids, args.eval_batch_size)
        print(f"reference fused ppl {res['ppl_fused']['ppl']:.4f}", file=sys.stderr, flush=True)
        release_free_memory()
    with PeakRSS() as rs_m:
        rotate.rotate_and_slice(adapter, batches, ConstSlicingScheduler(new_dim), final_orientation="pca")
    seconds += rs_m.seconds
    res["compression"] = {
        "seconds": seconds,
        "rss_before_mib": fuse_m.rss_before / 2**20,
        "rss_peak_mib": max(fuse_m.rss_peak, rs_m.rss_peak) / 2**20,
        "rss_added_mib": max(0, max(fuse_m.rss_peak, rs_m.rss_peak) - fuse_m.rss_before) / 2**20,
        "fuse": fuse_m.as_dict(), "rotate_and_slice": rs_m.as_dict(),
        "covers": "replace_layers + fuse_modules + rotate_and_slice (calibration ids already tensors)",
    }
    print(f"reference compression {seconds:.1f} s, peak RSS {res['compression']['rss_peak_mib']:.0f} MiB "
          f"(+{res['compression']['rss_added_mib']:.0f} MiB)", file=sys.stderr, flush=True)
    res["params_sliced"] = count_parameters(model, adapter)
    if not args.skip_sliced_eval:
        res["ppl_sliced"] = perplexity(model, eval_ids, args.eval_batch_size)
        print(f"reference sliced ppl {res['ppl_sliced']['ppl']:.4f}", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w") as fh:
        json.dump(res, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
