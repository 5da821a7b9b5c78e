"""The end-to-end job the README's first command runs: compress, evaluate, save, reload, generate.

Sizes are chosen to finish in about ten minutes on a 2-core CPU and are printed with the results,
so nobody mistakes a demo number for a full-protocol one.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from slicekit.errors import SlicekitError


def run_demo(args: argparse.Namespace) -> int:
    """FASP at ``--target-params`` of the decoder parameters (a really smaller model: MLP widths
    shrink uniformly, so the output has a plain config), then a short distillation from the dense
    model on Brown (never the evaluation text), then save, reload and generate."""
    import copy

    from slicekit.checkpoint import load, save
    from slicekit.data import load_text
    from slicekit.evaluate import eval_windows, perplexity_of_windows
    from slicekit.methods.fasp import FASPConfig
    from slicekit.models import load_model
    from slicekit.pipeline import CalibrationRequest, compress
    from slicekit.recover import RecoverConfig, recover

    log = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    t_start = time.perf_counter()
    log(f"[1/7] loading {args.model}")
    model, tok = load_model(args.model)
    test = load_text("wikitext2", purpose="eval")
    windows = eval_windows(tok, test, args.eval_seqlen, args.eval_max_windows)
    log(f"[2/7] perplexity of the original on {windows.shape[0]} × {args.eval_seqlen} tokens of {test.description}")
    nll0, ntok = perplexity_of_windows(model, windows, progress=not args.quiet)
    cal = CalibrationRequest("wikitext2", None, args.cal_nsamples, args.cal_seqlen, batch_size=4, seed=42)
    teacher = copy.deepcopy(model) if args.recover_tokens else None
    log(f"[3/7] FASP removing {args.target_params:.0%} of the decoder parameters, {cal.nsamples} × {cal.seqlen} "
        "calibration tokens")
    report = compress(model, tok, "fasp", FASPConfig(target_params=args.target_params), cal, progress=not args.quiet)
    log("[4/7] perplexity of the compressed model")
    nll1, _ = perplexity_of_windows(model, windows, progress=not args.quiet)
    nll2, rec = nll1, None
    if args.recover_tokens:
        log(f"[5/7] recovery: LoRA distillation from the dense model, {args.recover_tokens} tokens of Brown")
        rec = recover(model, tok, RecoverConfig(dataset="brown", seqlen=256, batch_size=4, tokens=args.recover_tokens,
                                                lr=1e-3), teacher=teacher, progress=not args.quiet)
        del teacher
        nll2, _ = perplexity_of_windows(model, windows, progress=not args.quiet)
    log(f"[6/7] saving to {args.out} and reloading")
    info = {"title": "SmolLM2-135M-Instruct, FASP (slicekit demo)", "method": "fasp", "base_model": args.model,
            "settings": report.settings, "calibration": report.calibration,
            "compression_seconds": report.measurement.seconds,
            "params": {"original": report.params_original, "compressed": report.params_compressed},
            "perplexity": [
                {"model": "original", "dataset": test.description, "seqlen": args.eval_seqlen,
                 "windows": int(windows.shape[0]), "ppl": float(torch.tensor(nll0).exp())},
                {"model": "compressed", "dataset": test.description, "seqlen": args.eval_seqlen,
                 "windows": int(windows.shape[0]), "ppl": float(torch.tensor(nll1).exp())}]
            + ([{"model": "recovered", "dataset": test.description, "seqlen": args.eval_seqlen,
                 "windows": int(windows.shape[0]), "ppl": float(torch.tensor(nll2).exp())}] if rec else []),
            "widths": report.summary}
    if rec is not None:
        info["recovery"] = rec.summary()
    fmt = save(model, tok, args.out, info=info)
    reloaded, tok2 = load(args.out)
    probe = windows[:1, :256]
    with torch.no_grad():
        a = model(input_ids=probe).logits
        b = reloaded(input_ids=probe).logits
    rel = float((a - b).norm() / a.norm())
    if rel > 1e-5:
        raise SlicekitError(f"reloaded model differs from the in-memory one (relative error {rel:.2e})")
    log("[7/7] generating with the reloaded model")
    prompt = "The capital of France is"
    ids = tok2(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = reloaded.generate(ids, max_new_tokens=20, do_sample=False)
    text = tok2.decode(gen[0][ids.shape[1]:], skip_special_tokens=True)
    po, pc = report.params_original, report.params_compressed
    result = {
        "model": args.model, "target_params": args.target_params, "calibration": report.calibration,
        "eval": {"dataset": test.description, "seqlen": args.eval_seqlen, "windows": int(windows.shape[0]),
                 "tokens": ntok},
        "ppl_original": float(torch.tensor(nll0).exp()), "ppl_compressed": float(torch.tensor(nll1).exp()),
        "ppl_recovered": float(torch.tensor(nll2).exp()) if rec else None,
        "recovery": rec.summary() if rec else None,
        "file_bytes": {"compressed": _dir_bytes(args.out), "original_f32": 4 * po_total(report)},
        "params": {"original": po, "compressed": pc}, "compression_seconds": report.measurement.seconds,
        "compression_peak_rss_mib": report.measurement.rss_peak / 2**20,
        "saved": args.out, "format": fmt, "reload_max_rel_error": rel, "generation": prompt + text,
        "total_seconds": time.perf_counter() - t_start,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print()
    print(f"slicekit demo — {args.model}, FASP removing {args.target_params:.0%} of decoder parameters"
          + (f", recovered on {args.recover_tokens} tokens of Brown" if rec else ""))
    print(f"calibration: {report.calibration}")
    print(f"evaluation:  {windows.shape[0]} windows × {args.eval_seqlen} tokens of {test.description} "
          f"({ntok} tokens scored; the full test set has more — see benchmarks/RESULTS.md)")
    print()
    print(f"| {'':<27} | {'original':>13} | {'compressed':>13} | {'ratio':>6} |")
    print(f"|{'-' * 29}|{'-' * 15}|{'-' * 15}|{'-' * 8}|")
    print(f"| {'WikiText-2 perplexity':<27} | {result['ppl_original']:>13.3f} | {result['ppl_compressed']:>13.3f} | "
          f"{result['ppl_compressed'] / result['ppl_original']:>6.3f} |")
    if rec:
        print(f"| {'  after recovery':<27} | {'':>13} | {result['ppl_recovered']:>13.3f} | "
              f"{result['ppl_recovered'] / result['ppl_original']:>6.3f} |")
    for k, label in (("total", "parameters (total)"), ("non_embedding", "parameters (no embeddings)"),
                     ("decoder", "parameters (decoder layers)")):
        print(f"| {label:<27} | {po[k]:>13,} | {pc[k]:>13,} | {pc[k] / po[k]:>6.3f} |")
    print()
    print(f"compression: {report.measurement.seconds:.1f} s, peak RSS {report.measurement.rss_peak / 2**20:.0f} MiB")
    print(f"saved to {args.out} ({fmt} format); reloaded with slicekit.load, max relative logit error {rel:.1e}")
    fb = result["file_bytes"]
    print(f"weights on disk: {fb['compressed'] / 2**20:.0f} MiB against {fb['original_f32'] / 2**20:.0f} MiB "
          "for the original in float32")
    print(f"also loads with: AutoModelForCausalLM.from_pretrained({args.out!r}"
          + (")" if fmt == "vanilla" else ", trust_remote_code=True)"))
    print(f"generation (greedy, reloaded model): {result['generation']!r}")
    print(f"total time {result['total_seconds']:.0f} s")
    return 0


def po_total(report) -> int:
    return int(report.params_original["total"])


def _dir_bytes(path: str) -> int:
    import os

    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
