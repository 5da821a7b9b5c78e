"""What the benchmark scripts share (not part of the library): one argument set, one way to draw
calibration text and evaluation windows, one result writer, and the method configs for a share of
decoder parameters.

Parameter counts are never computed here: every count a benchmark prints comes from the
library's one counter (:func:`slicekit.shape.count_plan`, through
:func:`slicekit.models.count_parameters`, the pipeline's reports and its plans), so a benchmark
and the library cannot disagree about what a model's size is.

Result files follow the schema that ``benchmarks/make_results.py`` renders into RESULTS.md
(docs/CONTRIBUTING-HELPERS.md)::

    {"title": str, "command": str, "date": "YYYY-MM-DD", "machine": str, "settings": {...},
     "tables": [{"title": str, "columns": [str], "rows": [[...]]}], "notes": [str], "plots": ["file.png"]}

:func:`write_result` checks that schema, fills in the date and the machine, replaces machine
paths (the data directory, the repository, the home directory) and writes atomically.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from slicekit.zeroshot import ZeroShotResult

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

#: the shared options and their defaults; a script passes its own defaults to :func:`benchmark_parser`
SHARED_DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m",
    "cal_dataset": "wikitext2",
    "cal_split": "validation",  # the train split is not shipped in the shared data directory
    "cal_nsamples": 16,
    "cal_seqlen": 2048,
    "cal_batch_size": 4,
    "seed": 42,
    "eval_dataset": "wikitext2",
    "eval_seqlen": 2048,
    "eval_windows": 16,
    "threads": None,
}

#: required keys of a result file and their types (``date`` and ``machine`` are filled in)
SCHEMA: dict[str, type] = {"title": str, "command": str, "date": str, "machine": str, "settings": dict,
                           "tables": list, "notes": list, "plots": list}


# ---------------------------------------------------------------- arguments

def benchmark_parser(name: str, description: str | None = None, *, evaluation: bool = True,
                     **defaults: Any) -> argparse.ArgumentParser:
    """A parser with the options every benchmark shares, with this script's ``defaults``:
    ``--model``, calibration (``--cal-dataset/-split/-nsamples/-seqlen/-batch-size``, ``--seed``),
    evaluation (``--eval-dataset/-seqlen/-windows``, unless ``evaluation=False``), ``--threads``
    and ``--out`` (the result file, ``results/<name>.json`` by default)."""
    unknown = set(defaults) - set(SHARED_DEFAULTS) - {"out"}
    if unknown:
        raise ValueError(f"not shared options: {', '.join(sorted(unknown))}")
    d = {**SHARED_DEFAULTS, "out": str(RESULTS / f"{name}.json"), **defaults}
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("shared benchmark options")
    g.add_argument("--model", default=d["model"], help="alias, directory, GGUF file or hub id (default %(default)s)")
    g.add_argument("--cal-dataset", default=d["cal_dataset"], help="calibration text (default %(default)s)")
    g.add_argument("--cal-split", default=d["cal_split"], help="calibration split (default %(default)s)")
    g.add_argument("--cal-nsamples", type=int, default=d["cal_nsamples"], help="default %(default)s")
    g.add_argument("--cal-seqlen", type=int, default=d["cal_seqlen"], help="default %(default)s")
    g.add_argument("--cal-batch-size", type=int, default=d["cal_batch_size"], help="default %(default)s")
    g.add_argument("--seed", type=int, default=d["seed"], help="calibration sampling seed (default %(default)s)")
    if evaluation:
        g.add_argument("--eval-dataset", default=d["eval_dataset"], help="default %(default)s (its test split)")
        g.add_argument("--eval-seqlen", type=int, default=d["eval_seqlen"], help="default %(default)s")
        g.add_argument("--eval-windows", type=int, default=d["eval_windows"],
                       help="the first K windows of the test split (default %(default)s)")
    g.add_argument("--threads", type=int, default=d["threads"], help="torch threads (default: torch's choice)")
    g.add_argument("--out", default=d["out"], help=f"result JSON file (default results/{name}.json)")
    return p


def setup(args: argparse.Namespace) -> None:
    """Apply the shared settings that act on the process (threads)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def command_line(script: str, argv: list[str] | None = None, prefix: str | None = None) -> str:
    """The command that reproduces this run, as recorded in the result file: ``prefix`` (default:
    ``python``, behind ``nice -n N`` when this process really runs at niceness N) and the script's
    arguments — what was run, not what the script's docstring suggests."""
    args = sys.argv[1:] if argv is None else argv
    if prefix is None:
        niceness = os.nice(0)
        prefix = f"nice -n {niceness} python" if niceness > 0 else "python"
    return " ".join([prefix, f"benchmarks/{script}", shlex.join(args)]).strip()


