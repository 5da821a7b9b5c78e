"""The benchmark scripts and what they share (benchmarks/common.py): the scripts import and parse
against the current library, the shared writer keeps the result schema, the SliceGPT size
matching rests on the library's one counter, and the scripts run end to end on a tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from clirun import Run, run_script
from slicekit.methods import available_methods, get_method
from slicekit.methods.slicegpt import SliceGPTConfig
from slicekit.models import count_parameters
from slicekit.pipeline import compress
from slicekit.shape import count_plan
from tiny import save_tiny_with_tokenizer, tiny_calibration, tiny_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ["quality", "modegpt", "fasp", "speed", "dynamic_slicing", "slicegpt_vs_reference", "mlp_methods", "disp",
           "recovery", "alignment"]


def _common():
    """benchmarks/common.py as a module, loaded from its file (the benchmarks are not a package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_common", BENCHMARKS / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str) -> Run:
    """``python benchmarks/SCRIPT.py ARGS`` from the repository root, in this process (see clirun)."""
    return run_script(BENCHMARKS / f"{script}.py", *args, cwd=BENCHMARKS.parent)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_bench")
    save_tiny_with_tokenizer(d)
    return d


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_imports_and_offers_the_shared_options(script):
    proc = _run(script, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for option in ("--model", "--cal-nsamples", "--cal-seqlen", "--cal-batch-size", "--seed", "--threads", "--out"):
        assert option in proc.stdout, (script, option)
    assert "--sparsity" not in proc.stdout  # slicing (width) or target-params (decoder share), never ambiguous


def test_shared_parser_takes_each_scripts_defaults():
    common = _common()
    args = common.benchmark_parser("quality", eval_windows=8, cal_batch_size=2).parse_args([])
    assert (args.eval_windows, args.cal_batch_size, args.cal_nsamples, args.seed) == (8, 2, 16, 42)
    assert args.cal_split == "validation" and Path(args.out) == BENCHMARKS / "results" / "quality.json"
    args = common.benchmark_parser("speed", evaluation=False).parse_args(["--cal-nsamples", "3", "--out", "x.json"])
    assert args.cal_nsamples == 3 and args.out == "x.json" and not hasattr(args, "eval_windows")
    with pytest.raises(ValueError, match="not shared"):
        common.benchmark_parser("x", eval_window=8)


def _doc(**extra):
    return {"title": "t", "command": "python benchmarks/x.py", "settings": {"a": 1},
            "tables": [{"title": "tab", "columns": ["a", "b"], "rows": [[1, 2.5], ["x", None]]}],
            "notes": ["n"], **extra}


def test_writer_fills_checks_and_scrubs(tmp_path, monkeypatch):
    common = _common()
    data = tmp_path / "data"
    monkeypatch.setenv("SLICEKIT_DATA_DIR", str(data))
    doc = _doc(notes=[f"calibration from {data}/wikitext-2/wiki.valid.tokens",
                      f"written by {BENCHMARKS / 'x.py'}"], raw={"kept": True})
    path = common.write_result(tmp_path / "r" / "x.json", doc)
    assert path == tmp_path / "r" / "x.json" and [p.name for p in path.parent.iterdir()] == ["x.json"]
    got = json.loads(path.read_text())
    assert set(common.SCHEMA) <= set(got) and got["raw"] == {"kept": True} and got["plots"] == []
    assert len(got["date"]) == 10 and got["date"][4] == "-" and "CPU cores" in got["machine"]
    assert got["tables"] == doc["tables"]
    assert got["notes"] == ["calibration from $SLICEKIT_DATA_DIR/wikitext-2/wiki.valid.tokens",
                            "written by benchmarks/x.py"]
    assert str(tmp_path) not in path.read_text().replace(str(data), "")  # no machine path left
    bad = [_doc(title=None), _doc(tables=[{"title": "t", "columns": ["a"], "rows": [[1, 2]]}]),
           {k: v for k, v in _doc().items() if k != "command"}, _doc(notes=[3])]
    for doc in bad:
        with pytest.raises(ValueError):
            common.write_result(tmp_path / "bad.json", doc)
    assert not (tmp_path / "bad.json").exists() and not list(tmp_path.glob(".bad.json*"))
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")  # a bare name means results/<name>.json
    assert common.write_result("name_only", _doc()) == tmp_path / "results" / "name_only.json"


def test_method_configs_ask_every_method_for_the_share():
    common = _common()
    for method in available_methods():
        config = common.method_config(method, 0.2)
        assert isinstance(config, get_method(method).config_cls) and config.target_params == 0.2


def test_slicegpt_matching_picks_the_closest_width_by_the_one_counter():
    """SliceGPT matched to another model's decoder count: the width (multiple of 8) whose planned
    real count is closest, and that plan's count is the compressed model's real count."""
    common = _common()
    model = tiny_model("llama")
    entry = get_method("slicegpt")
    dense = count_parameters(model)["decoder"]
    counts = {w: count_plan(entry.plan(model, SliceGPTConfig(), [1 - w / 64] * 2)).decoder for w in range(8, 65, 8)}
    for target in (round(0.75 * dense), round(0.5 * dense), counts[40] + 1):
        config, width, predicted = common.slicegpt_matching(model, target)
        assert predicted == counts[width] and config.slicing == 1 - width / 64
        assert all(abs(predicted - target) <= abs(c - target) for c in counts.values())
    assert width == 40
    report = compress(model, None, "slicegpt", config, progress=False, batches=tiny_calibration())
    assert report.summary["attn_in_widths"] == [40, 40]
    real = sum(p.numel() for p in model.model.layers.parameters())
    assert report.params_compressed["decoder"] == predicted == real
    assert common.decoder_share_removed(report) == 1 - real / dense


def _check_schema(path: Path) -> dict:
    doc = json.loads(path.read_text())
    _common().check_result(doc)
    assert str(BENCHMARKS) not in path.read_text()
    return doc


SMALL = ["--cal-nsamples", "4", "--cal-seqlen", "64", "--cal-batch-size", "2", "--eval-seqlen", "64",
         "--eval-windows", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def eval_text(data_dir, tmp_path_factory) -> str:
    """A short evaluation text (the start of WikiText-2 test): the character-level tokenizer of the
    tiny model would spend most of a run on the whole corpus."""
    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text(Path(data_dir, "wikitext-2", "wiki.test.raw").read_text(encoding="utf-8")[:20_000])
    return str(path)


def test_quality_runs_on_a_tiny_model(tiny_dir, eval_text, tmp_path):
    out = tmp_path / "quality.json"
    proc = _run("quality", "--model", str(tiny_dir), "--methods", "slicegpt,modegpt,fasp", "--shares", "0.25",
                *SMALL, "--eval-dataset", eval_text, "--ood-dataset", eval_text, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = _check_schema(out)
    rows = {r[0]: r for r in doc["tables"][0]["rows"]}
    assert set(rows) == {"dense", "slicegpt", "modegpt", "fasp"}
    for method in ("modegpt", "fasp"):  # the target is met against the one counter
        assert abs(rows[method][2] - 0.25) < 0.02, rows[method]
    assert rows["slicegpt"][5] < rows["dense"][5]
    assert any(n.startswith("determinism check") and "identical" in n for n in doc["notes"])
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"
    cost = _check_schema(tmp_path / "cost.json")
    assert [r[0] for r in cost["tables"][0]["rows"]] == ["slicegpt", "modegpt", "fasp"]


@pytest.mark.parametrize("script", ["modegpt", "fasp", "dynamic_slicing", "slicegpt_vs_reference"])
def test_comparison_scripts_run_on_a_tiny_model(script, tiny_dir, eval_text, tmp_path):
    out = tmp_path / f"{script}.json"
    extra = {"modegpt": ["--variants", "mlp,qk,vo"], "fasp": ["--skip", "fasp_plain,fasp_heads"],
             "dynamic_slicing": ["--slice-bases", "0.05", "--matched-slice-bases", "0.05"],
             "slicegpt_vs_reference": ["--sweep", "0.1"]}[script]
    proc = _run(script, "--model", str(tiny_dir), *SMALL, *extra, "--eval-dataset", eval_text, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    doc = _check_schema(out)
    rows = doc["tables"][0]["rows"]
    if script in ("modegpt", "fasp"):  # SliceGPT matched on the one counter: predicted = measured
        assert "differs from the predicted" not in proc.stderr  # modegpt.py warns there
        assert not any(n.startswith("SliceGPT decoder count predicted") for n in doc["notes"])  # fasp.py notes it
        names = [r[0] for r in rows]
        assert any(n.startswith("SliceGPT") for n in names) and any("MoDeGPT" in n for n in names)
    if script == "dynamic_slicing":
        assert [r[0] for r in rows] == ["constant", "dynamic SB=0.05", "dynamic SB=0.05, params-matched"]
        assert rows[2][3] <= rows[0][3]  # params-matched: total at most the constant schedule's
        assert (tmp_path / "dynamic_slicing.png").read_bytes()[:4] == b"\x89PNG"
    if script == "slicegpt_vs_reference":
        assert "SKIPPED" in doc["notes"][0]
        assert [r[0] for r in doc["tables"][-1]["rows"]] == [0.1, 0.25]


def test_speed_runs_on_a_tiny_model(tiny_dir, data_dir, tmp_path):
    """Every model is timed beside the dense one; its format, file size and KV cache are measured,
    and the prefill ratio is set against the FLOP-ideal one (the #15 bar's columns)."""
    out = tmp_path / "speed.json"
    proc = _run("speed", "--model", str(tiny_dir), "--methods", "slicegpt,slicegpt global,fasp", "--repeats", "1",
                "--cal-nsamples", "2", "--cal-seqlen", "64", "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = _check_schema(out)["tables"][0]
    col = {c: i for i, c in enumerate(table["columns"])}
    rows = {r[0]: r for r in table["rows"]}
    assert set(rows) == {"dense", "slicegpt", "slicegpt global", "fasp", "slicegpt (no shortcuts, timing only)"}
    dense = rows["dense"]
    assert dense[col["ideal (FLOPs)"]] == 1.0 and dense[col["format"]] == "vanilla"
    assert rows["slicegpt"][col["format"]] == "slicekit" and rows["slicegpt global"][col["format"]] == "vanilla"
    for name in ("slicegpt", "slicegpt global", "fasp"):
        r = rows[name]
        assert r[col["params total"]] < dense[col["params total"]], name  # the real count shrinks
        assert 0 < r[col["file MiB (fp32)"]] < dense[col["file MiB (fp32)"]], name  # and so does the file
        assert r[col["KV bytes/token"]] <= dense[col["KV bytes/token"]], name
        ratio = r[col["prefill 8×512 tok/s"] + 1]
        assert r[col["8×512 / ideal"]] == pytest.approx(ratio / r[col["ideal (FLOPs)"]], abs=2e-3)
    assert rows["slicegpt (no shortcuts, timing only)"][col["file MiB (fp32)"]] is None  # never saved


def test_alignment_benchmark_runs(tmp_path):
    out = tmp_path / "alignment.json"
    proc = _run("alignment", "--repeats", "1", "--tokens", "1x16", "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = _check_schema(out)["tables"]
    assert [t["title"].split(",")[1].split(":")[0].strip() for t in tables] == ["float32", "bfloat16"]
    for t in tables:
        widths = [r[2] for r in t["rows"] if r[0].startswith("MLP")]
        assert 1024 in widths and any(w % 64 for w in widths)  # aligned and unaligned widths side by side
        assert all(r[4] > 0 and r[6] > 0 for r in t["rows"])


def test_disp_benchmark_runs_on_a_tiny_model(tiny_dir, eval_text, tmp_path):
    """The DISP benchmark trains on its own one-pass text, reports the budget it used and where the
    hard masks ended, and compares at the same real size; a rerun resumes instead of retraining."""
    out = tmp_path / "disp.json"
    args = ["--model", str(tiny_dir), *SMALL, "--eval-dataset", eval_text, "--shares", "0.25",
            "--methods", "disp,fasp", "--disp-lrs", "0.01", "--train-tokens", "128", "--train-seqlen", "32", "--limit", "2",
            "--tasks", "winogrande", "--out", str(out)]
    proc = _run("disp", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = _check_schema(out)
    rows = {r[0]: r for r in doc["tables"][0]["rows"]}
    assert set(rows) == {"dense", "disp", "disp lr=0.01", "fasp"}
    for method in ("disp", "disp lr=0.01", "fasp"):  # equal real size: both meet the target on the one counter
        assert abs(rows[method][3] - 0.25) < 0.02, rows[method]
    train = doc["tables"][1]["rows"]
    assert [r[:3] for r in train] == [["disp", 0.25, 0.001], ["disp lr=0.01", 0.25, 0.01]]
    assert all(r[3] == 0.25 and r[4] == 128 and r[5] == 2 for r in train)  # annealed; 4 × 32 tokens, batches of 2
    assert any(n.startswith("disp lr=0.01 at 25 %: the learned hard masks keep") for n in doc["notes"])
    again = _run("disp", *args)
    assert again.returncode == 0 and "resuming: 4 rows" in again.stderr, again.stderr[-2000:]


def test_recovery_benchmark_runs_on_a_tiny_model(tiny_dir, eval_text, tmp_path):
    """Every row is compressed, evaluated, recovered and evaluated again with the same settings;
    the hidden-state term is left out for SliceGPT's rotated stream; a rerun resumes."""
    out = tmp_path / "recovery.json"
    train = tmp_path / "train.txt"
    train.write_text("a plain training text, not the evaluation one. " * 200)
    args = ["--model", str(tiny_dir), *SMALL, "--eval-dataset", eval_text, "--shares", "0.25",
            "--methods", "fasp,slicegpt", "--rec-dataset", str(train), "--rec-tokens", "128", "--rec-seqlen", "32",
            "--rec-batch-size", "2", "--rec-precision", "fp32", "--rec-hidden-distill", "0.5", "--limit", "2",
            "--tasks", "winogrande", "--out", str(out)]
    proc = _run("recovery", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = _check_schema(out)
    rows = {r[0]: r for r in doc["tables"][0]["rows"]}
    assert set(rows) == {"dense", "fasp", "slicegpt"}
    col = {c: i for i, c in enumerate(doc["tables"][0]["columns"]) if c != "after"}
    raw = doc["raw"]["rows"]
    # a random model does not beat chance on WinoGrande: no margin, so no retention and no interval
    assert rows["fasp"][col["after, 95 % interval"]] is None
    assert len(raw["fasp@0.25"]["after"]["zeroshot"]["scores"]["winogrande"]["outcomes"]) == 2
    for m in ("fasp", "slicegpt"):
        r = raw[f"{m}@0.25"]
        assert r["recovery"]["tokens"] == 128 and r["recovery"]["precision"] == "fp32"
        assert r["before"]["params"] == r["after"]["params"]  # recovery keeps the compressed shape
        assert r["before"]["ppl"] != r["after"]["ppl"] and rows[m][col["recovery tokens"]] == 128
    assert raw["fasp@0.25"]["recovery"]["hidden_distill"] == 0.5
    # the note says what recovery ran in, and explains autocast only where it was asked for
    note = next(n for n in doc["notes"] if n.startswith("recovery: "))
    assert "precision fp32 (ran in fp32), seed 42" in note and "autocast" not in note
    # the plain-acc column reads the same tasks here (none: the random model is at chance), said once
    zs_note = next(n for n in doc["notes"] if n.startswith("zero-shot: "))
    assert "'plain acc' is the same measure in acc on every task (the form issue #14's bar is written in), " \
           "over the same tasks; its 95 % interval" in zs_note
    assert rows["fasp"][len(doc["tables"][0]["columns"]) - 4] is None  # 'after, plain acc': no margin, no value
    assert raw["slicegpt@0.25"]["recovery"]["hidden_distill"] == 0.0
    assert doc["title"].endswith("fasp and slicegpt before and after distillation on train.txt (#14)")
    assert doc["tables"][0]["columns"][8] == "after"  # Brown is in-domain only when recovery read Brown
    again = _run("recovery", *args)
    assert again.returncode == 0 and "resuming: 3 rows" in again.stderr, again.stderr[-2000:]

    # text sampled from the dense model: the sampling time counts in the row's recovery minutes
    sampled = tmp_path / "sampled.json"
    args = [*args[: args.index("--methods")], "--methods", "fasp", "--rec-dataset", "teacher", "--rec-sample-tokens",
            "96", "--rec-train-embeddings", *args[args.index("--rec-tokens"):-1], str(sampled)]
    proc = _run("recovery", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = _check_schema(sampled)
    rec = doc["raw"]["rows"]["fasp@0.25"]["recovery"]
    assert rec["sample_seconds"] > 0 and "sampled from the teacher" in rec["data"]
    assert rec["train_embeddings"] is True and "train_embeddings" not in raw["fasp@0.25"]["recovery"]
    assert any("fine-tuning (the token embeddings and the head tied to them trained too)" in n for n in doc["notes"])
    row = doc["tables"][0]["rows"][1]
    assert row[col["recovery min"]] == round((rec["train_seconds"] + rec["sample_seconds"]) / 60, 1)
    assert doc["title"].endswith("fasp before and after distillation on text sampled from the dense model (#14)")
    assert any("text sampled from the dense model (96 tokens in samples of 32 from BOS" in n for n in doc["notes"])
    # the dense row of the first file serves another (recovery settings differ, evaluation is the same)
    reused = tmp_path / "reused.json"
    args = [*args[:-1], str(reused), "--dense-from", str(out)]
    proc = _run("recovery", *args)
    assert proc.returncode == 0 and "[dense] taken from" in proc.stderr, proc.stderr[-3000:]
    doc = _check_schema(reused)
    first = json.loads(out.read_text())["raw"]["rows"]["dense"]
    assert doc["raw"]["rows"]["dense"] == {**first, "taken_from": "recovery.json"}
    assert any("taken from there (--dense-from)" in n for n in doc["notes"])
    # an evaluation that differs (another item limit) refuses the borrowed row
    other = [*args[: args.index("--limit")], "--limit", "3", *args[args.index("--limit") + 2:]]
    other[other.index(str(reused))] = str(tmp_path / "other.json")
    proc = _run("recovery", *other)
    assert proc.returncode != 0 and "evaluated with other settings" in proc.stderr, proc.stderr[-2000:]
    # the before-recovery evaluation of the first file serves a row compressed the same way, once the
    # fresh model is checked to be that model; a row whose recorded perplexity differs is evaluated again
    borrowed = tmp_path / "borrowed.json"
    proc = _run("recovery", *args[:-3], str(borrowed), "--before-from", str(out), "--save-models",
                str(tmp_path / "models"))
    assert proc.returncode == 0 and "before-recovery evaluation taken from" in proc.stderr, proc.stderr[-3000:]
    doc = _check_schema(borrowed)
    # --save-models keeps the recovered model for further evaluation: it loads back at the row's size
    import slicekit

    saved, _ = slicekit.load(str(tmp_path / "models" / "fasp-0.25"))
    assert count_parameters(saved) == doc["raw"]["rows"]["fasp@0.25"]["after"]["params"]
    card = (tmp_path / "models" / "fasp-0.25" / "README.md").read_text()
    assert "## Recovery" in card and "128 tokens in" in card
    mine, theirs = doc["raw"]["rows"]["fasp@0.25"]["before"], raw["fasp@0.25"]["before"]
    assert mine == {**theirs, "taken_from": "recovery.json", "ppl_check": mine["ppl_check"]}
    assert abs(mine["ppl_check"] - theirs["ppl"]) <= 1e-5 * theirs["ppl"]
    assert any("reused (--before-from)" in n for n in doc["notes"])
    stale = json.loads(out.read_text())
    stale["raw"]["rows"]["fasp@0.25"]["before"]["ppl"] *= 1.01
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    proc = _run("recovery", *args[:-3], str(tmp_path / "fresh.json"), "--before-from", str(tmp_path / "stale.json"))
    assert proc.returncode == 0 and "another model" in proc.stderr, proc.stderr[-3000:]
    doc = _check_schema(tmp_path / "fresh.json")
    assert "taken_from" not in doc["raw"]["rows"]["fasp@0.25"]["before"]
    assert not any("--before-from" in n for n in doc["notes"])


def _zs_file(path: Path, tasks: dict[str, tuple[str, str | None]], limit: int | None = None) -> None:
    """A saved ``slicekit eval`` result: ``tasks`` maps a name to (primary outcomes, plain-acc
    outcomes or None where the primary metric is acc)."""
    from slicekit.zeroshot import TaskScore, ZeroShotResult, primary_metric

    scores = {}
    for name, (primary, acc) in tasks.items():
        p = primary.count("1") / len(primary)
        a = (acc or primary).count("1") / len(primary)
        norm = primary_metric(name) == "acc_norm"
        scores[name] = TaskScore(task=name, acc=a, acc_stderr=None, acc_norm=p if norm else None,
                                 acc_norm_stderr=None, items=len(primary), chance=0.25 if "arc" in name else 0.5,
                                 metric="acc_norm" if norm else "acc", source="local", exact=True,
                                 outcomes=primary, acc_outcomes=acc if norm else None)
    path.write_text(json.dumps(ZeroShotResult(scores=scores, lm_eval_version="0.4", num_fewshot=0, limit=limit,
                                              seed=1234, batch_size=8, seconds=60.0).as_dict()))


def test_zeroshot_sets_joins_files_and_reports_both_readings(tmp_path):
    """Results of several eval runs join into one; retention is (model − chance)/(dense − chance)
    averaged over the tasks the dense model measurably beats, in acc_norm and in plain acc; the
    first-N rows recompute both from the per-item outcomes; mismatched inputs are refused."""
    n = 400
    dense_piqa_norm, dense_piqa_acc = "1" * 300 + "0" * 100, "1" * 280 + "0" * 120  # 0.75, 0.70
    model_piqa_norm, model_piqa_acc = "1" * 250 + "0" * 150, "0" * 40 + "1" * 220 + "0" * 140  # 0.625, 0.55
    dense_arc_norm, dense_arc_acc = "1" * 200 + "0" * 200, "1" * 220 + "0" * 180  # 0.5, 0.55
    model_arc_norm, model_arc_acc = "1" * 160 + "0" * 240, "1" * 190 + "0" * 210  # 0.4, 0.475
    dense_wino, model_wino = "10" * (n // 2), "1" * n  # the dense model sits at chance: left out
    _zs_file(tmp_path / "d1.json", {"piqa": (dense_piqa_norm, dense_piqa_acc), "winogrande": (dense_wino, None)})
    _zs_file(tmp_path / "d2.json", {"arc_easy": (dense_arc_norm, dense_arc_acc)}, limit=n)
    _zs_file(tmp_path / "m1.json", {"piqa": (model_piqa_norm, model_piqa_acc), "winogrande": (model_wino, None)})
    _zs_file(tmp_path / "m2.json", {"arc_easy": (model_arc_norm, model_arc_acc)}, limit=n)
    out = tmp_path / "sets.json"
    base = ["--dense", str(tmp_path / "d1.json"), str(tmp_path / "d2.json"), "--model", str(tmp_path / "m1.json"),
            str(tmp_path / "m2.json"), "--label", "toy"]
    proc = _run("zeroshot_sets", *base, "--prefix-items", "100", "--eval-command", "slicekit eval x",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = _check_schema(out)
    assert doc["command"].startswith("slicekit eval x && python benchmarks/zeroshot_sets.py --dense")
    per_task = {r[0]: r for r in doc["tables"][0]["rows"]}
    assert set(per_task) == {"piqa", "winogrande", "arc_easy"} and per_task["winogrande"][7] == 0.0
    rows = {(r[1].startswith("first"), r[2].startswith("plain")): r for r in doc["tables"][1]["rows"]}
    primary = ((0.625 - 0.5) / (0.75 - 0.5) + (0.4 - 0.25) / (0.5 - 0.25)) / 2
    acc = ((0.55 - 0.5) / (0.70 - 0.5) + (0.475 - 0.25) / (0.55 - 0.25)) / 2
    assert rows[False, False][4] == pytest.approx(primary, abs=1e-4)
    assert rows[False, True][4] == pytest.approx(acc, abs=1e-4)
    assert rows[False, False][3] == rows[False, True][3] == "piqa, arc_easy"
    lo, hi = (float(x) for x in rows[False, True][5].split("–"))
    assert lo < acc < hi and hi - lo < 1
    # the first 100 items: dense piqa and arc are all right there, the model's first 40 piqa acc wrong
    first_acc = ((0.6 - 0.5) / (1 - 0.5) + (1 - 0.25) / (1 - 0.25)) / 2
    assert rows[True, True][4] == pytest.approx(first_acc, abs=1e-4) and rows[True, True][1] == "first 100 of each"
    assert rows[True, False][4] == pytest.approx(1.0, abs=1e-4)
    assert any("left out (primary: winogrande; acc: winogrande)" in note for note in doc["notes"])

    # one model file short of a task, a task in two files, more prefix items than a task has
    bad = _run("zeroshot_sets", "--dense", str(tmp_path / "d1.json"), str(tmp_path / "d2.json"),
               "--model", str(tmp_path / "m1.json"), "--label", "toy", "--out", str(tmp_path / "bad.json"))
    assert bad.returncode != 0 and "the dense files hold arc_easy, piqa, winogrande" in bad.stderr
    twice = _run("zeroshot_sets", "--dense", str(tmp_path / "d1.json"), str(tmp_path / "d1.json"),
                 "--model", str(tmp_path / "m1.json"), "--label", "toy", "--out", str(tmp_path / "bad.json"))
    assert twice.returncode != 0 and "appear in more than one" in twice.stderr
    long = _run("zeroshot_sets", *base, "--prefix-items", "500", "--out", str(tmp_path / "bad.json"))
    assert long.returncode != 0 and "fewer than --prefix-items 500" in long.stderr
    assert not (tmp_path / "bad.json").exists()
