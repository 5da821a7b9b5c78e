"""Zero-shot accuracy through lm-evaluation-harness, offline from local task files.

The numbers structured-compression papers report (SliceGPT and its successors) come from
lm-evaluation-harness: multiple-choice log-likelihood scoring with a fixed prompt per task.  To
stay comparable we run lm-eval's own evaluator (``lm_eval.simple_evaluate``) on the in-memory
model wrapped in lm-eval's ``HFLM`` — we never re-implement the scoring.  What we replace is only
where the documents come from: machines that build and test slicekit reach no dataset hub, so each
task reads the official files from ``$SLICEKIT_DATA_DIR/zeroshot/<task>/`` and turns them into
documents in the *hub schema* that lm-eval's task definitions expect; the prompt / choices /
target fields below mirror lm-eval's task YAMLs (``lm_eval/tasks/<task>/``) field for field, so a
local task scores exactly like the hub task would on the same documents.  Without local files (and
with the hub reachable) we hand the task name to lm-eval, which then uses its own definition.

Two local sets are not byte-identical to what lm-eval downloads (see ``TaskDefinition.note``):
HellaSwag ships as a re-preprocessed text file and BoolQ without passage titles, so their scores
are close to, not equal to, the published lm-eval numbers.  The other five are the official
release files that lm-eval's hub datasets were made from.

Which metric a task contributes to averages: ``acc_norm`` where the task defines it (PIQA, ARC,
HellaSwag), ``acc`` otherwise (WinoGrande, LAMBADA, BoolQ) — the rule of the SliceGPT reference
evaluation (``result.get("acc_norm,none", result["acc,none"])``), which QuaRot and later slicing
papers inherit.

Above-chance retention can be read in either metric: ``metric="primary"`` (the rule above, the
default) or ``metric="acc"`` (plain accuracy on every task, the form in which issue #14 writes its
bar).  The two differ on a small model: length normalisation changes which answers win, and the
dense model's margin over chance differs between them, so both are reported side by side.
"""

from __future__ import annotations

import bz2
import contextlib
import copy
import functools
import io
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from slicekit.data import DATA_DIR_ENV
from slicekit.data import data_dir as env_data_dir
from slicekit.errors import SlicekitError

ZEROSHOT_SUBDIR = "zeroshot"
DEFAULT_SEED = 1234
# Only LAMBADA's perplexity has a bootstrapped stderr; accuracy stderrs are closed-form (they are
# computed whenever this is > 0).  lm-eval's default of 100 000 draws takes minutes on 5k items.
BOOTSTRAP_ITERS = 1000
#: a task counts in the default above-chance retention when the dense model beats chance by this
#: many standard errors (ZeroShotResult.margin_tasks says why)
MARGIN_Z = 2.0
#: the metrics above-chance retention can be read in: each task's primary metric, or plain acc
RETENTION_METRICS = ("primary", "acc")


def _check_metric(metric: str) -> str:
    if metric not in RETENTION_METRICS:
        raise SlicekitError(f"unknown retention metric {metric!r}: use one of {', '.join(RETENTION_METRICS)}")
    return metric

# ----------------------------------------------------------------------------- task definitions

_MEAN_UP = {"aggregation": "mean", "higher_is_better": True}
_ACC = [{"metric": "acc", **_MEAN_UP}]
_ACC_NORM = [{"metric": "acc", **_MEAN_UP}, {"metric": "acc_norm", **_MEAN_UP}]


def _winogrande_doc_to_text(doc: dict) -> int:
    """Partial evaluation (Trinh & Le 2018): the *context* varies (sentence up to the blank with
    each option filled in) and the continuation after the blank is scored; lm-eval marks this by
    returning the gold context index from ``doc_to_text``."""
    return {"1": 0, "2": 1}[doc["answer"]]


def _winogrande_doc_to_target(doc: dict) -> str:
    blank = doc["sentence"].index("_") + 1
    return doc["sentence"][blank:].strip()


def _winogrande_doc_to_choice(doc: dict) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


# lm-eval's prompt/choice/target fields per task, as in its task YAMLs (checked against the
# installed YAMLs by tests/test_zeroshot.py so a change upstream is noticed).
_CONFIGS: dict[str, dict[str, Any]] = {
    "piqa": {
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}",
        "metric_list": _ACC_NORM,
        "metadata": {"version": 1.0},
    },
    "arc_easy": {
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}",
        "metric_list": _ACC_NORM,
        "metadata": {"version": 1.0},
    },
    "winogrande": {
        "output_type": "multiple_choice",
        "doc_to_text": _winogrande_doc_to_text,
        "doc_to_target": _winogrande_doc_to_target,
        "doc_to_choice": _winogrande_doc_to_choice,
        "metric_list": _ACC,
        "metadata": {"version": 1.0},
    },
    "hellaswag": {  # the loader applies lm-eval's process_docs (query / choices / gold)
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": "choices",
        "metric_list": _ACC_NORM,
        "metadata": {"version": 1.0},
    },
    "lambada_openai": {
        "output_type": "loglikelihood",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", **_MEAN_UP},
        ],
        "metadata": {"version": 1.0},
    },
    "boolq": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": ["no", "yes"],
        "metric_list": _ACC,
        "metadata": {"version": 2.0},
    },
}
_CONFIGS["arc_challenge"] = _CONFIGS["arc_easy"]