# ---------------------------------------------------------------- data

def calibration_request(args: argparse.Namespace):
    """The pipeline's record of the calibration the shared options describe."""
    from slicekit.pipeline import CalibrationRequest

    return CalibrationRequest(dataset=args.cal_dataset, split=args.cal_split, nsamples=args.cal_nsamples,
                              seqlen=args.cal_seqlen, batch_size=args.cal_batch_size, seed=args.seed,
                              strategy="documents")


def calibration_set(args: argparse.Namespace, tokenizer):
    """The calibration ids (drawn once, shared by every method of a run) with a description that
    names no machine path; ``.batches(args.cal_batch_size)`` gives the batches."""
    from slicekit.data import CalibrationSet, load_text, sample_calibration

    source = load_text(args.cal_dataset, args.cal_split, purpose="calibration")
    cal = sample_calibration(tokenizer, source, args.cal_nsamples, args.cal_seqlen, args.seed, "documents")
    return CalibrationSet(cal.input_ids, scrub(cal.description))


def evaluation_windows(args: argparse.Namespace, tokenizer, dataset: str | None = None):
    """``(windows, description)``: the first ``--eval-windows`` windows of ``--eval-seqlen`` tokens of
    the test split of ``dataset`` (default ``--eval-dataset``)."""
    from slicekit.data import load_text
    from slicekit.evaluate import eval_windows

    source = load_text(dataset or args.eval_dataset, purpose="eval")
    return eval_windows(tokenizer, source, args.eval_seqlen, args.eval_windows), scrub(source.description)


# ---------------------------------------------------------------- methods at a size

def method_config(method: str, share: float, **settings: Any):
    """``method``'s config that removes ``share`` of the decoder parameters: every method's
    ``target_params``, met by the pipeline against the one counter (for SliceGPT: the constant
    width whose real decoder count, shortcut matrices included, is closest)."""
    from slicekit.methods import get_method

    return get_method(method).config_cls(target_params=share, **settings)


#: benchmark method labels -> (method, settings besides the target): the variants the
#: side-by-side benchmarks (recovery, speed) run under one name each
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fasp": ("fasp", {}),
    "modegpt": ("modegpt", {}),
    "modegpt fast": ("modegpt", {"fast_heads": True}),
    "slicegpt": ("slicegpt", {}),
    "slicegpt global": ("slicegpt", {"rotation": "global"}),
    "prunenet": ("prunenet", {}),
    "prunenet random": ("prunenet", {"selection": "random"}),
    "dotresize": ("dotresize", {}),
    "dotresize modegpt": ("dotresize", {"schedule": "modegpt"}),
    "fasp modegpt": ("fasp", {"schedule": "modegpt"}),
    "disp": ("disp", {"lr": 1e-2}),
}


def variant_config(label: str, share: float, **settings: Any) -> tuple[str, Any]:
    """``(method, config)`` of the variant named ``label`` (a :data:`VARIANTS` key) removing
    ``share`` of the decoder parameters; ``settings`` override the variant's own."""
    if label not in VARIANTS:
        raise SystemExit(f"unknown method label {label!r}; known: {', '.join(VARIANTS)}")
    method, own = VARIANTS[label]
    return method, method_config(method, share, **{**own, **settings})


