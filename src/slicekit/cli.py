"""The ``slicekit`` command line.

Every user error (bad model, data, ratio, file) ends in one line on stderr and exit code 2 — never
a traceback.  ``--json`` prints exactly one JSON object on stdout; human output and progress bars
go to stderr, so ``--json`` output can be piped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import asdict
from typing import Any, NoReturn

from slicekit.errors import SlicekitError


def _out(obj: dict[str, Any], as_json: bool, human: str) -> None:
    if as_json:
        print(json.dumps(obj, default=str))
    else:
        print(human)


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="hub id, local directory, .gguf file, or alias (smollm2-135m)")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16, bfloat16")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--device-map", default=None,
                   help="auto, balanced, sequential or FILE.json: spread the model over the visible GPUs (and the "
                        "CPU) with accelerate instead of --device")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_method_options(p: argparse.ArgumentParser, method: str) -> None:
    """One ``--option`` per field of ``method``'s config dataclass: type, default and help are the
    method's own (from the dataclass and its docstring), so ``compress --method X --help`` shows X's."""
    from slicekit.methods import config_fields, field_type, get_method

    entry = get_method(method)
    group = p.add_argument_group(f"{method} options", entry.description)
    for f in config_fields(entry.config_cls):
        flag = "--" + f.name.replace("_", "-")
        base, optional, choices = field_type(entry.config_cls, f)
        default = f.default if f.default is not dataclasses.MISSING else None
        text = (_field_help(entry.config_cls, f.name) + f" (default: {default})").replace("%", "%%")
        if base is bool:
            group.add_argument(flag, dest=f"m_{f.name}", action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(flag, dest=f"m_{f.name}", default=None, metavar=base.__name__.upper(),
                               choices=None, help=text + (f"; one of {', '.join(map(str, choices))}" if choices else "")
                               + ("; 'none' for unset" if optional else ""))


def _field_help(cls: type, name: str) -> str:
    r"""The sentence of the config's docstring that introduces ``name`` (``\`\`name\`\`: …``)."""
    import re

    for klass in cls.__mro__:
        text = vars(klass).get("HELP", {}).get(name)
        if text:
            return text
    doc = " ".join((cls.__doc__ or "").split())
    for src in (doc, " ".join((cls.__mro__[1].__doc__ or "").split())):
        m = re.search(rf"``{name}``[^.]*?(?::|is|—)\s*(.+?\.)(?:\s|$)", src)
        if m:
            return m.group(1).replace("``", "")
    return name.replace("_", " ")