# ----------------------------------------------------------------------------- local readers

def _jsonl(path: str) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise SlicekitError(f"{path}:{lineno} is not valid JSON ({err.msg})") from err
            if not isinstance(obj, dict):
                raise SlicekitError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, obj


def _fields(path: str, lineno: int, obj: dict, *names: str) -> list:
    missing = [n for n in names if n not in obj]
    if missing:
        raise SlicekitError(f"{path}:{lineno} lacks the field(s) {', '.join(missing)}")
    return [obj[n] for n in names]


def _labels(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def _paired(data: str, labels: str) -> Iterator[tuple[int, dict, str]]:
    rows = list(_jsonl(data))
    gold = _labels(labels)
    if len(rows) != len(gold):
        raise SlicekitError(f"{data} has {len(rows)} items but {labels} has {len(gold)} labels")
    for (lineno, obj), label in zip(rows, gold):
        yield lineno, obj, label


def _read_piqa(paths: list[str]) -> list[dict]:
    docs = []
    for lineno, obj, label in _paired(*paths):
        goal, sol1, sol2 = _fields(paths[0], lineno, obj, "goal", "sol1", "sol2")
        if label not in ("0", "1"):
            raise SlicekitError(f"{paths[1]}: label {label!r} for item {lineno} is not 0 or 1")
        docs.append({"goal": goal, "sol1": sol1, "sol2": sol2, "label": int(label)})
    return docs


def _read_arc(paths: list[str]) -> list[dict]:
    docs = []
    for lineno, obj in _jsonl(paths[0]):
        question, key = _fields(paths[0], lineno, obj, "question", "answerKey")
        choices = question.get("choices", []) if isinstance(question, dict) else []
        labels = [c["label"] for c in choices]
        if not choices or "stem" not in question or key not in labels:
            raise SlicekitError(f"{paths[0]}:{lineno}: expected question.stem, question.choices and an answerKey among them")
        docs.append({"id": obj.get("id", str(lineno)), "question": question["stem"],
                     "choices": {"text": [c["text"] for c in choices], "label": labels}, "answerKey": key})
    return docs


def _read_winogrande(paths: list[str]) -> list[dict]:
    docs = []
    for lineno, obj, label in _paired(*paths):
        sentence, opt1, opt2 = _fields(paths[0], lineno, obj, "sentence", "option1", "option2")
        if label not in ("1", "2") or "_" not in sentence:
            raise SlicekitError(f"{paths[0]}:{lineno}: needs a '_' blank and a label 1 or 2 (got {label!r})")
        if "answer" in obj and str(obj["answer"]) != label:
            raise SlicekitError(f"{paths[0]}:{lineno}: answer {obj['answer']!r} disagrees with {paths[1]} ({label!r})")
        docs.append({"sentence": sentence, "option1": opt1, "option2": opt2, "answer": label})
    return docs


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text clean-up (WikiHow ``[title]``/``[step]`` artefacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


# The local file joins ``ctx_a`` and ``ctx_b`` ("A man is sitting on a roof. he"); lm-eval
# capitalises ``ctx_b``.  ``ctx_b`` is the unfinished last sentence (ActivityNet items): a
# lower-case fragment without a sentence end after the last sentence boundary.  On the 10,042
# validation items this finds exactly the ActivityNet items whose ctx_b starts with a letter.
_CTX_B = re.compile(r"^(.*[.!?\"':]) ([a-z][^.!?:]*)$", re.S)


def _read_hellaswag(paths: list[str]) -> list[dict]:
    with bz2.open(paths[0], "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise SlicekitError(f"{paths[0]}: expected 6 lines per item (context, label, 4 endings), got {len(lines)} lines")
    docs = []
    for i in range(0, len(lines), 6):
        head, label, *endings = lines[i : i + 6]
        if label.strip() not in ("0", "1", "2", "3") or ": " not in head:
            raise SlicekitError(f"{paths[0]}:{i + 1}: expected 'activity_label: context' then a label 0-3")
        activity, ctx = head.split(": ", 1)
        m = _CTX_B.match(ctx)
        ctx_a, ctx_b = (m.group(1), m.group(2)) if m else (ctx, "")
        doc = {"ind": i // 6, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
               "endings": endings, "label": label.strip()}
        # lm-eval's hellaswag process_docs, applied here rather than through datasets.map
        doc["query"] = _hellaswag_preprocess(activity + ": " + ctx_a + " " + ctx_b.capitalize())
        doc["choices"] = [_hellaswag_preprocess(e) for e in endings]
        doc["gold"] = int(doc["label"])
        docs.append(doc)
    return docs


def _read_lambada(paths: list[str]) -> list[dict]:
    docs = []
    for lineno, obj in _jsonl(paths[0]):
        (text,) = _fields(paths[0], lineno, obj, "text")
        if not isinstance(text, str) or " " not in text.strip():
            raise SlicekitError(f"{paths[0]}:{lineno}: 'text' must hold at least two words")
        docs.append({"text": text})
    return docs


def _read_boolq(paths: list[str]) -> list[dict]:
    """The local file holds ``query = "Passage: <p>\\nQuestion: <q>?"``; we recover the SuperGLUE
    fields (lower-case question without "?", which lm-eval's prompt appends)."""
    docs = []
    for lineno, obj in _jsonl(paths[0]):
        query, choices, gold = _fields(paths[0], lineno, obj, "query", "choices", "gold")
        if not query.startswith("Passage: ") or "\nQuestion: " not in query or choices != ["no", "yes"] \
                or gold not in (0, 1):
            raise SlicekitError(f"{paths[0]}:{lineno}: expected 'Passage: …\\nQuestion: …', choices [no, yes], gold 0/1")
        passage, question = query[len("Passage: "):].rsplit("\nQuestion: ", 1)
        docs.append({"passage": passage, "question": question.removesuffix("?"), "label": int(gold)})
    return docs


@dataclass(frozen=True)
class TaskDefinition:
    """One zero-shot task: where its local files are and how lm-eval scores it."""

    name: str  # lm-eval's task name; results are keyed by it
    files: tuple[str, ...]  # relative to <data dir>/zeroshot
    split: str  # the official split the local file holds (lm-eval's hub task evaluates it)
    items: int  # documents in the full set
    reader: Callable[[list[str]], list[dict]]
    exact: bool  # local documents equal what lm-eval downloads
    note: str = ""

    @property
    def config(self) -> dict[str, Any]:
        return _CONFIGS[self.name]


TASKS: dict[str, TaskDefinition] = {
    d.name: d
    for d in (
        TaskDefinition("piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation", 1838, _read_piqa, True),
        TaskDefinition("arc_easy", ("arc_easy/ARC-Easy-Test.jsonl",), "test", 2376, _read_arc, True),
        TaskDefinition("arc_challenge", ("arc_challenge/ARC-Challenge-Test.jsonl",), "test", 1172, _read_arc, True),
        TaskDefinition("winogrande", ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"), "validation", 1267,
                       _read_winogrande, True),
        TaskDefinition("hellaswag", ("hellaswag/hellaswag_val_full.txt.bz2",), "validation", 10042, _read_hellaswag,
                       False, "local text file was re-preprocessed upstream; scores differ slightly from lm-eval's"),
        TaskDefinition("lambada_openai", ("lambada/lambada_test.jsonl",), "test", 5153, _read_lambada, True),
        TaskDefinition("boolq", ("boolq/boolq.jsonl",), "validation", 3270, _read_boolq, False,
                       "local file has no passage titles; scores differ slightly from lm-eval's"),
    )
}
ALIASES = {"lambada": "lambada_openai", "arc_e": "arc_easy", "arc_c": "arc_challenge"}


def resolve_task_name(name: str) -> str:
    """lm-eval's name for a task we know (``lambada`` → ``lambada_openai``)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise SlicekitError(f"unknown zero-shot task {name!r}: use one of {', '.join(TASKS)} (or lambada)")
    return key


def zeroshot_dir(data_dir: str | None = None) -> str | None:
    """The folder holding the task folders: ``<data dir>/zeroshot`` (or ``data_dir`` itself when it
    already is that folder); ``data_dir`` defaults to ``$SLICEKIT_DATA_DIR``."""
    root = data_dir if data_dir is not None else env_data_dir()
    if not root:
        return None
    sub = os.path.join(root, ZEROSHOT_SUBDIR)
    return sub if os.path.isdir(sub) else root


def local_files(task: str, data_dir: str | None = None) -> list[str] | None:
    """Paths of the task's local files, or ``None`` when none of them exist.  A partial set is an
    error: it means a broken copy, not a request to go to the hub."""
    defn = TASKS[resolve_task_name(task)]
    root = zeroshot_dir(data_dir)
    if root is None:
        return None
    paths = [os.path.join(root, rel) for rel in defn.files]
    present = [os.path.isfile(p) for p in paths]
    if not any(present):
        return None
    if not all(present):
        missing = [rel for rel, ok in zip(defn.files, present) if not ok]
        raise SlicekitError(f"zero-shot task {defn.name}: {', '.join(missing)} is missing under {root}; copy the complete set")
    return paths


_DOC_CACHE: dict[str, tuple[tuple, list[dict]]] = {}  # task -> (file identity, documents)


def _read_docs(name: str, paths: list[str]) -> list[dict]:
    """Parsed documents, cached per task and file identity (HellaSwag's bz2 alone takes seconds
    to read, and a compression run evaluates the same tasks several times)."""
    identity = tuple((p, st.st_size, st.st_mtime_ns) for p in paths for st in [os.stat(p)])
    cached = _DOC_CACHE.get(name)
    if cached is None or cached[0] != identity:
        cached = _DOC_CACHE[name] = (identity, TASKS[name].reader(paths))
    return list(cached[1])


def load_local_docs(task: str, data_dir: str | None = None) -> list[dict]:
    """The task's documents from local files, in the schema of lm-eval's hub dataset (the dicts
    are shared with a cache: do not modify them)."""
    name = resolve_task_name(task)
    paths = local_files(name, data_dir)
    if paths is None:
        raise SlicekitError(_missing_message(name, data_dir))
    return _read_docs(name, paths)


def _missing_message(name: str, data_dir: str | None) -> str:
    root = zeroshot_dir(data_dir)
    where = root if root else f"${DATA_DIR_ENV}/{ZEROSHOT_SUBDIR} ({DATA_DIR_ENV} is not set)"
    return (f"zero-shot task {name}: no local files ({', '.join(TASKS[name].files)} under {where}) "
            f"and the hub is offline; put the files there and set {DATA_DIR_ENV} to the data directory")


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


# ----------------------------------------------------------------------------- lm-eval glue

@functools.cache
def _local_task_class() -> type:
    """A ConfigurableTask whose ``download`` serves in-memory documents (no hub, no cache files).

    Overriding ``download`` is the one extension point that has the same shape in every lm-eval
    0.4.x (``custom_dataset`` only exists from 0.4.9 on)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    class LocalDocsTask(ConfigurableTask):
        def __init__(self, docs: dict[str, list[dict]], config: dict[str, Any]) -> None:
            self._slicekit_docs = docs  # read by download(), which ConfigurableTask.__init__ calls
            super().__init__(config=config)

        def download(self, dataset_kwargs: dict | None = None, **kwargs: Any) -> None:
            self.dataset = datasets.DatasetDict(
                {split: datasets.Dataset.from_list(docs) for split, docs in self._slicekit_docs.items()})

    return LocalDocsTask


def build_local_task(task: str, docs: list[dict]) -> Any:
    """An lm-eval ``Task`` over ``docs`` with lm-eval's prompt formatting for ``task``."""
    defn = TASKS[resolve_task_name(task)]
    cls = _local_task_class()
    # Only the evaluated split exists locally, so few-shot examples come from it.  Calling it the
    # test split *and* the few-shot split is what makes lm-eval leave the evaluated document out
    # of its own examples (it only does so when those two names agree).
    config = {"task": defn.name, "dataset_path": f"slicekit-local/{defn.name}",
              "test_split": "test", "fewshot_split": "test", **copy.deepcopy(defn.config)}
    return cls({"test": docs}, config)


@functools.cache
def _default_task_manager() -> Any:
    """lm-eval's registry of its own task definitions (indexing ~15k YAMLs takes seconds: once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@functools.cache
def _progress_lm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class SlicekitHFLM(HFLM):
        """HFLM whose log-likelihood progress bar follows ``progress`` (lm-eval always shows it)."""

        show_progress = True

        def loglikelihood(self, requests, disable_tqdm: bool = False):  # type: ignore[override]
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    return SlicekitHFLM


def _make_lm(model: torch.nn.Module, tokenizer, batch_size: int, progress: bool) -> Any:
    cls = _progress_lm_class()
    # HFLM sets a pad token on the tokenizer it gets; give it a copy so the caller's is untouched.
    lm = cls(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend="causal", batch_size=batch_size)
    lm.show_progress = progress
    return lm


@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """lm-eval's log chatter off (its warnings are about passing a model object and overriding
    num_fewshot: what we mean to do); with ``progress=False`` also its progress bars and prints
    (the context-building bar has no switch, so stdout/stderr are captured for the duration)."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]  # the name changed within 0.4.x
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    old_mp = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"  # LAMBADA's bootstrap in-process, not a pool of workers
    try:
        if progress:
            yield
        else:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if old_mp is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old_mp


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """simple_evaluate seeds the global generators; restore them so evaluating does not change
    what a surrounding pipeline draws next."""
    py, nps, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(nps)
        torch.set_rng_state(pt)


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        import lm_eval

        return str(getattr(lm_eval, "__version__", "unknown"))


# ----------------------------------------------------------------------------- results

def primary_metric(task: str) -> str:
    """The metric a task contributes to averages: acc_norm where lm-eval defines it, else acc."""
    names = [m["metric"] for m in TASKS[resolve_task_name(task)].config["metric_list"]]
    return "acc_norm" if "acc_norm" in names else "acc"


@dataclass
class TaskScore:
    """One task's result.  ``chance`` is the expected accuracy of uniform guessing on the scored
    items (mean of 1/number of choices; 0 for LAMBADA's exact-word accuracy)."""

    task: str
    acc: float
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    items: int
    chance: float
    metric: str  # "acc_norm" or "acc": what averages use
    source: str  # "local" or "hub"
    exact: bool  # documents equal lm-eval's hub documents
    version: Any = None  # lm-eval's task version
    extra: dict[str, float] = field(default_factory=dict)  # other metrics (lambada perplexity …)
    #: the primary metric's per-item outcome in document order, "1" right and "0" wrong (None in
    #: results written before it was kept).  Two results on the same items can then be compared
    #: item by item: a paired comparison is far tighter than two independent standard errors.
    outcomes: str | None = None
    #: plain acc's per-item outcomes where the primary metric is acc_norm (None where it is acc:
    #: :attr:`outcomes` holds them then; None too in results written before they were kept)
    acc_outcomes: str | None = None

    @property
    def score(self) -> float:
        value = self.acc_norm if self.metric == "acc_norm" else self.acc
        assert value is not None
        return value

    def _uses_acc(self, metric: str) -> bool:
        """Whether ``metric`` ("primary" or "acc") reads plain acc on this task."""
        return _check_metric(metric) == "acc" or self.metric != "acc_norm"

    def value(self, metric: str = "primary") -> float:
        """The score in ``metric``: "primary" is :attr:`score`, "acc" plain accuracy."""
        return self.acc if self._uses_acc(metric) else self.score

    @property
    def stderr(self) -> float:
        """Standard error of :attr:`score`: lm-eval's where it reported one, else the binomial
        ``sqrt(p(1 − p)/items)`` it would have reported."""
        return self.stderr_of("primary")

    def stderr_of(self, metric: str = "primary") -> float:
        """Standard error of :meth:`value` in ``metric`` (binomial where lm-eval gave none)."""
        value = self.acc_stderr if self._uses_acc(metric) else self.acc_norm_stderr
        if value is not None:
            return value
        p = self.value(metric)
        return math.sqrt(max(p * (1 - p), 0.0) / max(self.items, 1))

    def margin_z(self, metric: str = "primary") -> float:
        """How many standard errors the score in ``metric`` sits above chance (negative below it)."""
        margin = self.value(metric) - self.chance
        se = self.stderr_of(metric)
        if se <= 0:
            return math.inf if margin > 0 else (-math.inf if margin < 0 else 0.0)
        return margin / se

    def outcome_array(self, metric: str = "primary") -> np.ndarray | None:
        """The per-item 0/1 outcomes in ``metric`` as an array (None when they were not kept)."""
        text = self.acc_outcomes if self.metric == "acc_norm" and self._uses_acc(metric) else self.outcomes
        if text is None:
            return None
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.float64) - ord("0")


@dataclass
class ZeroShotResult:
    """Per-task scores plus the settings that make them reproducible."""

    scores: dict[str, TaskScore]
    lm_eval_version: str
    num_fewshot: int
    limit: int | None
    seed: int
    batch_size: int
    seconds: float
    samples: dict[str, list[dict]] = field(default_factory=dict, repr=False, compare=False)  # lm-eval's per-item logs

    def _tasks(self, tasks: list[str] | None, other: ZeroShotResult | None = None) -> list[str]:
        names = [resolve_task_name(t) for t in tasks] if tasks else list(self.scores)
        for n in names:
            if n not in self.scores:
                raise SlicekitError(f"zero-shot task {n} is not in this result (has {', '.join(self.scores)})")
            if other is not None:
                if n not in other.scores:
                    raise SlicekitError(f"zero-shot task {n} is not in the dense result (has {', '.join(other.scores)})")
                if other.scores[n].items != self.scores[n].items:
                    raise SlicekitError(f"{n}: {self.scores[n].items} items here but {other.scores[n].items} in the "
                                        "dense result; evaluate both with the same --limit")
        if not names:
            raise SlicekitError("no zero-shot tasks to average")
        return names

    def average(self, tasks: list[str] | None = None) -> float:
        """Mean over tasks of each task's primary metric (acc_norm where defined, else acc)."""
        names = self._tasks(tasks)
        return sum(self.scores[n].score for n in names) / len(names)

    def retention(self, dense: ZeroShotResult, tasks: list[str] | None = None) -> float:
        """``average / dense.average`` over the same tasks: the fraction of dense accuracy kept."""
        names = self._tasks(tasks, dense)
        base = dense.average(names)
        if base <= 0:
            raise SlicekitError("the dense model scores 0 on these tasks; retention is undefined")
        return self.average(names) / base

    def margin_tasks(self, tasks: list[str] | None = None, z: float = MARGIN_Z, metric: str = "primary") -> list[str]:
        """The tasks (of ``tasks``, default all) on which this model — the dense reference — beats
        chance by at least ``z`` standard errors in ``metric``.

        Why: above-chance retention divides by the dense model's margin.  A small model sits at
        chance on some tasks (SmolLM2-135M on WinoGrande: 0.515 on 200 items, half a standard
        error above 0.5); there the margin is noise, and one lucky item moves the ratio by whole
        units.  Such a task has no margin to retain, so the default average leaves it out."""
        return [n for n in self._tasks(tasks) if self.scores[n].margin_z(metric) >= z]

    def above_chance_tasks(self, dense: ZeroShotResult, metric: str = "primary") -> list[str]:
        """This result's tasks that the default above-chance retention against ``dense`` averages:
        those with a measurable dense margin (:meth:`margin_tasks`).  Every task must be in
        ``dense`` with the same item count, as for the other comparisons."""
        return dense.margin_tasks(self._tasks(None, dense), metric=metric)

    def above_chance_retention(self, dense: ZeroShotResult, tasks: list[str] | None = None,
                               metric: str = "primary") -> float:
        """Mean over tasks of (score − chance) / (dense − chance): what fraction of the dense
        model's margin over guessing survives.  Plain retention flatters a model that collapsed
        to chance (50 % of a 2-way task's 70 % "retains" 71 %); this measure gives it 0.

        ``tasks`` default: this result's tasks on which the dense model's margin is measurable
        (:meth:`margin_tasks`, ≥ 2 standard errors); named tasks are used as given, and one where
        the dense model is at or below chance is refused.  ``metric``: each task's primary metric
        (acc_norm where defined) or plain "acc" (see the module docstring)."""
        if tasks is None:
            tasks = self.above_chance_tasks(dense, metric)
            if not tasks:
                raise SlicekitError(f"the dense model beats chance by {MARGIN_Z:g} standard errors on none of these "
                                    "tasks; above-chance retention is undefined (use more items: --limit)")
        names = self._tasks(tasks, dense)
        ratios = []
        for n in names:
            mine, ref = self.scores[n], dense.scores[n]
            margin = ref.value(metric) - ref.chance
            if margin <= 0:
                raise SlicekitError(f"the dense model is at or below chance on {n} ({ref.value(metric):.3f} ≤ "
                                    f"{ref.chance:.3f}); above-chance retention is undefined there: leave the task out")
            ratios.append((mine.value(metric) - mine.chance) / margin)
        return sum(ratios) / len(ratios)

    def above_chance_interval(self, dense: ZeroShotResult, tasks: list[str] | None = None, level: float = 0.95,
                              iters: int = 2000, seed: int = 0, metric: str = "primary") -> tuple[float, float] | None:
        """A ``level`` paired-bootstrap percentile interval for :meth:`above_chance_retention`.

        Why: the measure divides by the dense model's margin over chance, which on a small model
        is a few standard errors wide, so a single number (0.67 on 200 items) cannot say whether
        0.75 is within reach.  Both models answered the *same* items, and most items are right or
        wrong for both, so the draws resample item indices once per task and score both models on
        them (a paired bootstrap): independent standard errors would double-count the shared items'
        luck.  Tasks are resampled independently of each other; ``chance`` is held at its mean.

        A draw in which the dense model's margin vanishes makes that task's ratio unbounded: it
        counts as ±infinity (the sign of this model's margin), and a bound that lands there is
        reported as such rather than dropped (a draw with opposite infinities is left out).
        Returns None when either result lacks per-item outcomes in ``metric`` (results saved before
        they were kept)."""
        if not 0 < level < 1:
            raise SlicekitError(f"interval level must be between 0 and 1 (got {level})")
        if tasks is None:
            tasks = self.above_chance_tasks(dense, metric)
            if not tasks:
                return None
        names = self._tasks(tasks, dense)
        rng = np.random.default_rng(seed)
        total = np.zeros(iters)
        for n in names:
            mine, ref = self.scores[n].outcome_array(metric), dense.scores[n].outcome_array(metric)
            if mine is None or ref is None:
                return None
            if mine.shape != ref.shape or mine.size == 0:
                raise SlicekitError(f"{n}: per-item outcomes of {mine.size} and {ref.size} items cannot be paired")
            chance, chunk = self.scores[n].chance, max(1, 2_000_000 // mine.size)
            for start in range(0, iters, chunk):  # bounded memory for full-size tasks
                idx = rng.integers(0, mine.size, size=(min(chunk, iters - start), mine.size))
                m = mine[idx].mean(axis=1) - chance
                d = ref[idx].mean(axis=1) - chance
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.where(d > 0, m / np.where(d > 0, d, 1.0), np.sign(m) * np.inf)
                ratio[np.isnan(ratio)] = 0.0  # both margins zero: nothing kept of nothing
                total[start:start + idx.shape[0]] += ratio
        total /= len(names)
        tail = (1 - level) / 2
        # no interpolation across ±inf; a draw with +inf on one task and −inf on another says
        # nothing and is left out
        lo, hi = np.nanquantile(total, [tail, 1 - tail], method="inverted_cdf")
        return float(lo), float(hi)

    def as_dict(self) -> dict:
        """JSON-able (per-item samples are left out)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("scores", "samples")}
        out["scores"] = {n: asdict(s) for n, s in self.scores.items()}
        out["average"] = self.average()
        out["average_metric"] = {n: s.metric for n, s in self.scores.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ZeroShotResult:
        """Inverse of ``as_dict`` (e.g. a dense baseline saved as JSON)."""
        try:
            scores = {n: TaskScore(**s) for n, s in data["scores"].items()}
            return cls(scores=scores, lm_eval_version=data["lm_eval_version"], num_fewshot=data["num_fewshot"],
                       limit=data["limit"], seed=data["seed"], batch_size=data["batch_size"], seconds=data["seconds"])
        except (KeyError, TypeError) as err:
            raise SlicekitError(f"not a slicekit zero-shot result ({type(err).__name__}: {err})") from err

    def format_table(self, dense: ZeroShotResult | None = None) -> str:
        """A plain-text table; with ``dense``, also each task's retention of the dense score."""
        head = f"{'task':<15} {'acc':>14} {'acc_norm':>14} {'items':>6} {'chance':>6}  source"
        if dense is not None:
            head += "   dense  ret.  above-chance ret."
        lines = [head, "-" * len(head)]

        def pm(v: float | None, se: float | None) -> str:
            if v is None:
                return "—"
            return f"{v:.4f}±{se:.4f}" if se is not None else f"{v:.4f}"

        for n, s in self.scores.items():
            src = s.source + ("" if s.exact else " (approx.)")
            row = f"{n:<15} {pm(s.acc, s.acc_stderr):>14} {pm(s.acc_norm, s.acc_norm_stderr):>14} {s.items:>6} {s.chance:>6.3f}  {src}"
            if dense is not None and n in dense.scores:
                d = dense.scores[n]
                above = (s.score - s.chance) / (d.score - d.chance) if d.score > d.chance else math.nan
                ret = s.score / d.score if d.score > 0 else math.nan
                row += f"   {d.score:.4f} {ret:5.3f} {above:8.3f}"
            lines.append(row)
        avg = f"average ({', '.join(f'{n}:{s.metric}' for n, s in self.scores.items())}): {self.average():.4f}"
        lines.append(avg)
        if dense is not None and dense.average(list(self.scores)) > 0:
            kept = self.above_chance_tasks(dense)
            left = [n for n in self.scores if n not in kept]
            interval = self.above_chance_interval(dense, kept) if kept else None
            lines.append(f"retention {self.retention(dense):.4f}, above-chance retention "
                         + (f"{self.above_chance_retention(dense, kept):.4f}" if kept else "undefined")
                         + (f" (95 % paired-bootstrap interval {interval[0]:.3f} to {interval[1]:.3f})" if interval else "")
                         + (f" (left out, dense within {MARGIN_Z:g} standard errors of chance: {', '.join(left)})"
                            if kept and left else ""))
            if any(s.metric == "acc_norm" for s in self.scores.values()):
                kept = self.above_chance_tasks(dense, "acc")
                interval = self.above_chance_interval(dense, kept, metric="acc") if kept else None
                lines.append("above-chance retention in plain acc on every task "
                             + (f"{self.above_chance_retention(dense, kept, metric='acc'):.4f}" if kept else "undefined")
                             + (f" (95 % paired-bootstrap interval {interval[0]:.3f} to {interval[1]:.3f})"
                                if interval else "")
                             + (f" over {', '.join(kept)}" if kept else ""))
        lines.append(f"lm-eval {self.lm_eval_version}, {self.num_fewshot}-shot, limit {self.limit}, seed {self.seed}, "
                     f"{self.seconds:.0f} s")
        return "\n".join(lines)


def _number(results: dict, key: str) -> float | None:
    value = results.get(f"{key},none")
    if value is None or isinstance(value, str):  # lm-eval writes "N/A" for missing stderrs
        return None
    return float(value)


def _chance(task_obj: Any, n: int) -> float:
    if task_obj.OUTPUT_TYPE != "multiple_choice":
        return 0.0
    docs = task_obj.eval_docs
    fracs = [1.0 / len(task_obj.doc_to_choice(docs[i])) for i in range(min(n, len(docs)))]
    return sum(fracs) / len(fracs) if fracs else 0.0


# ----------------------------------------------------------------------------- entry point

def evaluate_tasks(model: torch.nn.Module, tokenizer, tasks: list[str], limit: int | None = None,
                   batch_size: int = 1, num_fewshot: int = 0, data_dir: str | None = None,
                   device: str | None = "cpu", progress: bool = True, seed: int = DEFAULT_SEED,
                   keep_samples: bool = False) -> ZeroShotResult:
    """Zero-shot (or ``num_fewshot``-shot) accuracy of an in-memory causal LM, scored by lm-eval.

    ``tasks``: names from ``TASKS`` (``lambada`` is accepted for ``lambada_openai``).  ``limit``:
    score only the first ``limit`` items of each task (lm-eval's ``--limit``).  Documents come
    from ``<data_dir or $SLICEKIT_DATA_DIR>/zeroshot``; a task without local files is loaded by
    lm-eval from the hub unless ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set.  ``device``
    moves the model there first (``None``: leave it where it is).  Few-shot examples, when asked
    for, are drawn (seeded) from the evaluated split itself, the only split kept locally.
    ``keep_samples`` keeps lm-eval's per-item records (prompts, log-likelihoods, per-item
    scores) in ``result.samples`` for inspection; they are never part of ``as_dict()``.
    """
    if not tasks:
        raise SlicekitError("no zero-shot tasks given: use one or more of " + ", ".join(TASKS))
    if tokenizer is None:
        raise SlicekitError("zero-shot evaluation needs the model's tokenizer (none was loaded)")
    names = list(dict.fromkeys(resolve_task_name(t) for t in tasks))
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise SlicekitError(f"--limit must be a positive number of items (got {limit!r})")
    if batch_size < 1:
        raise SlicekitError(f"batch size must be ≥ 1 (got {batch_size})")
    if num_fewshot < 0:
        raise SlicekitError(f"num_fewshot must be ≥ 0 (got {num_fewshot})")

    sources: dict[str, tuple[str, list[dict] | None]] = {}
    for n in names:
        paths = local_files(n, data_dir)
        if paths is not None:
            docs = _read_docs(n, paths)
            # lm-eval scores the first `limit` documents; zero-shot, the rest are never read, so
            # leave them out (building a Task walks every document).  Few-shot examples are drawn
            # from the evaluated split, so then the whole split stays.
            sources[n] = ("local", docs[:limit] if limit is not None and num_fewshot == 0 else docs)
        elif _hub_offline():
            raise SlicekitError(_missing_message(n, data_dir))
        else:
            sources[n] = ("hub", None)

    import lm_eval
    from lm_eval.tasks import TaskManager, get_task_dict

    if device is not None:
        model.to(device)
    model.eval()
    start = time.perf_counter()
    with _quiet(progress), _preserved_rng():
        task_objs: dict[str, Any] = {}
        for n in names:
            kind, docs = sources[n]
            if kind == "local":
                task_objs[n] = build_local_task(n, docs)  # type: ignore[arg-type]
        hub = [n for n in names if sources[n][0] == "hub"]
        manager = _default_task_manager() if hub else TaskManager(include_defaults=False)
        if hub:
            try:
                if hasattr(manager, "load"):  # newer lm-eval (0.4.13) deprecates get_task_dict for this
                    task_objs.update(manager.load(hub)["tasks"])
                else:
                    task_objs.update(get_task_dict(hub, manager))
            except Exception as err:
                first = str(err).splitlines()[0][:200] if str(err) else ""
                raise SlicekitError(
                    f"zero-shot task(s) {', '.join(hub)}: no local files and lm-eval could not load them from the "
                    f"hub ({type(err).__name__}: {first}); put the files under ${DATA_DIR_ENV}/{ZEROSHOT_SUBDIR}"
                ) from err
        lm = _make_lm(model, tokenizer, batch_size, progress)
        try:
            out = lm_eval.simple_evaluate(
                model=lm, tasks=[task_objs[n] for n in names], num_fewshot=num_fewshot, limit=limit,
                # per-item records always: the outcomes that paired comparisons need come from them
                batch_size=batch_size, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True, task_manager=manager,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            )
        except AssertionError as err:  # lm-eval asserts that every continuation fits the context window
            raise SlicekitError(
                f"lm-eval rejected a request ({err or 'assertion failed'}): most likely an answer longer than the "
                f"model's context of {lm.max_length} tokens; use a model with a longer context or other tasks"
            ) from err
    seconds = time.perf_counter() - start
    if out is None:
        raise SlicekitError("lm-eval returned no results (not rank 0 of a distributed run?)")

    scores: dict[str, TaskScore] = {}
    samples = out.get("samples", {})
    for n in names:
        res = out["results"][n]
        n_items = int(out.get("n-samples", {}).get(n, {}).get("effective", 0)) or len(samples.get(n, []))
        acc = _number(res, "acc")
        if acc is None:
            raise SlicekitError(f"lm-eval reported no accuracy for {n}")
        others = [m["metric"] for m in TASKS[n].config["metric_list"] if m["metric"] not in ("acc", "acc_norm")]
        extra = {k: v for m in others for k in (m, f"{m}_stderr") if (v := _number(res, k)) is not None}
        scores[n] = TaskScore(
            task=n, acc=acc, acc_stderr=_number(res, "acc_stderr"), acc_norm=_number(res, "acc_norm"),
            acc_norm_stderr=_number(res, "acc_norm_stderr"), items=n_items, chance=_chance(task_objs[n], n_items),
            metric=primary_metric(n), source=sources[n][0], exact=sources[n][0] == "hub" or TASKS[n].exact,
            version=out.get("versions", {}).get(n), extra=extra,
            outcomes=_outcomes(samples.get(n, []), primary_metric(n), n_items),
            acc_outcomes=(_outcomes(samples.get(n, []), "acc", n_items) if primary_metric(n) == "acc_norm" else None),
        )
    return ZeroShotResult(scores=scores, lm_eval_version=_lm_eval_version(), num_fewshot=num_fewshot, limit=limit,
                          seed=seed, batch_size=batch_size, seconds=seconds,
                          samples={n: samples[n] for n in names if n in samples} if keep_samples else {})


def _outcomes(records: list[dict], metric: str, n_items: int) -> str | None:
    """The per-item 0/1 outcomes of ``metric`` from lm-eval's sample records, in document order;
    None when a record lacks it or it is not a 0/1 score."""
    if len(records) != n_items or not records:
        return None
    chars = []
    for rec in sorted(records, key=lambda r: r["doc_id"]):
        value = rec.get(metric)
        if value not in (0, 1):  # True/False and 0.0/1.0 compare equal too
            return None
        chars.append("1" if value else "0")
    return "".join(chars)