def slicegpt_matching(model, decoder_params: int, round_to: int = 8):
    """SliceGPT at the constant residual width whose planned real decoder count is closest to
    ``decoder_params`` (e.g. another method's compressed count): ``(config, width, planned
    decoder count)``, from the plan alone, before any calibration.  The config asks for that width
    directly (``slicing = 1 − width/D``), so the run does not depend on the target solver."""
    from slicekit.arch import get_arch
    from slicekit.methods import get_method
    from slicekit.methods.slicegpt import SliceGPTConfig
    from slicekit.models import count_parameters
    from slicekit.pipeline import n_layers_of, plan_compression
    from slicekit.shape import count_plan

    entry = get_method("slicegpt")
    original = count_parameters(model)["decoder"]
    probe = SliceGPTConfig(target_params=1 - decoder_params / original, round_to=round_to)
    planned = plan_compression(entry, model, probe)
    width = int(planned.plan.modules[get_arch(model.config).token_embedding]["embedding_dim"])
    config = SliceGPTConfig(slicing=1 - width / model.config.hidden_size, round_to=round_to)
    predicted = count_plan(entry.plan(model, config, [config.slicing] * n_layers_of(model))).decoder
    assert predicted == planned.predicted.decoder, (predicted, planned.predicted)
    return config, width, predicted


def decoder_share_removed(report) -> float:
    """The real share of decoder parameters a pipeline report's compression removed."""
    return 1 - report.params_compressed["decoder"] / report.params_original["decoder"]


# ---------------------------------------------------------------- rows: compress a copy, evaluate it

#: the zero-shot tasks every quality benchmark runs (local task files, ``slicekit.zeroshot``)
TASKS = ["piqa", "arc_easy", "winogrande", "hellaswag"]


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def perplexity(model, windows) -> float:
    from slicekit.evaluate import perplexity_of_windows

    return math.exp(perplexity_of_windows(model, windows, progress=False)[0])


def zero_shot(model, tok, args) -> ZeroShotResult:
    from slicekit.zeroshot import evaluate_tasks

    return evaluate_tasks(model, tok, args.tasks.split(","), limit=args.limit, batch_size=args.zs_batch_size,
                          progress=False)


def wants_zeroshot(args, share: float) -> bool:
    """Zero-shot runs for the dense model and at the shares in ``--zeroshot-shares``."""
    return share == 0.0 or any(abs(share - float(x)) < 1e-9 for x in args.zeroshot_shares.split(",") if x)


def evaluate_row(name: str, method: str, share: float, model, tok, windows, args, report=None) -> dict[str, Any]:
    from slicekit.models import count_parameters

    t0 = time.perf_counter()
    ppl = perplexity(model, windows)
    t1 = time.perf_counter()
    zs = zero_shot(model, tok, args) if wants_zeroshot(args, share) else None
    row: dict[str, Any] = {"name": name, "method": method, "target": share, "params": count_parameters(model),
                           "ppl": ppl, "zeroshot": None if zs is None else zs.as_dict(), "ppl_seconds": t1 - t0,
                           "zeroshot_seconds": None if zs is None else zs.seconds,
                           "threads": torch.get_num_threads()}
    if report is not None:
        m = report.measurement
        row.update(settings=report.settings, seconds=m.seconds, rss_before_mib=m.rss_before / 2**20,
                   rss_peak_mib=m.rss_peak / 2**20, rss_added_mib=m.rss_added / 2**20,
                   summary={k: v for k, v in report.summary.items()
                            if k in ("selection", "merge", "policy", "policy_seconds", "schedule_mean", "training",
                                      "learned_kept_fraction", "kept_fraction")})
        widths = report.summary.get("mlp_widths")
        if widths:
            row["summary"]["mlp_widths"] = sorted(set(widths))
    return row


def compress_row(name: str, method: str, share: float, settings: dict[str, Any], dense, tok, batches, windows,
                 args, *, keep: bool = False) -> tuple[dict[str, Any], Any]:
    """Compress a copy of ``dense`` and evaluate it; returns the row and (with ``keep``) the model."""
    from slicekit.pipeline import compress

    model = copy.deepcopy(dense)
    gc.collect()
    config = method_config(method, share, **settings)
    log(f"[{name} @ {share:g}] compressing")
    cpu0 = time.process_time()
    report = compress(model, tok, method, config, calibration_request(args), progress=False, batches=batches)
    cpu = time.process_time() - cpu0
    log(f"[{name} @ {share:g}] {report.measurement.seconds:.1f} s, decoder {report.params_compressed['decoder']:,}; "
          "evaluating")
    row = evaluate_row(name, method, share, model, tok, windows, args, report)
    row["cpu_seconds"] = cpu  # all threads; the wall clock also counts the neighbours on a shared machine
    row["settings"] = {k: v for k, v in row["settings"].items() if k not in ("save_policy", "policy")}
    zs = row["zeroshot"]
    log(f"[{name} @ {share:g}] ppl {row['ppl']:.3f}, zero-shot mean {zs['average'] if zs else None} "
        f"(ppl {row['ppl_seconds']:.0f} s, zero-shot {row['zeroshot_seconds'] or 0:.0f} s)")
    if keep:
        return row, model
    del model
    gc.collect()
    return row, None