def _read_recipe(path: str) -> dict[str, Any]:
    """A recipe file: ``{"method": ..., "settings": {...}, "calibration": {...}}`` as JSON or YAML."""
    if not os.path.isfile(path):
        raise SlicekitError(f"recipe file not found: {path}")
    try:
        with open(path) as fh:
            text = fh.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (OSError, ValueError) as err:
        raise SlicekitError(f"cannot read recipe {path}: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict) or not isinstance(data.get("settings", {}), dict) \
            or not isinstance(data.get("calibration", {}), dict):
        raise SlicekitError(f"recipe {path} must be a mapping with 'method', 'settings' and 'calibration'")
    unknown = set(data) - {"method", "settings", "calibration", "slicekit_version"}
    if unknown:
        raise SlicekitError(f"recipe {path}: unknown key(s) {', '.join(sorted(unknown))}")
    return data


def _build_method_config(method: str, args: argparse.Namespace, recipe: dict[str, Any]) -> Any:
    from slicekit.methods import coerce_field, config_fields, get_method, upgrade_settings

    entry = get_method(method)
    values = upgrade_settings(entry.config_cls, recipe.get("settings", {}))
    for f in config_fields(entry.config_cls):
        given = getattr(args, f"m_{f.name}", None)
        if given is not None:
            values[f.name] = given
    kwargs = {k: coerce_field(entry.config_cls, k, v) for k, v in values.items()}
    try:
        return entry.config_cls(**kwargs)
    except TypeError as err:
        raise SlicekitError(f"invalid settings for {method}: {err}") from err


# ---------------------------------------------------------------- commands

def cmd_info(args: argparse.Namespace) -> int:
    from slicekit.arch import (
        UnsupportedArchitectureError,
        attention_info,
        get_arch,
        mlp_width,
        model_type_of,
        text_config,
    )
    from slicekit.methods import available_methods, get_method
    from slicekit.models import count_parameters, generic_counts, load_model
    from slicekit.pipeline import check_supported

    model, tok = load_model(args.model, args.dtype, args.device, require_adapter=False,
                            require_tokenizer=bool(args.layer_scores))
    cfg = model.config
    text = text_config(cfg)
    info: dict[str, Any] = {
        "model": args.model, "model_type": model_type_of(cfg), "architecture": type(model).__name__,
        "layers": getattr(text, "num_hidden_layers", None), "hidden_size": getattr(text, "hidden_size", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "tied_embeddings": bool(getattr(text, "tie_word_embeddings", False)),
        "compressed": getattr(model, "slicekit", None) is not None,
    }
    from slicekit.models import resolve_model

    src = resolve_model(args.model)
    # vanilla: a plain config of the family, which any engine that reads standard checkpoints serves
    info["format"] = {"slicekit": "slicekit (custom shape: trust_remote_code=True or slicekit.load)",
                      "packed": "packed (slicekit unpack, or slicekit.load)",
                      "gguf": "gguf"}.get(src.kind, "vanilla (plain config, no remote code)")
    if src.kind == "dir" and os.path.isfile(os.path.join(src.path, "recipe.json")):
        info["compressed"] = True  # a slicekit output whose shape the plain config describes
    try:
        spec = get_arch(cfg)
    except UnsupportedArchitectureError:
        spec = None
    if spec is not None:
        att = attention_info(cfg)
        info.update({"intermediate_size": mlp_width(cfg), "num_heads": att.num_heads, "num_kv_heads": att.num_kv_heads,
                     "head_dim": att.head_dim, "rotary_dim": att.rotary_dim, "parallel_residual": spec.block.parallel,
                     "norm": spec.norm_kind, "params": count_parameters(model)})
    else:
        info["params"] = generic_counts(model)
    with contextlib.suppress(Exception):  # a family whose cache transformers cannot build for one token
        from slicekit.bench import kv_cache_bytes_per_token

        info["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(model)
    methods = []
    for name in available_methods():
        entry = get_method(name)
        try:
            check_supported(entry, model, entry.config_cls())
            methods.append(name)
        except SlicekitError:
            pass
    info["compression_methods"] = methods
    lines = [f"{k:>20}: {v}" for k, v in info.items() if k not in ("params", "compression_methods")]
    lines += [f"{'params ' + k:>20}: {v:,}" for k, v in info["params"].items()]
    lines.append(f"{'compression methods':>20}: " + (", ".join(methods) if methods else
                 "none (no adapter for this architecture; info, eval and bench work on any causal LM)"))
    if args.layer_scores:
        info["layer_scores"] = _layer_scores(model, tok, args)
        lines += [f"layer scores on {info['layer_scores']['calibration']}:", f"{'layer':>6} {'LR':>9} {'BI':>9}"]
        lines += [f"{i:>6} {lr:>9.5f} {bi:>9.5f}"
                  for i, (lr, bi) in enumerate(zip(info["layer_scores"]["lr"], info["layer_scores"]["bi"]))]
    _out(info, args.json, "\n".join(lines))
    return 0


def _layer_scores(model: Any, tok: Any, args: argparse.Namespace) -> dict[str, Any]:
    """LR/BI per block (:func:`slicekit.scores.layer_scores`) on freshly drawn calibration text."""
    from slicekit.pipeline import CalibrationRequest, calibration_batches
    from slicekit.scores import layer_scores

    if getattr(model, "slicekit", None) is not None:
        raise SlicekitError("--layer-scores measures an uncompressed model (block inputs and outputs of "
                            "a sliced model live in different bases)")
    if tok is None:
        raise SlicekitError(f"--layer-scores needs a tokenizer and {args.model} has none")
    req = CalibrationRequest(args.cal_dataset, None, args.cal_nsamples, args.cal_seqlen, 4, args.seed)
    batches, description = calibration_batches(tok, req)
    scores = layer_scores(model, batches, device=args.device, progress=not args.quiet)
    return {**scores.as_dict(), "calibration": description}


def cmd_eval(args: argparse.Namespace) -> int:
    from slicekit.data import load_text
    from slicekit.evaluate import perplexity
    from slicekit.models import load_model

    if args.tasks:
        return _eval_tasks(args)
    source = load_text(args.dataset, args.split, purpose="eval")
    model, tok = load_model(args.model, args.dtype, args.device, require_adapter=False, device_map=args.device_map)
    res = perplexity(model, tok, source, args.seqlen, args.max_windows, args.batch_size, progress=not args.quiet)
    d = res.as_dict()
    _out(d, args.json, f"perplexity {res.ppl:.4f} on {res.dataset}: {res.windows} windows × {res.seqlen} tokens "
                       f"({res.tokens} tokens scored)")
    return 0


def _eval_tasks(args: argparse.Namespace) -> int:
    """Zero-shot accuracy through lm-eval (local task files first, the hub otherwise)."""
    from slicekit.models import load_model
    from slicekit.zeroshot import ZeroShotResult, evaluate_tasks, resolve_task_name

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        resolve_task_name(t)  # an unknown task fails before the model is loaded
    if args.limit is not None and args.limit < 1:
        raise SlicekitError(f"--limit must be ≥ 1 (got {args.limit})")
    dense = None
    if args.dense_json:
        try:
            with open(args.dense_json) as fh:
                dense = ZeroShotResult.from_dict(json.load(fh))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SlicekitError(f"cannot read --dense-json {args.dense_json}: {err}") from err
    model, tok = load_model(args.model, args.dtype, args.device, require_adapter=False, device_map=args.device_map)
    res = evaluate_tasks(model, tok, tasks, limit=args.limit, batch_size=args.batch_size,
                         num_fewshot=args.num_fewshot, device=None if args.device_map else args.device,
                         progress=not args.quiet)
    out = res.as_dict()
    if dense is not None:
        out["retention"] = res.retention(dense)
        # over the tasks where the dense margin is measurable; None (not an error after a long
        # evaluation) when there is none
        kept = res.above_chance_tasks(dense)
        out["above_chance_tasks"] = kept
        out["above_chance_retention"] = res.above_chance_retention(dense, kept) if kept else None
        interval = res.above_chance_interval(dense, kept) if kept else None
        out["above_chance_retention_interval95"] = list(interval) if interval else None
        # the same measure in plain acc on every task (how issue #14's bar writes it)
        kept_acc = res.above_chance_tasks(dense, "acc")
        out["above_chance_tasks_acc"] = kept_acc
        out["above_chance_retention_acc"] = (res.above_chance_retention(dense, kept_acc, metric="acc")
                                             if kept_acc else None)
        interval = res.above_chance_interval(dense, kept_acc, metric="acc") if kept_acc else None
        out["above_chance_retention_acc_interval95"] = list(interval) if interval else None
    if args.save_json:
        _write_json_atomic(args.save_json, out)
    _out(out, args.json, res.format_table(dense=dense))
    return 0


def _write_json_atomic(path: str, obj: Any) -> None:
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, default=str)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cmd_compress(args: argparse.Namespace) -> int:
    from slicekit.checkpoint import save
    from slicekit.data import load_text
    from slicekit.evaluate import eval_windows, perplexity_result
    from slicekit.models import load_model
    from slicekit.pipeline import CalibrationRequest, compress
    from slicekit.plots import summary_widths_png

    recipe = _read_recipe(args.recipe) if args.recipe else {}
    if recipe.get("method") and recipe["method"] != args.method:
        raise SlicekitError(f"--method {args.method} contradicts the recipe's method {recipe['method']}")
    config = _build_method_config(args.method, args, recipe)
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SlicekitError(f"--out {args.out} exists and is not a directory")
    from slicekit.validate import default_window, model_context_length

    cal_defaults = {"dataset": "wikitext2", "split": None, "nsamples": 128,
                    "seqlen": default_window(2048, model_context_length(args.model)), "batch_size": 8,
                    "seed": 42, "strategy": "documents", **recipe.get("calibration", {})}
    for key in cal_defaults:
        given = getattr(args, "seed" if key == "seed" else f"cal_{key}", None)
        if given is not None:
            cal_defaults[key] = given
    try:
        cal = CalibrationRequest(**cal_defaults)
    except TypeError as err:
        raise SlicekitError(f"invalid calibration settings: {err}") from err
    rec_config = None
    if args.recover:
        if args.stream:
            raise SlicekitError("--stream never holds the whole model, so it cannot train it: compress with "
                                "--stream --out DIR, then `slicekit recover --model DIR --teacher MODEL`")
        rec_config = _recover_config(args, "r_")
    elif args.recover_resume_dir or _recover_values(args, "r_"):
        raise SlicekitError("--recover-* options set recovery training: add --recover")
    from slicekit.validate import preflight

    preflight(args, cal)  # arguments, context, dtype/device, output location and space: before any loading
    if args.offload_dir:
        if os.path.exists(args.offload_dir) and not os.path.isdir(args.offload_dir):
            raise SlicekitError(f"--offload-dir {args.offload_dir} exists and is not a directory")
        parent = args.offload_dir if os.path.isdir(args.offload_dir) else os.path.dirname(os.path.abspath(args.offload_dir))
        if not os.access(parent, os.W_OK) and os.path.isdir(parent):
            raise SlicekitError(f"--offload-dir {args.offload_dir}: cannot write there (permission denied)")
    if args.device_map:
        raise SlicekitError("compress already keeps only the layer under compression on --device (e.g. cuda) and "
                            "the rest in host memory; --device-map is for eval, bench and recover")
    if args.dry_run:
        return _dry_run(args, config, cal)
    if args.stream:
        if not args.out:
            raise SlicekitError("--stream writes each compressed layer as it goes: give --out DIR")
        if args.eval:
            raise SlicekitError("--stream never holds the whole model, so it cannot evaluate it; evaluate the "
                                "output afterwards: `slicekit eval --model OUT`")
    elif args.restart:
        raise SlicekitError("--restart discards the partial work of a --stream run; it needs --stream")
    eval_source = load_text(args.eval_dataset, None, purpose="eval") if args.eval else None
    if args.stream:
        from slicekit.models import parse_dtype
        from slicekit.streaming import load_streamed, stream_source_dir

        model, tok = load_streamed(stream_source_dir(args.model), parse_dtype(args.dtype))
        if args.save_dtype:
            from slicekit.streaming import source_of

            source_of(model).save_dtype = parse_dtype(args.save_dtype)
    else:
        model, tok = load_model(args.model, args.dtype, args.device)
    ppl_rows = []
    windows = None
    if eval_source is not None:  # tokenised once, scored before and after
        windows = eval_windows(tok, eval_source, args.eval_seqlen, args.eval_max_windows)
        r = perplexity_result(model, windows, eval_source.description, args.eval_batch_size, not args.quiet)
        ppl_rows.append({"model": "original", **r.as_dict()})
    report = compress(model, tok, args.method, config, cal, device=args.device, progress=not args.quiet,
                      out_dir=args.out if args.stream else None, restart=args.restart, offload_dir=args.offload_dir)
    if windows is not None:
        r = perplexity_result(model, windows, eval_source.description, args.eval_batch_size, not args.quiet)
        ppl_rows.append({"model": "compressed", **r.as_dict()})
    recovery = None
    if rec_config is not None:
        from slicekit.recover import recover

        def teacher() -> Any:  # loaded only now: compression never holds two models
            return load_model(args.model, args.dtype, args.device)[0]

        rec = recover(model, tok, rec_config, teacher=teacher, progress=not args.quiet,
                      resume_dir=args.recover_resume_dir)
        if rec.interrupted:
            raise SlicekitError("recovery was interrupted and nothing was saved; "
                                + (f"its progress is checkpointed in {args.recover_resume_dir}: rerun the same "
                                   "command to compress again and resume" if args.recover_resume_dir else
                                   "rerun the command (with --recover-resume-dir DIR to make it resumable)"))
        recovery = rec.summary()
        if windows is not None:
            r = perplexity_result(model, windows, eval_source.description, args.eval_batch_size, not args.quiet)
            ppl_rows.append({"model": "recovered", **r.as_dict()})
    out = report.as_dict()
    if recovery is not None:
        out["recovery"] = recovery
    out["model"] = args.model
    out["perplexity"] = ppl_rows
    if args.out:
        from slicekit import __version__
        from slicekit.validate import public_value

        # shared with the model: local files by name only (a named dataset stays a name)
        recipe_out = public_value({"method": args.method, "slicekit_version": __version__,
                                   "settings": {k: v for k, v in report.settings.items()
                                                if k not in ("calibration", "config_version")},
                                   "calibration": asdict(cal)})
        info = {"title": f"{os.path.basename(os.path.abspath(args.out))}", "method": args.method,
                "base_model": args.model, "settings": report.settings, "calibration": report.calibration,
                "compression_seconds": report.measurement.seconds, "recipe": recipe_out,
                "params": {"original": report.params_original, "compressed": report.params_compressed},
                "perplexity": ppl_rows, "widths": report.summary}
        if recovery is not None:
            info["recovery"] = recovery
        png = summary_widths_png(report.summary, f"{args.model}, {args.method}")
        files = {"recipe.json": json.dumps(recipe_out, indent=2).encode()}
        if png:
            files["layer_widths.png"] = png
        from slicekit.models import directory_weight_bytes, parse_dtype, weights_file_bytes

        info["original_weights_bytes"] = weights_file_bytes(args.model)
        info["save_dtype"] = args.save_dtype
        out["format"] = save(model, tok, args.out, info=info, extra_files=files,
                             dtype=parse_dtype(args.save_dtype) if args.save_dtype else None)
        out["weights_bytes"] = directory_weight_bytes(args.out)
        out["original_weights_bytes"] = info["original_weights_bytes"]
        out["out"] = os.path.abspath(args.out)
    po, pc = report.params_original, report.params_compressed
    lines = [f"method {args.method}: {json.dumps(report.settings)}", f"calibration: {report.calibration}",
             f"{'':>16} {'original':>14} {'compressed':>14} {'ratio':>7}"]
    for k in ("total", "non_embedding", "decoder"):
        lines.append(f"{k + ' params':>16} {po[k]:>14,} {pc[k]:>14,} {pc[k] / po[k]:>7.3f}")
    m = report.measurement
    lines.append(f"compression: {m.seconds:.1f} s, peak RSS {m.rss_peak / 2**20:.0f} MiB "
                 f"(+{m.rss_added / 2**20:.0f} MiB)" + (f", CUDA peak {m.cuda_peak / 2**20:.0f} MiB" if m.cuda_peak else ""))
    if recovery is not None:
        lines.append(f"recovery: {recovery['tokens']:,} tokens of {recovery['data']} in "
                     f"{recovery['train_seconds'] / 60:.1f} min ({recovery['mode']}, {recovery['loss']})"
                     + (f", loss {recovery['first_loss']:.4f} → {recovery['last_loss']:.4f}"
                        if recovery.get("first_loss") is not None else ""))
    for row in ppl_rows:
        lines.append(f"perplexity {row['model']:>10}: {row['ppl']:.4f} ({row['windows']} × {row['seqlen']} tokens of {row['dataset']})")
    if args.out:
        lines.append(f"saved ({out['format']} format) to {out['out']}: weights {out['weights_bytes'] / 2**20:,.1f} MiB"
                     + (f" (original files {out['original_weights_bytes'] / 2**20:,.1f} MiB)"
                        if out.get("original_weights_bytes") else ""))
    from slicekit.profiling import process_peak_rss

    out["process_peak_rss_mib"] = process_peak_rss() / 2**20
    lines.append(f"process peak RSS (loading, compression and saving): {out['process_peak_rss_mib']:,.0f} MiB"
                 + (" — streamed layer by layer" if args.stream else ""))
    _out(out, args.json, "\n".join(lines))
    return 0


def _dry_run(args: argparse.Namespace, config: Any, cal: Any) -> int:
    """Predicted peak memory and time of this compression, before any weight is read."""
    from slicekit.memory import predict
    from slicekit.models import parse_dtype

    pred = predict(args.model, args.method, config, cal.nsamples, cal.seqlen, cal.batch_size,
                   parse_dtype(args.dtype), args.device, stream=args.stream)
    _out({"dry_run": pred.as_dict(), "model": args.model, "method": args.method}, args.json, pred.describe())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from slicekit.bench import BenchSettings, bench_models, linear_flops_per_token, ratios
    from slicekit.models import load_model

    models = {"model": load_model(args.model, args.dtype, args.device, require_tokenizer=False, require_adapter=False,
                                  device_map=args.device_map)[0]}
    if args.baseline:
        models["baseline"] = load_model(args.baseline, args.dtype, args.device, device_map=args.device_map,
                                        require_tokenizer=False,
                                        require_adapter=False)[0]
    settings = BenchSettings(repeats=args.repeats, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                             threads=args.threads)
    results = bench_models(models, settings)
    out = {name: {**res.medians(), "linear_flops_per_token": linear_flops_per_token(models[name])}
           for name, res in results.items()}
    out["settings"] = dataclasses.asdict(settings)
    out["device"] = args.device
    lines = [f"{'':>22} " + " ".join(f"{n:>12}" for n in results) + ("        ratio" if args.baseline else "")]
    med = {n: r.medians() for n, r in results.items()}
    if args.baseline:
        out["ratios"] = ratios(results["model"], results["baseline"])
        out["ideal_ratio_from_flops"] = out["baseline"]["linear_flops_per_token"] / out["model"]["linear_flops_per_token"]
    for kind, key in (("prefill", "prefill_tokens_per_s"), ("decode", "decode_tokens_per_s")):
        for shape in med["model"][key]:
            row = f"{kind + ' ' + shape + ' tok/s':>22} " + " ".join(f"{med[n][key][shape]:>12.1f}" for n in results)
            if args.baseline:
                row += f" {out['ratios'][kind][shape]:>12.3f}"
            lines.append(row)
    lines.append(f"{'peak RSS MiB':>22} " + " ".join(f"{med[n]['peak_rss_mib']:>12.0f}" for n in results))
    if args.baseline:
        lines.append(f"ideal speed-up from matrix FLOPs removed: {out['ideal_ratio_from_flops']:.3f}")
    _out(out, args.json, "\n".join(lines))
    return 0


def _add_dataclass_options(p: argparse.ArgumentParser, cls: type, title: str, prefix: str = "",
                           dest: str = "m_") -> None:
    """One option per field of a settings dataclass (as for methods): ``--<prefix><field>``, dest
    ``<dest><field>``.  The prefix keeps two dataclasses on one command apart (``compress`` has the
    method's ``--lr`` and recovery's ``--recover-lr``)."""
    from slicekit.methods import config_fields, field_type

    group = p.add_argument_group(title)
    for f in config_fields(cls):
        base, _, choices = field_type(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + prefix + f.name.replace("_", "-")
        text = f"(default: {default})" + (f"; one of {', '.join(map(str, choices))}" if choices else "")
        if base is bool:
            group.add_argument(flag, dest=f"{dest}{f.name}", action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        else:
            group.add_argument(flag, dest=f"{dest}{f.name}", default=None, metavar=base.__name__.upper(), help=text)


def _recover_values(args: argparse.Namespace, dest: str) -> dict[str, Any]:
    """The :class:`RecoverConfig` fields given on the command line (dest ``<dest><field>``)."""
    from slicekit.methods import config_fields
    from slicekit.recover import RecoverConfig

    return {f.name: getattr(args, f"{dest}{f.name}") for f in config_fields(RecoverConfig)
            if getattr(args, f"{dest}{f.name}", None) is not None}


def _recover_config(args: argparse.Namespace, dest: str = "m_") -> Any:
    """The :class:`RecoverConfig` of the options given (validated on construction, before any
    weight is loaded)."""
    from slicekit.methods import coerce_field
    from slicekit.recover import RecoverConfig

    values = _recover_values(args, dest)
    return RecoverConfig(**{k: coerce_field(RecoverConfig, k, v) for k, v in values.items()})


def cmd_recover(args: argparse.Namespace) -> int:
    """Recovery training of a compressed model (LoRA merged back, or full), distilled from the
    dense original when ``--teacher`` is given; perplexity before and after on the same windows."""
    from slicekit.checkpoint import save
    from slicekit.data import load_text
    from slicekit.evaluate import eval_windows, perplexity_result
    from slicekit.models import load_model
    from slicekit.recover import recover

    config = _recover_config(args)
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SlicekitError(f"--out {args.out} exists and is not a directory")
    if config.teacher_text and not args.teacher:
        raise SlicekitError("--dataset teacher samples the recovery text from the teacher: give the dense model "
                            "with --teacher")
    from slicekit.validate import preflight

    preflight(args)
    eval_source = load_text(args.eval_dataset, None, purpose="eval") if args.eval else None
    model, tok = load_model(args.model, args.dtype, args.device, device_map=args.device_map)
    teacher = None
    if args.teacher:
        def teacher() -> Any:
            return load_model(args.teacher, args.dtype, args.device, device_map=args.device_map)[0]
    rows = []
    windows = None
    if eval_source is not None:
        windows = eval_windows(tok, eval_source, args.eval_seqlen, args.eval_max_windows)
        rows.append({"model": "before recovery", **perplexity_result(model, windows, eval_source.description, 1,
                                                                     not args.quiet).as_dict()})
    report = recover(model, tok, config, teacher=teacher, progress=not args.quiet, resume_dir=args.resume_dir)
    if windows is not None:
        rows.append({"model": "after recovery", **perplexity_result(model, windows, eval_source.description, 1,
                                                                    not args.quiet).as_dict()})
    out = {"recovery": report.as_dict(), "perplexity": rows}
    if report.interrupted:
        raise SlicekitError("recovery was interrupted; its progress is checkpointed: rerun the same command"
                            + (f" with --resume-dir {args.resume_dir}" if args.resume_dir else " with --resume-dir DIR"))
    if args.out:
        meta = dict(getattr(model, "slicekit", None) or {})
        info = {**meta.get("info", {}), "title": os.path.basename(os.path.abspath(args.out)),
                "recovery": {**report.summary(), "perplexity": rows}}
        out["format"] = save(model, tok, args.out, info=info)
    lines = [f"recovery: {json.dumps(report.summary(), default=str)}"]
    lines += [f"perplexity {r['model']:>16}: {r['ppl']:.4f} ({r['windows']} × {r['seqlen']} tokens of {r['dataset']})"
              for r in rows]
    if args.out:
        lines.append(f"saved ({out['format']} format) to {args.out}")
    _out(out, args.json, "\n".join(lines))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from slicekit.export import export_gguf

    if not os.path.isdir(args.dir):
        raise SlicekitError(f"no such model directory: {args.dir}")
    report = export_gguf(args.dir, args.gguf, args.dtype, name=args.name, tokenizer_pre=args.tokenizer_pre)
    _out({"path": args.gguf, "architecture": report.architecture, "dtype": report.dtype,
          "tensors": report.tensors, "parameters": report.parameters, "bytes": report.file_bytes,
          "notes": report.notes}, args.json, report.summary())
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    """Quantise and entropy code a checkpoint into one file, with bits-back coding of its rotation
    symmetry (:mod:`slicekit.bitsback`); a model without that symmetry is coded plainly, and the
    output says so."""
    from slicekit.bitsback import is_packed, pack

    if is_packed(args.dir):
        raise SlicekitError(f"{args.dir} is already a packed model; `slicekit unpack {args.dir} DIR` restores "
                            "the checkpoint directory")
    if not os.path.isdir(args.dir):
        raise SlicekitError(f"no such checkpoint directory: {args.dir}")
    report = pack(args.dir, args.out, args.bits, precision=args.precision, bits_back=not args.no_bits_back,
                  estimate=args.estimate)
    out = report.as_dict()
    out["path"] = os.path.abspath(args.out)
    _out(out, args.json, report.summary())
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    """Decode a packed file into an ordinary checkpoint directory (written atomically), which
    ``slicekit.load`` and ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` read."""
    import time

    from slicekit.bitsback import unpack

    started = time.perf_counter()
    directory = unpack(args.packed, args.dir)
    seconds = time.perf_counter() - started
    _out({"path": directory, "seconds": seconds}, args.json,
         f"unpacked {args.packed} into {args.dir} in {seconds:.1f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from slicekit.demo import run_demo

    return run_demo(args)


def _method_in(argv: list[str]) -> str | None:
    """The ``--method`` of a command line (so the parser can offer that method's options), or the
    recipe's."""
    for i, a in enumerate(argv):
        if a == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    for i, a in enumerate(argv):
        if a == "--recipe" and i + 1 < len(argv) and os.path.isfile(argv[i + 1]):
            with contextlib.suppress(SlicekitError):
                return _read_recipe(argv[i + 1]).get("method")
    return None


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one ``slicekit: error:`` line every other error uses
    (argparse would print the whole usage block first) and the same exit code 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]
        self.exit(2, f"slicekit: error: {command + ': ' if command else ''}{message} (see --help)\n")


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    from slicekit.methods import available_methods

    parser = _Parser(prog="slicekit", description="structured compression of causal LMs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("info", help="architecture, widths, heads and parameter counts of a model")
    _common_model_args(p)
    p.add_argument("--layer-scores", action="store_true",
                   help="also measure per-block layer redundancy LR = mean cos(input, output) and BI = 1 − LR")
    p.add_argument("--cal-dataset", default="wikitext2", help="text for --layer-scores (dataset name or path)")
    p.add_argument("--cal-nsamples", type=int, default=16)
    p.add_argument("--cal-seqlen", type=int, default=None, help="default 2048, or the model's context if shorter")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="perplexity with the standard protocol")
    _common_model_args(p)
    p.add_argument("--dataset", default="wikitext2", help="wikitext2, ptb, c4, brown, or a text/JSONL path")
    p.add_argument("--split", default=None, help="dataset split (default: the dataset's test split)")
    p.add_argument("--seqlen", type=int, default=None, help="window length (default 2048, or the model's context if shorter)")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--tasks", default=None,
                   help="zero-shot tasks through lm-eval instead of perplexity, comma-separated: piqa, arc_easy, "
                        "arc_challenge, winogrande, hellaswag, lambada, boolq")
    p.add_argument("--limit", type=int, default=None, help="--tasks: items per task (default: all)")
    p.add_argument("--num-fewshot", type=int, default=0, help="--tasks: shots (default 0, as the papers)")
    p.add_argument("--dense-json", default=None,
                   help="--tasks: the dense model's result (--save-json) for retention, above-chance retention "
                        "and its 95 %% paired-bootstrap interval (same --limit)")
    p.add_argument("--save-json", default=None, help="--tasks: write the result here (atomically)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compress", help="compress a model and save it as a Hugging Face directory",
                       description="Compress a model. `slicekit compress --method X --help` lists X's own options; "
                                   f"methods: {', '.join(available_methods())}.")
    _common_model_args(p)
    p.add_argument("--method", default=method or "slicegpt", choices=available_methods())
    p.add_argument("--recipe", default=None, help="JSON/YAML file of settings (as written to OUT/recipe.json); "
                                                  "options given on the command line take precedence")
    p.add_argument("--cal-dataset", default=None, help="calibration text: dataset name or path (default wikitext2)")
    p.add_argument("--cal-split", default=None)
    p.add_argument("--cal-nsamples", type=int, default=None, help="calibration samples (default 128)")
    p.add_argument("--cal-seqlen", type=int, default=None, help="tokens per calibration sample (default 2048, or the model's context if shorter)")
    p.add_argument("--cal-batch-size", type=int, default=None, help="default 8")
    p.add_argument("--cal-strategy", default=None, choices=["documents", "windows"])
    p.add_argument("--seed", type=int, default=None, help="default 42")
    p.add_argument("--out", default=None, help="output directory (written atomically)")
    p.add_argument("--eval", action="store_true", help="perplexity before and after")
    p.add_argument("--eval-dataset", default="wikitext2")
    p.add_argument("--eval-seqlen", type=int, default=None, help="default 2048, or the model's context if shorter")
    p.add_argument("--eval-max-windows", type=int, default=None)
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--stream", action="store_true",
                   help="read the layers one at a time from the model's safetensors shards and write each compressed "
                        "layer at once: memory independent of depth; a killed run resumes when rerun")
    p.add_argument("--restart", action="store_true", help="--stream: discard the partial work of an earlier run")
    p.add_argument("--offload-dir", default=None,
                   help="keep the calibration activations in memory-mapped files here instead of RAM (for "
                        "calibration sets larger than memory)")
    p.add_argument("--save-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="write the output's weights in this dtype (default: the dtype computed in, --dtype)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the predicted peak memory and time of this compression, read no weights, and stop")
    p.add_argument("--recover", action="store_true",
                   help="after compressing, train back what was lost, distilled from the original model "
                        "(as `slicekit recover --teacher MODEL`; settings: --recover-*), then evaluate and save")
    p.add_argument("--recover-resume-dir", default=None,
                   help="--recover: checkpoints of the recovery; rerunning the same command compresses again "
                        "(deterministic) and resumes the recovery from the last one")
    _add_method_options(p, method or "slicegpt")
    from slicekit.recover import RecoverConfig

    _add_dataclass_options(p, RecoverConfig, "recovery settings (with --recover)", prefix="recover-", dest="r_")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("bench", help="inference speed (prefill, decode) against a baseline, side by side")
    _common_model_args(p)
    p.add_argument("--baseline", default=None, help="the uncompressed original to compare with")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("recover", help="recovery training of a compressed model (LoRA or full, distillation)",
                       epilog="--dataset is a named dataset (brown, c4, alpaca …) or a local text/JSONL file, "
                              "read like calibration text; --dataset teacher samples the text from --teacher "
                              "instead (--sample-tokens, --sample-length …), and the sampling time is reported")
    _common_model_args(p)
    p.add_argument("--teacher", default=None, help="the dense original, for distillation (default: next-token loss)")
    p.add_argument("--out", default=None, help="output directory (written atomically)")
    p.add_argument("--resume-dir", default=None, help="checkpoints of this run; rerunning resumes from the last one")
    p.add_argument("--eval", action="store_true", help="perplexity before and after on the same windows")
    p.add_argument("--eval-dataset", default="wikitext2")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-max-windows", type=int, default=8)
    from slicekit.recover import RecoverConfig

    _add_dataclass_options(p, RecoverConfig, "recovery settings")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("export", help="write a vanilla-shaped (plain-config) output as a GGUF file")
    p.add_argument("dir", help="a model directory with a plain config (e.g. a uniform-width FASP/DOTResize output)")
    p.add_argument("--gguf", required=True, help="the .gguf file to write (atomically)")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    p.add_argument("--name", default=None, help="general.name written into the file")
    p.add_argument("--tokenizer-pre", default=None, help="llama.cpp pre-tokenizer name (default: recognised)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    from slicekit.bitsback.coding import SIGNIFICAND_BITS

    p = sub.add_parser("pack", help="one compact file: weights quantised, entropy coded, bits back from rotations",
                       description="Pack a checkpoint directory into one file: the weights quantised to a stated "
                                   "precision and coded with an ANS coder, with bits-back coding of every "
                                   "rotation-symmetric interface (SliceGPT/DOTResize outputs); a model without "
                                   "rotation symmetry is coded plainly. `slicekit unpack` restores a directory; "
                                   "slicekit.load reads the packed file directly.")
    p.add_argument("dir", metavar="DIR", help="a checkpoint directory (slicekit compress --out, slicekit.save, or any model "
                               "directory slicekit.load reads)")
    p.add_argument("out", metavar="OUT", help="the packed file to write (atomically)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--bits", type=int, default=None, metavar="N",
                      help="uniform N-bit quantisation per tensor (2-24) instead of the checkpoint's precision")
    prec.add_argument("--precision", default=None, choices=list(SIGNIFICAND_BITS),
                      help="quantise to this float format's relative precision (default: each tensor's own dtype)")
    p.add_argument("--no-bits-back", action="store_true",
                   help="the same quantiser and coder without bits-back (for comparison)")
    p.add_argument("--estimate", action="store_true",
                   help="also compute the information-theoretic estimate of the bits-back saving (slower)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("unpack", help="decode a packed file into a checkpoint directory",
                       description="Decode a file written by `slicekit pack` into a checkpoint directory "
                                   "(written atomically) that slicekit.load and transformers "
                                   "(trust_remote_code=True) read.")
    p.add_argument("packed", metavar="FILE", help="the packed file (written by slicekit pack)")
    p.add_argument("dir", metavar="DIR", help="the checkpoint directory to write")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_unpack)

    p = sub.add_parser("demo", help="the end-to-end job on the packaged SmolLM2-135M")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--target-params", type=float, default=0.25, help="fraction of decoder parameters removed")
    p.add_argument("--recover-tokens", type=int, default=32768,
                   help="recovery (distillation) budget in tokens of Brown; 0 skips recovery")
    p.add_argument("--zeroshot-limit", type=int, default=20,
                   help="zero-shot check on the first N items of each task at every stage; 0 skips it")
    p.add_argument("--zeroshot-tasks", default="piqa,arc_easy,winogrande,hellaswag")
    p.add_argument("--cal-nsamples", type=int, default=16)
    p.add_argument("--cal-seqlen", type=int, default=2048)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-max-windows", type=int, default=8)
    p.add_argument("--out", default="out/smollm2-135m-fasp")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*token_id must be.*")
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        method = _method_in(argv)
        from slicekit.methods import available_methods

        if method is not None and method not in available_methods():
            from slicekit.methods import get_method

            get_method(method)  # the one-line error naming the methods
        parser = build_parser(method)
        args = parser.parse_args(argv)
        if args.command in ("info", "eval", "bench"):
            from slicekit.validate import preflight

            preflight(args)  # every check the arguments allow, before a model is loaded
        if getattr(args, "quiet", False) or getattr(args, "json", False):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # GGUF de-quantisation and weight-loading bars
        return args.func(args)
    except SlicekitError as err:
        print(f"slicekit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slicekit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from slicekit.arch import UnsupportedArchitectureError
        from slicekit.modeling_slicekit import SlicekitShapeError

        if isinstance(err, (UnsupportedArchitectureError, SlicekitShapeError)):
            print(f"slicekit: error: {err}", file=sys.stderr)
            return 2
        if os.environ.get("SLICEKIT_DEBUG"):
            raise
        print(f"slicekit: internal error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
              "(set SLICEKIT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
