"""Zero-shot evaluation through lm-eval on local task files (slicekit.zeroshot)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from slicekit.errors import SlicekitError
from slicekit.zeroshot import (
    TASKS,
    TaskScore,
    ZeroShotResult,
    build_local_task,
    evaluate_tasks,
    load_local_docs,
    primary_metric,
    resolve_task_name,
)
from tiny import save_tiny_with_tokenizer

LM_EVAL_TASKS = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
OFFICIAL_YAML = {
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_easy.yaml",  # arc_challenge.yaml only includes arc_easy.yaml
    "winogrande": "winogrande/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "boolq": "super_glue/boolq/default.yaml",
}
# Tasks whose answers fit the tiny model's 128-position context (one character per token).
TINY_TASKS = ["arc_easy", "winogrande", "lambada", "boolq", "hellaswag"]


class _YamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs; ``!function module.name`` becomes the string ``"!function module.name"``."""


_YamlLoader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))


def _official(task: str) -> dict:
    path = LM_EVAL_TASKS / OFFICIAL_YAML[task]
    if not path.is_file():
        pytest.skip(f"installed lm-eval has no {OFFICIAL_YAML[task]} (task layout changed)")
    with open(path) as fh:
        return yaml.load(fh, Loader=_YamlLoader)


def _official_module(relpath: str):
    path = LM_EVAL_TASKS / relpath
    if not path.is_file():
        pytest.skip(f"installed lm-eval has no {relpath}")
    spec = importlib.util.spec_from_file_location(f"official_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- local documents

@pytest.mark.parametrize("task", list(TASKS))
def test_local_loader_reads_every_item(task, data_dir):
    docs = load_local_docs(task)
    assert len(docs) == TASKS[task].items
    check = {
        "piqa": lambda d: d["label"] in (0, 1) and d["goal"] and d["sol1"] and d["sol2"],
        "arc_easy": lambda d: d["answerKey"] in d["choices"]["label"]
        and 3 <= len(d["choices"]["text"]) == len(d["choices"]["label"]) <= 5,
        "winogrande": lambda d: d["answer"] in ("1", "2") and d["sentence"].count("_") >= 1,
        "hellaswag": lambda d: len(d["choices"]) == 4 and d["gold"] == int(d["label"]) in range(4)
        and d["query"].startswith(d["activity_label"] + ": ") and "[" not in d["query"],
        "lambada_openai": lambda d: len(d["text"].split(" ")) >= 2,
        "boolq": lambda d: d["label"] in (0, 1) and not d["question"].endswith("?") and d["passage"],
    }
    check["arc_challenge"] = check["arc_easy"]
    bad = [i for i, d in enumerate(docs) if not check[task](d)]
    assert not bad, f"{task}: malformed documents at {bad[:5]}"


def test_local_prompts_are_lm_evals(data_dir):
    """First documents rendered by the lm-eval Task we build, against literal expectations."""
    arc = build_local_task("arc_easy", load_local_docs("arc_easy")[:3])
    doc = arc.eval_docs[0]
    assert arc.doc_to_text(doc) == ("Question: Which statement best explains why photosynthesis is the foundation "
                                    "of most food webs?\nAnswer:")
    assert arc.doc_to_choice(doc)[0] == "Sunlight is the source of energy for nearly all ecosystems."
    assert arc.doc_to_target(doc) == 0
    piqa = build_local_task("piqa", load_local_docs("piqa")[:3])
    assert piqa.doc_to_text(piqa.eval_docs[1]) == "Question: dresser\nAnswer:"
    assert piqa.doc_to_target(piqa.eval_docs[1]) == 1  # valid-labels.lst line 2
    wino = build_local_task("winogrande", load_local_docs("winogrande")[:3])
    doc = wino.eval_docs[0]
    assert wino.doc_to_choice(doc) == ["Sarah was a much better surgeon than Maria so Sarah",
                                       "Sarah was a much better surgeon than Maria so Maria"]
    assert wino.doc_to_target(doc) == "always got the easier cases."
    assert wino.doc_to_text(doc) == 1  # answer "2": the gold *context*
    hs = build_local_task("hellaswag", load_local_docs("hellaswag")[:3])
    assert hs.doc_to_text(hs.eval_docs[0]) == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.doc_to_target(hs.eval_docs[0]) == 3
    lam = build_local_task("lambada", load_local_docs("lambada")[:3])
    text = lam.eval_docs[0]["text"]
    assert lam.doc_to_target(lam.eval_docs[0]) == " signs"
    assert lam.doc_to_text(lam.eval_docs[0]) + lam.doc_to_target(lam.eval_docs[0]) == text
    boolq = build_local_task("boolq", load_local_docs("boolq")[:3])
    prompt = boolq.doc_to_text(boolq.eval_docs[0])
    assert prompt.startswith("All biomass goes through")
    assert prompt.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")


@pytest.mark.parametrize("task", list(TASKS))
def test_formatting_matches_installed_lm_eval_yaml(task):
    """Our prompt/choice/target fields are lm-eval's own (catches drift in a new lm-eval)."""
    official = _official(task)
    mine = TASKS[task].config
    assert mine["output_type"] == official["output_type"]
    assert [m["metric"] for m in mine["metric_list"]] == [m["metric"] for m in official["metric_list"]]
    assert mine["metadata"]["version"] == official["metadata"]["version"]
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        if key not in official:
            assert key not in mine
        elif isinstance(official[key], str) and official[key].startswith("!function"):
            assert callable(mine[key])  # compared by behaviour in test_winogrande_functions_match
        else:
            assert mine[key] == official[key], key


def test_winogrande_functions_match(data_dir):
    official = _official_module("winogrande/preprocess_winogrande.py")
    mine = TASKS["winogrande"].config
    for doc in load_local_docs("winogrande")[:200]:
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            assert mine[key](doc) == getattr(official, key)(doc)


def test_hellaswag_processing_matches_lm_eval(data_dir):
    """lm-eval's own process_docs on the fields we recover gives our query and choices."""
    import datasets

    official = _official_module("hellaswag/utils.py")
    docs = load_local_docs("hellaswag")
    sample = docs[:40] + docs[3240:3250] + docs[-40:]  # ActivityNet, the boundary, WikiHow
    raw = [{k: d[k] for k in ("activity_label", "ctx_a", "ctx_b", "endings", "label")} for d in sample]
    processed = official.process_docs(datasets.Dataset.from_list(raw))
    assert processed["query"] == [d["query"] for d in sample]
    assert processed["choices"] == [d["choices"] for d in sample]
    assert docs[3]["query"] == "High jump: A boy is running down a track. The boy"  # ctx_b capitalised
    assert sum(bool(d["ctx_b"]) for d in docs) == 3239  # the ActivityNet items (3243, 4 start with a digit)


def test_local_slice_via_data_dir_and_partial_copy(tmp_path):
    root = tmp_path / "zeroshot" / "piqa"
    root.mkdir(parents=True)
    items = [{"goal": f"goal {i}", "sol1": f"a{i}", "sol2": f"b{i}"} for i in range(3)]
    (root / "valid.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    with pytest.raises(SlicekitError, match=r"valid-labels\.lst is missing"):
        load_local_docs("piqa", data_dir=str(tmp_path))
    (root / "valid-labels.lst").write_text("1\n0\n1\n")
    docs = load_local_docs("piqa", data_dir=str(tmp_path))
    assert [d["label"] for d in docs] == [1, 0, 1] and docs[2]["goal"] == "goal 2"
    (root / "valid-labels.lst").write_text("1\n0\n")
    with pytest.raises(SlicekitError, match=r"3 items but .* 2 labels"):
        load_local_docs("piqa", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- evaluation (tiny model)

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tmp_path_factory.mktemp("tiny_zs")
    save_tiny_with_tokenizer(directory)
    return AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


def test_tiny_model_results_well_formed_and_deterministic(tiny_lm, data_dir, capsys):
    model, tok = tiny_lm
    torch.manual_seed(7)
    random.seed(7)
    expected_draw = (torch.rand(1).item(), random.random())
    torch.manual_seed(7)
    random.seed(7)
    first = evaluate_tasks(model, tok, TINY_TASKS, limit=4, progress=False, keep_samples=True)
    assert (torch.rand(1).item(), random.random()) == expected_draw  # caller's generators untouched
    assert tok.pad_token is None  # HFLM got a copy of the tokenizer
    assert "loglikelihood" not in "".join(capsys.readouterr())  # quiet means quiet

    second = evaluate_tasks(model, tok, ["hellaswag", "lambada"], limit=4, progress=False)
    for name in ("hellaswag", "lambada_openai"):  # same numbers again, whatever else ran before
        assert second.scores[name] == first.scores[name]
    assert second.samples == {}  # per-item records only when asked for
    assert list(first.scores) == ["arc_easy", "winogrande", "lambada_openai", "boolq", "hellaswag"]
    chance = {"arc_easy": 0.25, "winogrande": 0.5, "lambada_openai": 0.0, "boolq": 0.5, "hellaswag": 0.25}
    for name, s in first.scores.items():
        assert s.items == 4 and s.source == "local" and s.chance == chance[name]
        assert 0.0 <= s.acc <= 1.0 and s.acc_stderr is not None
        assert (s.acc_norm is None) == (name in ("winogrande", "lambada_openai", "boolq"))
        assert s.metric == primary_metric(name)
        # the aggregate is the mean of lm-eval's per-item scores …
        samples = first.samples[name]
        assert len(samples) == 4
        assert s.acc == pytest.approx(sum(x["acc"] for x in samples) / 4)
        # per-item outcomes of the primary metric, in document order, kept for paired comparisons
        by_doc = sorted(samples, key=lambda x: x["doc_id"])
        assert s.outcomes == "".join(str(int(x[s.metric])) for x in by_doc)
        assert s.outcome_array().mean() == pytest.approx(s.score)
        assert second.scores.get(name) is None or second.scores[name].outcomes == s.outcomes
        # plain acc's outcomes too where the primary metric is acc_norm (the bar's form of retention)
        assert s.outcome_array("acc").mean() == pytest.approx(s.acc)
        if s.metric == "acc_norm":
            assert s.acc_outcomes == "".join(str(int(x["acc"])) for x in by_doc)
        else:
            assert s.acc_outcomes is None
        if name != "lambada_openai":  # … and per item, acc = (argmax of the choice log-likelihoods == gold)
            for x in samples:
                lls = [r[0] for r in x["filtered_resps"]]
                gold = x["target"] if name != "winogrande" else {"1": 0, "2": 1}[x["doc"]["answer"]]
                assert x["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == gold)
    assert "perplexity" in first.scores["lambada_openai"].extra
    assert first.scores["hellaswag"].exact is False and first.scores["arc_easy"].exact is True
    text = json.dumps(first.as_dict())
    again = ZeroShotResult.from_dict(json.loads(text))
    assert again.average() == first.average()
    table = first.format_table(dense=first)
    assert "lambada_openai" in table and "average" in table


def test_limit_none_and_duplicates(tiny_lm, data_dir, tmp_path):
    """A full (tiny) task is scored completely; repeated names are evaluated once."""
    root = tmp_path / "zeroshot" / "winogrande"
    root.mkdir(parents=True)
    rows = load_local_docs("winogrande")[:3]
    (root / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "dev-labels.lst").write_text("".join(r["answer"] + "\n" for r in rows))
    model, tok = tiny_lm
    res = evaluate_tasks(model, tok, ["winogrande", "WinoGrande"], data_dir=str(tmp_path), progress=False)
    assert list(res.scores) == ["winogrande"] and res.scores["winogrande"].items == 3 and res.limit is None


def _short_arc(tmp_path: Path, n: int = 3) -> Path:
    """A tiny ARC-Easy copy with short questions (the tiny model has 128 positions)."""
    root = tmp_path / "zeroshot" / "arc_easy"
    root.mkdir(parents=True)
    rows = [{"id": f"q{i}", "question": {"stem": f"Is {i} odd?", "choices": [
        {"text": "yes", "label": "A"}, {"text": "no", "label": "B"}]}, "answerKey": "AB"[i % 2 == 0]}
        for i in range(n)]
    (root / "ARC-Easy-Test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_few_shot_draws_examples_from_the_whole_split(tiny_lm, tmp_path):
    model, tok = tiny_lm
    data = _short_arc(tmp_path)
    res = evaluate_tasks(model, tok, ["arc_easy"], limit=1, num_fewshot=2, data_dir=str(data), progress=False,
                         keep_samples=True)
    (sample,) = res.samples["arc_easy"]
    context = sample["arguments"][0][0]
    # two solved examples from the other documents, then the evaluated one (lm-eval leaves it out of its shots)
    assert context.count("Question: ") == 3 and context.endswith("Question: Is 0 odd?\nAnswer:")
    assert "Is 1 odd?" in context and "Is 2 odd?" in context and context.count("Is 0 odd?") == 1
    assert res.num_fewshot == 2 and res.scores["arc_easy"].items == 1 and res.scores["arc_easy"].chance == 0.5


def test_hub_fallback_uses_lm_evals_own_task(tiny_lm, tmp_path, monkeypatch):
    """Without local files and not offline, the task comes from lm-eval's registry (its hub loader
    replaced here by the local documents); a hub failure becomes a one-line SlicekitError."""
    import datasets

    model, tok = tiny_lm
    docs = load_local_docs("arc_easy", data_dir=str(_short_arc(tmp_path / "src")))
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return datasets.DatasetDict({s: datasets.Dataset.from_list(docs) for s in ("train", "validation", "test")})

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    empty = tmp_path / "empty"
    empty.mkdir()
    hub = evaluate_tasks(model, tok, ["arc_easy"], data_dir=str(empty), progress=False)
    assert calls == [("allenai/ai2_arc", "ARC-Easy")]
    assert hub.scores["arc_easy"].source == "hub" and hub.scores["arc_easy"].items == 3
    local = evaluate_tasks(model, tok, ["arc_easy"], data_dir=str(tmp_path / "src"), progress=False)
    assert local.scores["arc_easy"].source == "local"
    for key in ("acc", "acc_norm", "chance", "items"):  # same documents, same definition, same numbers
        assert getattr(hub.scores["arc_easy"], key) == getattr(local.scores["arc_easy"], key)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub\n(details)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(SlicekitError, match=r"could not load them from the hub \(ConnectionError") as err:
        evaluate_tasks(model, tok, ["arc_easy"], data_dir=str(empty), progress=False)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- result arithmetic

def _result(scores: dict[str, tuple[float, float | None, float]], items: int = 100) -> ZeroShotResult:
    out = {}
    for name, (acc, acc_norm, chance) in scores.items():
        out[name] = TaskScore(task=name, acc=acc, acc_stderr=0.01, acc_norm=acc_norm,
                              acc_norm_stderr=None if acc_norm is None else 0.01, items=items, chance=chance,
                              metric="acc" if acc_norm is None else "acc_norm", source="local", exact=True)
    return ZeroShotResult(out, "0.4.13", 0, items, 1234, 1, 1.0)


def test_average_and_retentions():
    dense = _result({"piqa": (0.60, 0.70, 0.5), "winogrande": (0.60, None, 0.5), "arc_easy": (0.5, 0.45, 0.25)})
    small = _result({"piqa": (0.58, 0.60, 0.5), "winogrande": (0.50, None, 0.5), "arc_easy": (0.4, 0.35, 0.25)})
    assert dense.average() == pytest.approx((0.70 + 0.60 + 0.45) / 3)  # acc_norm for piqa/arc, acc for winogrande
    assert small.retention(dense) == pytest.approx((0.60 + 0.50 + 0.35) / (0.70 + 0.60 + 0.45))
    assert small.above_chance_retention(dense) == pytest.approx((0.1 / 0.2 + 0.0 / 0.1 + 0.1 / 0.2) / 3)
    assert small.above_chance_retention(dense, ["piqa"]) == pytest.approx(0.5)
    at_chance = _result({"piqa": (0.5, 0.5, 0.5)})
    with pytest.raises(SlicekitError, match="at or below chance on piqa"):
        small.above_chance_retention(at_chance, ["piqa"])
    with pytest.raises(SlicekitError, match="same --limit"):
        small.retention(_result({"piqa": (0.6, 0.7, 0.5)}, items=50), ["piqa"])
    with pytest.raises(SlicekitError, match="not in the dense result"):
        small.retention(_result({"piqa": (0.6, 0.7, 0.5)}))
    assert math.isclose(ZeroShotResult.from_dict(json.loads(json.dumps(small.as_dict()))).retention(dense),
                        small.retention(dense))
    with pytest.raises(SlicekitError, match="not a slicekit zero-shot result"):
        ZeroShotResult.from_dict({"scores": {}})


def test_default_above_chance_retention_leaves_out_tasks_the_dense_model_does_not_measurably_beat():
    """WinoGrande at 0.515 on 200 items is half a standard error above chance: its 'margin' is
    noise, and dividing by it turned a compressed model's 0.57 into a retention of 4.7 (what a
    benchmark once reported).  The default leaves it out; naming it still uses it."""
    def res(wino: float, wino_se: float | None, piqa: float) -> ZeroShotResult:
        out = _result({"piqa": (piqa, piqa, 0.5), "winogrande": (wino, None, 0.5)}, items=200)
        out.scores["winogrande"].acc_stderr = wino_se
        return out

    dense = res(0.515, 0.0354, 0.70)
    small = res(0.57, 0.035, 0.60)
    assert dense.scores["winogrande"].margin_z() == pytest.approx(0.015 / 0.0354)
    assert dense.margin_tasks() == ["piqa"]
    assert small.above_chance_tasks(dense) == ["piqa"]
    with pytest.raises(SlicekitError, match="not in the dense result"):  # a missing task is an error, not dropped
        res(0.57, 0.035, 0.6).above_chance_tasks(_result({"piqa": (0.7, 0.7, 0.5)}, items=200))
    assert small.above_chance_retention(dense) == pytest.approx(0.5)  # piqa's (0.6 − 0.5)/(0.7 − 0.5) alone
    assert small.above_chance_retention(dense, ["piqa", "winogrande"]) == pytest.approx((0.5 + 0.07 / 0.015) / 2)
    # without lm-eval's stderr the binomial one is used: sqrt(.515 × .485 / 200) = 0.0353
    assert res(0.515, None, 0.7).scores["winogrande"].stderr == pytest.approx(math.sqrt(0.515 * 0.485 / 200))
    assert res(0.515, None, 0.7).margin_tasks() == ["piqa"]
    assert res(0.60, None, 0.7).margin_tasks() == ["piqa", "winogrande"]  # 0.1 / 0.0346 ≈ 2.9 se
    assert dense.margin_tasks(z=0.4) == ["piqa", "winogrande"]
    flat = res(0.515, 0.0354, 0.51)
    with pytest.raises(SlicekitError, match="none of these tasks"):
        small.above_chance_retention(flat)
    table = small.format_table(dense)
    assert "above-chance retention 0.5000 (left out, dense within 2 standard errors of chance: winogrande)" in table


def test_above_chance_retention_in_plain_acc():
    """Issue #14's bar writes the measure in acc; the default reads each task's primary metric
    (acc_norm on PIQA/ARC/HellaSwag).  ``metric="acc"`` reads plain acc everywhere — margins,
    task selection and the paired interval included — and the two can disagree."""
    dense = _result({"piqa": (0.65, 0.66, 0.5), "arc_easy": (0.50, 0.47, 0.25), "winogrande": (0.60, None, 0.5)})
    small = _result({"piqa": (0.62, 0.59, 0.5), "arc_easy": (0.45, 0.40, 0.25), "winogrande": (0.55, None, 0.5)})
    primary = (0.09 / 0.16 + 0.15 / 0.22 + 0.05 / 0.1) / 3
    plain = (0.12 / 0.15 + 0.20 / 0.25 + 0.05 / 0.1) / 3
    assert small.above_chance_retention(dense) == pytest.approx(primary)
    assert small.above_chance_retention(dense, metric="acc") == pytest.approx(plain)
    assert small.above_chance_retention(dense, metric="primary") == pytest.approx(primary)
    assert small.scores["piqa"].value("acc") == 0.62 and small.scores["piqa"].value() == 0.59
    assert small.scores["winogrande"].value("acc") == small.scores["winogrande"].value() == 0.55
    # task selection follows the metric: acc_norm at chance, acc measurably above it
    edge = _result({"piqa": (0.60, 0.505, 0.5)})
    assert edge.margin_tasks() == [] and edge.margin_tasks(metric="acc") == ["piqa"]
    assert _result({"piqa": (0.55, 0.55, 0.5)}).above_chance_tasks(edge, "acc") == ["piqa"]
    with pytest.raises(SlicekitError, match="unknown retention metric 'acc_norm'"):
        small.above_chance_retention(dense, metric="acc_norm")
    # the paired interval reads acc's own outcomes; without them there is none
    assert small.above_chance_interval(dense, metric="acc") is None
    for res, right in ((dense, 80), (small, 60)):
        res.scores = {"piqa": res.scores["piqa"]}
        res.scores["piqa"].outcomes = "1" * 70 + "0" * 30  # acc_norm's
        res.scores["piqa"].acc_outcomes = "1" * right + "0" * (100 - right)
    assert small.above_chance_interval(dense) == (1.0, 1.0)  # identical acc_norm answers
    lo, hi = small.above_chance_interval(dense, metric="acc")
    assert 0 < lo < 1 / 3 < hi < 1.0  # 60 of dense's 80 right answers kept: (0.6 − 0.5)/(0.8 − 0.5) = 1/3
    table = small.format_table(dense)
    assert "above-chance retention in plain acc on every task" in table
    restored = ZeroShotResult.from_dict(json.loads(json.dumps(small.as_dict())))
    assert restored.scores["piqa"].acc_outcomes == small.scores["piqa"].acc_outcomes


def _paired(dense_items: str, mine_items: str, chance: float = 0.5) -> tuple[ZeroShotResult, ZeroShotResult]:
    def res(items: str) -> ZeroShotResult:
        p = items.count("1") / len(items)
        score = TaskScore(task="piqa", acc=p, acc_stderr=None, acc_norm=p, acc_norm_stderr=None, items=len(items),
                          chance=chance, metric="acc_norm", source="local", exact=True, outcomes=items)
        return ZeroShotResult({"piqa": score}, "0.4.13", 0, len(items), 1234, 1, 1.0)
    return res(dense_items), res(mine_items)


def test_above_chance_interval_is_a_paired_bootstrap():
    """The interval resamples items, scoring both models on the same draw: identical answers give
    exactly 1 with no width, however noisy the task; answers that differ on a few items give a
    narrow interval around the point estimate; independent answers give a wide one."""
    rng = random.Random(0)
    dense_items = "".join("1" if rng.random() < 0.7 else "0" for _ in range(400))
    dense, same = _paired(dense_items, dense_items)
    assert same.above_chance_interval(dense) == (1.0, 1.0)
    # flip 20 of the dense model's right answers to wrong: every draw keeps less than all
    ones = [i for i, c in enumerate(dense_items) if c == "1"][:20]
    fewer = "".join("0" if i in ones else c for i, c in enumerate(dense_items))
    dense, small = _paired(dense_items, fewer)
    point = small.above_chance_retention(dense)
    lo, hi = small.above_chance_interval(dense)
    assert lo < point < hi < 1.0 and hi - lo < 0.3
    # the same accuracy from unrelated answers: the interval is much wider than the paired one
    shuffled = list(fewer)
    rng.shuffle(shuffled)
    _, unrelated = _paired(dense_items, "".join(shuffled))
    assert unrelated.above_chance_retention(dense) == pytest.approx(point)
    ulo, uhi = unrelated.above_chance_interval(dense)
    assert uhi - ulo > 2 * (hi - lo)
    assert small.above_chance_interval(dense, seed=0) == (lo, hi)  # seeded
    assert small.above_chance_interval(dense, level=0.5)[1] < hi
    # JSON round trip keeps the outcomes; results without them (older files) give no interval
    back = ZeroShotResult.from_dict(json.loads(json.dumps(small.as_dict())))
    assert back.above_chance_interval(dense) == (lo, hi)
    back.scores["piqa"].outcomes = None
    assert back.above_chance_interval(dense) is None
    assert "95 % paired-bootstrap interval" in small.format_table(dense)
    back.scores["piqa"].outcomes = fewer[:100]  # a damaged file: 100 outcomes for 400 items
    with pytest.raises(SlicekitError, match="cannot be paired"):
        back.above_chance_interval(dense)
    with pytest.raises(SlicekitError, match="between 0 and 1"):
        small.above_chance_interval(dense, level=95)


def test_above_chance_interval_counts_a_vanished_dense_margin_as_unbounded():
    """Few items and a dense model barely above chance: some draws leave it no margin.  Those
    draws are not dropped (which would bias the interval toward the point estimate): they count
    as unbounded, so the bound they reach says so."""
    dense, small = _paired("1111101100", "1111100100")  # 0.7 and 0.6 on 10 two-way items
    assert dense.margin_tasks() == []  # too few items for a measurable margin: no default interval
    assert small.above_chance_interval(dense) is None
    lo, hi = small.above_chance_interval(dense, ["piqa"])
    assert small.above_chance_retention(dense, ["piqa"]) == pytest.approx(0.5)
    # small is right only where dense is, so a draw without a dense margin has none either: −inf
    assert lo == -math.inf and hi == 1.0


# ----------------------------------------------------------------------------- bad input

def test_unknown_task_and_bad_settings(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(SlicekitError, match="unknown zero-shot task 'mmlu': use one of piqa"):
        evaluate_tasks(model, tok, ["piqa", "mmlu"])
    with pytest.raises(SlicekitError, match="no zero-shot tasks"):
        evaluate_tasks(model, tok, [])
    with pytest.raises(SlicekitError, match="--limit"):
        evaluate_tasks(model, tok, ["piqa"], limit=0)
    assert resolve_task_name("lambada") == "lambada_openai"


def test_missing_files_offline(tiny_lm, tmp_path, monkeypatch):
    model, tok = tiny_lm
    monkeypatch.setenv("SLICEKIT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SlicekitError) as err:
        evaluate_tasks(model, tok, ["arc_easy"])
    msg = str(err.value)
    assert "\n" not in msg and "arc_easy/ARC-Easy-Test.jsonl" in msg and "offline" in msg
    monkeypatch.delenv("SLICEKIT_DATA_DIR")
    with pytest.raises(SlicekitError, match="SLICEKIT_DATA_DIR is not set"):
        evaluate_tasks(model, tok, ["hellaswag"])


def test_answer_longer_than_context_is_a_clear_error(tiny_lm, data_dir):
    model, tok = tiny_lm  # PIQA's first solutions are > 128 characters = tokens here
    with pytest.raises(SlicekitError, match="context of 128 tokens"):
        evaluate_tasks(model, tok, ["piqa"], limit=2, progress=False)


# ----------------------------------------------------------------------------- agreement with plain lm-eval

def _hub_schema_files(data_dir: str, out: Path, n: int) -> dict[str, Path]:
    """The raw files turned into lm-eval's hub schema, independently of slicekit's readers."""
    z = Path(data_dir) / "zeroshot"
    arc = []
    with open(z / "arc_easy" / "ARC-Easy-Test.jsonl") as fh:
        for line in list(fh)[:n]:
            o = json.loads(line)
            arc.append({"id": o["id"], "question": o["question"]["stem"], "answerKey": o["answerKey"],
                        "choices": {"text": [c["text"] for c in o["question"]["choices"]],
                                    "label": [c["label"] for c in o["question"]["choices"]]}})
    with open(z / "piqa" / "valid.jsonl") as fh, open(z / "piqa" / "valid-labels.lst") as lab:
        piqa = [{**json.loads(line), "label": int(label)} for line, label in list(zip(fh, lab))[:n]]
    paths = {"arc_easy": out / "arc.jsonl", "piqa": out / "piqa.jsonl"}
    for name, rows in (("arc_easy", arc), ("piqa", piqa)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


@pytest.mark.slow
def test_agrees_with_plain_lm_eval_on_smollm2(smollm2, data_dir, tmp_path):
    """Our numbers = lm-eval's official task definitions run by plain lm-eval on the same data,
    and the per-choice scores are the model's own log-likelihoods."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = smollm2
    n = 2
    ours = evaluate_tasks(model, tok, ["arc_easy", "piqa"], limit=n, progress=False, keep_samples=True)

    files = _hub_schema_files(data_dir, tmp_path, n)
    configs = []
    for name, split in (("arc_easy", "test"), ("piqa", "validation")):
        cfg = _official(name)
        cfg.update(dataset_path="json", dataset_name=None, training_split=None, validation_split=None,
                   test_split=None, dataset_kwargs={"data_files": {split: str(files[name])},
                                                    "cache_dir": str(tmp_path / "hf_cache")})
        cfg[f"{split}_split"] = split
        configs.append(cfg)
    plain = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=copy.deepcopy(tok), batch_size=1), tasks=configs,
                                    num_fewshot=0, limit=n, task_manager=TaskManager(include_defaults=False))
    for name in ("arc_easy", "piqa"):
        ref = plain["results"][name]
        assert ours.scores[name].acc == ref["acc,none"]
        assert ours.scores[name].acc_norm == ref["acc_norm,none"]
        assert ours.scores[name].items == n
        mine = [r[0] for s in ours.samples[name] for r in s["filtered_resps"]]
        theirs = [r[0] for s in sorted(plain["samples"][name], key=lambda s: s["doc_id"]) for r in s["filtered_resps"]]
        assert len(mine) == len(theirs) == n * (4 if name == "arc_easy" else 2)
        assert mine == pytest.approx(theirs, abs=1e-5)

    # the first ARC item by hand: sum of log p(continuation tokens | prompt), lm-eval's token split
    doc = json.loads(files["arc_easy"].read_text().splitlines()[0])
    ctx = "Question: " + doc["question"] + "\nAnswer:"
    with torch.no_grad():
        for i, choice in enumerate(doc["choices"]["text"]):
            whole = tok(ctx + " " + choice).input_ids
            cont = whole[len(tok(ctx).input_ids):]
            logits = model(torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)
            ll = logits[-len(cont):].gather(-1, torch.tensor(cont)[:, None]).sum().item()
            assert ll == pytest.approx(ours.samples["arc_easy"][0]["filtered_resps"][i][0], abs=1e-3)