def zs_of(row: dict[str, Any]) -> ZeroShotResult | None:
    from slicekit.zeroshot import ZeroShotResult

    return None if row.get("zeroshot") is None else ZeroShotResult.from_dict(row["zeroshot"])


def above_chance(zs: ZeroShotResult | None, dense: ZeroShotResult, tasks: list[str],
                 metric: str = "primary") -> float | None:
    """Mean above-chance retention (the library's) over the tasks where the dense model beats
    chance by two standard errors; None without zero-shot.  A task the dense model does not
    measurably beat (WinoGrande) has no margin to retain, so it is left out and the notes name it.
    ``metric``: each task's primary metric (acc_norm where defined) or plain "acc"."""
    if zs is None:
        return None
    scored = scored_tasks(dense, tasks, metric)
    return zs.above_chance_retention(dense, scored, metric=metric) if scored else None


def above_chance_interval(zs: ZeroShotResult | None, dense: ZeroShotResult,
                          tasks: list[str], metric: str = "primary") -> tuple[float, float] | None:
    """The 95 % paired-bootstrap interval of :func:`above_chance` (None without zero-shot or
    without per-item outcomes, as in rows written before they were kept)."""
    if zs is None:
        return None
    scored = scored_tasks(dense, tasks, metric)
    return zs.above_chance_interval(dense, scored, metric=metric) if scored else None


def interval_text(interval: tuple[float, float] | None) -> str | None:
    """An interval as a table cell: "0.58–0.77"."""
    return None if interval is None else f"{interval[0]:.2f}–{interval[1]:.2f}"


#: what 'above-chance retained' means, in a result note's words (it is read in each task's primary
#: metric; earlier notes wrote "(acc − chance)", which misnamed acc_norm)
ABOVE_CHANCE_WORDS = ("'above-chance retained' = mean over tasks of (score − chance)/(dense − chance), score = "
                      "acc_norm where lm-eval defines it (piqa, arc, hellaswag), else acc")


def left_out_note(dense: ZeroShotResult | None, tasks: list[str], metric: str = "primary") -> str:
    """The suffix of a result note that names the tasks 'above-chance retained' leaves out (those
    where the dense model does not beat chance by two standard errors in ``metric``); empty when
    none is."""
    if dense is None or scored_tasks(dense, tasks, metric) == tasks:
        return ""
    return (", over the tasks where the dense model beats chance by at least two standard errors (left out: "
            f"{', '.join(t for t in tasks if t not in scored_tasks(dense, tasks, metric))})")


def rounded(v: float | None, digits: int) -> float | None:
    """``round`` that passes a missing value through (empty table cells)."""
    return None if v is None else round(v, digits)


def scored_tasks(dense: ZeroShotResult, tasks: list[str], metric: str = "primary") -> list[str]:
    """The tasks on which the dense model beats chance by at least two standard errors in
    ``metric`` (the only ones with a measurable margin:
    :meth:`slicekit.zeroshot.ZeroShotResult.margin_tasks`)."""
    return dense.margin_tasks(tasks, metric=metric)


# ---------------------------------------------------------------- results

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, shared machine")


