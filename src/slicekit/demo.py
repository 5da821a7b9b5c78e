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
    tasks = [t for t in args.zeroshot_tasks.split(",") if t] if args.zeroshot_limit else []
    stages: dict[str, dict] = {}

    def check(stage: str, m: torch.nn.Module) -> None:
        """The short quality check every stage gets: zero-shot on the first items, greedy text."""
        entry: dict = {"generation": _generate(m, tok, PROMPT)}
        if tasks:
            from slicekit.zeroshot import evaluate_tasks

            entry["zeroshot"] = evaluate_tasks(m, tok, tasks, limit=args.zeroshot_limit, batch_size=8,
                                               progress=False)
        stages[stage] = entry

    log(f"[2/7] perplexity of the original on {windows.shape[0]} × {args.eval_seqlen} tokens of {test.description}"
        + (f"; zero-shot on the first {args.zeroshot_limit} items of {', '.join(tasks)}" if tasks else ""))
    nll0, ntok = perplexity_of_windows(model, windows, progress=not args.quiet)
    check("original", model)
    cal = CalibrationRequest("wikitext2", None, args.cal_nsamples, args.cal_seqlen, batch_size=4, seed=42)
    teacher = copy.deepcopy(model) if args.recover_tokens else None
    log(f"[3/7] FASP removing {args.target_params:.0%} of the decoder parameters, {cal.nsamples} × {cal.seqlen} "
        "calibration tokens")
    report = compress(model, tok, "fasp", FASPConfig(target_params=args.target_params), cal, progress=not args.quiet)
    log("[4/7] quality of the compressed model")
    nll1, _ = perplexity_of_windows(model, windows, progress=not args.quiet)
    check("compressed", model)
    nll2, rec = nll1, None
    if args.recover_tokens:
        log(f"[5/7] recovery: full fine-tuning distilled from the dense model on {args.recover_tokens} tokens of "
            "Brown (its train split; never the evaluation text)")
        # Many small steps (1 × 256 tokens) rather than few large ones: at a budget this short the
        # number of optimizer steps limits recovery (RecoverConfig's docstring has the measurements).
        rec = recover(model, tok, RecoverConfig(dataset="brown", seqlen=256, batch_size=1, tokens=args.recover_tokens,
                                                mode="full", lr=2e-4), teacher=teacher, progress=not args.quiet)
        del teacher
        nll2, _ = perplexity_of_windows(model, windows, progress=not args.quiet)
        check("recovered", model)
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
    reloaded_text = _generate(reloaded, tok2, PROMPT)
    final = "recovered" if rec else "compressed"
    same_text = reloaded_text == stages[final]["generation"]  # logits already agree to 1e-5; greedy ties aside
    zs = {k: v["zeroshot"] for k, v in stages.items() if "zeroshot" in v}
    scored = zs["original"].margin_tasks(tasks) if zs else []
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
        "saved": args.out, "format": fmt, "reload_max_rel_error": rel,
        "generation": {k: PROMPT + v["generation"] for k, v in stages.items()},
        "reloaded_generation": PROMPT + reloaded_text, "reloaded_generates_the_same": same_text,
        "zeroshot": {k: v.as_dict() for k, v in zs.items()},
        "zeroshot_above_chance_retained": {k: v.above_chance_retention(zs["original"], scored)
                                           for k, v in zs.items() if k != "original" and scored},
        # paired bootstrap over the items: how far a smoke check's retention can be trusted
        "zeroshot_above_chance_interval95": {k: v.above_chance_interval(zs["original"], scored)
                                             for k, v in zs.items() if k != "original" and scored},
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
    w = 31  # the label column: wide enough for every label below

    def row(label: str, original: str, compressed: str, ratio: str) -> None:
        print(f"| {label:<{w}} | {original:>13} | {compressed:>13} | {ratio:>6} |")

    row("", "original", "compressed", "ratio")
    print(f"|{'-' * (w + 2)}|{'-' * 15}|{'-' * 15}|{'-' * 8}|")
    row("WikiText-2 perplexity", f"{result['ppl_original']:.3f}", f"{result['ppl_compressed']:.3f}",
        f"{result['ppl_compressed'] / result['ppl_original']:.3f}")
    if rec:
        row("  after recovery", "", f"{result['ppl_recovered']:.3f}",
            f"{result['ppl_recovered'] / result['ppl_original']:.3f}")
    if zs:
        z0 = zs["original"].average(tasks)
        later = [k for k in ("compressed", "recovered") if k in zs]
        for k in later:
            zk = zs[k].average(tasks)
            label = f"zero-shot mean ({args.zeroshot_limit}/task)" if k == "compressed" else "  after recovery"
            row(label, f"{z0:.3f}" if k == "compressed" else "", f"{zk:.3f}", f"{zk / max(z0, 1e-9):.3f}")
        for k in later:
            kept = result["zeroshot_above_chance_retained"].get(k)
            if kept is not None:
                row(f"  above-chance kept, {k}", "", f"{kept:.3f}", "")
    for k, label in (("total", "parameters (total)"), ("non_embedding", "parameters (no embeddings)"),
                     ("decoder", "parameters (decoder layers)")):
        row(label, f"{po[k]:,}", f"{pc[k]:,}", f"{pc[k] / po[k]:.3f}")
    if zs and args.zeroshot_limit and args.zeroshot_limit < 100:
        print(f"(zero-shot on {args.zeroshot_limit} items per task is a smoke check: one item moves a task by "
              f"{100 / args.zeroshot_limit:.0f} points, so a compressed model can score above the original; "
              "benchmarks/RESULTS.md has the larger runs)")
    intervals = {k: v for k, v in result["zeroshot_above_chance_interval95"].items() if v is not None}
    if intervals:
        print("(above-chance kept, 95 % paired-bootstrap interval over the items: "
              + "; ".join(f"{k} {lo:.2f} to {hi:.2f}" for k, (lo, hi) in intervals.items()) + ")")
    left = [t for t in tasks if t not in scored]
    if zs and left:
        print(f"(above-chance kept is over {', '.join(scored) or 'no task'}; left out, the original within two "
              f"standard errors of chance: {', '.join(left)})")
    print()
    print(f"compression: {report.measurement.seconds:.1f} s, peak RSS {report.measurement.rss_peak / 2**20:.0f} MiB")
    print(f"saved to {args.out} ({fmt} format); reloaded with slicekit.load, max relative logit error {rel:.1e}")
    fb = result["file_bytes"]
    print(f"weights on disk: {fb['compressed'] / 2**20:.0f} MiB against {fb['original_f32'] / 2**20:.0f} MiB "
          "for the original in float32")
    print(f"also loads with: AutoModelForCausalLM.from_pretrained({args.out!r}"
          + (")" if fmt == "vanilla" else ", trust_remote_code=True)"))
    for stage in stages:
        print(f"greedy text, {stage + ':':<12} {result['generation'][stage]!r}")
    print(f"the reloaded model generates the same text as the {final} one in memory" if same_text else
          f"the reloaded model generates {result['reloaded_generation']!r}, the {final} one in memory "
          f"{result['generation'][final]!r} (their logits agree to {rel:.1e}: a near-tie in the greedy choice)")
    print(f"total time {result['total_seconds']:.0f} s")
    return 0


PROMPT = "The capital of France is"


def _generate(model: torch.nn.Module, tok, prompt: str, new_tokens: int = 20) -> str:
    """Greedy continuation of ``prompt`` (what a user tries first)."""
    ids = tok(prompt, return_tensors="pt").input_ids
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    model.train(was)
    return tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True)


def po_total(report) -> int:
    return int(report.params_original["total"])


def _dir_bytes(path: str) -> int:
    import os

    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