def tensors_digest(tensors) -> str:
    """SHA-256 over ``(name, tensor)`` pairs (name, dtype, shape, bytes), in name order: equal
    digests mean bit-identical weights."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def today() -> str:
    return datetime.date.today().isoformat()


def _path_replacements() -> list[tuple[str, str]]:
    pairs = [(str(REPO) + os.sep, ""), (str(REPO), ".")]
    data = os.environ.get("SLICEKIT_DATA_DIR")
    if data:
        pairs.append((os.path.abspath(data), "$SLICEKIT_DATA_DIR"))
    home = os.path.expanduser("~")
    if home not in ("", "/", "~"):
        pairs.append((home, "~"))
    return sorted(pairs, key=lambda p: -len(p[0]))


def scrub(obj: Any) -> Any:
    """``obj`` with machine paths in its strings replaced: the data directory by
    ``$SLICEKIT_DATA_DIR``, the repository by a relative path, the home directory by ``~``, any
    other absolute path by its last component."""
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    if isinstance(obj, str):
        from slicekit.validate import public_text

        for old, new in _path_replacements():
            obj = obj.replace(old, new)
        obj = public_text(obj)  # any other absolute path (a reference install, /tmp): its last component
    return obj


def same_settings(old: dict[str, Any], args: argparse.Namespace, keys: tuple[str, ...]) -> bool:
    """Whether a result file's ``settings`` were made with this run's ``keys`` — compared as
    written (scrubbed of machine paths), so a resumable script recognises its own file."""
    return all(old.get(k) == scrub(getattr(args, k)) for k in keys)


def resume(out: Path, args: argparse.Namespace, keys: tuple[str, ...], script: str,
           argv: list[str] | None) -> tuple[dict[str, Any], str]:
    """``(raw, command)`` of a resumable script: the ``raw`` part of ``out`` when it was made with
    this run's ``keys`` (else empty), and the chain of commands that made the file, this one last.
    Rows whose label (the part of the key before ``@``) is in ``--redo`` are dropped from
    ``raw["rows"]``, so the script recomputes them after a change to a method."""
    raw: dict[str, Any] = {}
    commands: list[str] = []
    if out.exists() and not args.fresh:
        old = json.loads(out.read_text())
        if same_settings(old.get("settings", {}), args, keys) and "raw" in old:
            raw = old["raw"]
            commands = [c for c in old["command"].split(" && ") if c]
            redo = {m for m in getattr(args, "redo", "").split(",") if m}
            rows = raw.get("rows", {})
            for key in [k for k in rows if k.split("@")[0] in redo]:
                del rows[key]
            log(f"resuming: {len(rows)} rows from {out}")
        else:
            log(f"{out} has other settings: starting afresh")
    commands.append(command_line(script, argv))
    return raw, " && ".join(dict.fromkeys(commands))


def check_result(doc: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first way ``doc`` departs from the result schema."""
    for key, kind in SCHEMA.items():
        if key not in doc:
            raise ValueError(f"result has no {key!r}")
        if not isinstance(doc[key], kind):
            raise ValueError(f"result {key!r} must be a {kind.__name__}, not {type(doc[key]).__name__}")
    for i, table in enumerate(doc["tables"]):
        if not isinstance(table, dict) or not {"title", "columns", "rows"} <= set(table):
            raise ValueError(f"table {i} must have 'title', 'columns' and 'rows'")
        for j, row in enumerate(table["rows"]):
            if len(row) != len(table["columns"]):
                raise ValueError(f"table {i} ({table['title']!r}) row {j} has {len(row)} cells for "
                                 f"{len(table['columns'])} columns")
    for name in ("notes", "plots"):
        if not all(isinstance(x, str) for x in doc[name]):
            raise ValueError(f"result {name!r} must be a list of strings")


def write_result(out: str | os.PathLike, doc: dict[str, Any]) -> Path:
    """Write one result file: ``out`` is a path, or a bare name for ``results/<name>.json``.

    ``date`` and ``machine`` are filled in when missing, ``plots`` defaults to none; the document
    is checked against the schema, machine paths are replaced (:func:`scrub`) and the file is
    written to a temporary sibling first and renamed, so a reader never sees half a file.
    """
    path = Path(out)
    if path.suffix != ".json" and path.parent == Path("."):
        path = RESULTS / f"{path}.json"
    doc = {**doc}
    doc.setdefault("date", today())
    doc.setdefault("machine", machine())
    doc.setdefault("plots", [])
    doc = scrub(json.loads(json.dumps(doc, default=str)))
    check_result(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would survive the rename
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
