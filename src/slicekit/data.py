"""Named datasets, local text, and the seeded calibration sampler.

Resolution order for a named dataset: the directory in ``$SLICEKIT_DATA_DIR`` (same layout as
the project's shared data folder: ``wikitext-2/wiki.test.raw`` …), then the ``datasets`` hub.
Offline with neither, the error says how to provide the data.  Any other argument is treated as a
local text file, a JSONL file (``text`` field) or a directory of those.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from slicekit.errors import SlicekitError

DATA_DIR_ENV = "SLICEKIT_DATA_DIR"


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: local file per split (relative to the data directory) and the hub source."""

    name: str
    local: dict[str, str]
    hub: tuple[str, str | None, str]  # (path, config, text field)
    hub_splits: dict[str, str] = field(default_factory=dict)  # our split name -> hub split name
    reader: str = "lines"  # how to turn a local file into rows: "lines", "blocks", "jsonl"
    eval_splits: tuple[str, ...] = ("test",)
    calibration_splits: tuple[str, ...] = ("train", "validation")
    #: splits cut from one file by row (document) range ``[start, stop)``: for corpora without
    #: official splits, so that training text never overlaps evaluation text
    row_slices: dict[str, tuple[int, int | None]] = field(default_factory=dict)

    def rows_of(self, split: str, rows: list[str]) -> list[str]:
        """``rows`` cut to ``split``'s row range (all of them for a split with its own file)."""
        if split not in self.row_slices:
            return rows
        start, stop = self.row_slices[split]
        return rows[start:stop]

    def split_note(self, split: str) -> str:
        """`` (texts a–b)`` for a split cut by row range, else empty."""
        if split not in self.row_slices:
            return ""
        start, stop = self.row_slices[split]
        return f" (texts {start + 1}–{'end' if stop is None else stop})"


DATASETS: dict[str, DatasetSpec] = {
    "wikitext2": DatasetSpec(
        "wikitext2",
        local={"test": "wikitext-2/wiki.test.raw", "validation": "wikitext-2/wiki.valid.tokens",
               "train": "wikitext-2/wiki.train.raw"},
        hub=("wikitext", "wikitext-2-raw-v1", "text"),
    ),
    "ptb": DatasetSpec(
        "ptb",
        local={"test": "ptb/ptb.test.txt", "validation": "ptb/ptb.valid.txt", "train": "ptb/ptb.train.txt"},
        hub=("ptb_text_only", "penn_treebank", "sentence"),
    ),
    "c4": DatasetSpec(
        "c4",
        local={"validation": "c4/c4-validation.jsonl", "train": "c4/c4-train.jsonl"},
        hub=("allenai/c4", "en", "text"),
        reader="jsonl",
        eval_splits=("validation",),
        calibration_splits=("train",),
    ),
    "alpaca": DatasetSpec(
        "alpaca",
        local={"train": "alpaca/alpaca.jsonl"},
        hub=("tatsu-lab/alpaca", None, "text"),
        reader="jsonl",
        eval_splits=(),
        calibration_splits=("train",),
    ),
    "brown": DatasetSpec(
        "brown",
        local={"test": "brown/brown.txt", "train": "brown/brown.txt"},
        hub=("nltk/brown", None, "text"),
        reader="blocks",
        # Brown has no official splits: it serves as an out-of-domain evaluation corpus, and as
        # calibration and recovery text.  The first 50 of its 500 texts (~10 %, ~130k SmolLM2
        # tokens: 63 windows of 2048) are the test split, the other 450 the train split, so a model
        # recovered on Brown can still be evaluated on Brown it has not seen.
        eval_splits=("test",),
        calibration_splits=("train",),
        row_slices={"test": (0, 50), "train": (50, None)},
    ),
}


def data_dir() -> str | None:
    value = os.environ.get(DATA_DIR_ENV)
    return value if value else None


def _read_lines(path: str) -> list[str]:
    """Rows as the Hugging Face wikitext loader yields them: one per line, newline kept,
    whitespace-only lines as empty strings (universal newlines: the raw files use CRLF)."""
    with open(path, encoding="utf-8") as fh:
        return [line if line.strip() else "" for line in fh]


def _read_blocks(path: str) -> list[str]:
    """Documents separated by blank lines (Brown: one text per block, a sentence per line)."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return [b.strip("\n") for b in text.split("\n\n") if b.strip()]


def _read_jsonl(path: str) -> list[str]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise SlicekitError(f"{path}:{lineno} is not valid JSON ({err.msg})") from err
            if isinstance(obj, str):
                rows.append(obj)
            elif isinstance(obj, dict):
                text = obj.get("text")
                if text is None:  # alpaca-style records without a text field
                    text = "\n".join(str(obj[k]) for k in ("instruction", "input", "output") if obj.get(k))
                if not isinstance(text, str):
                    raise SlicekitError(f"{os.path.basename(path)}:{lineno}: the 'text' field is a "
                                        f"{type(text).__name__}, not a string; each line must be "
                                        '{"text": "..."}')
                if not text:
                    raise SlicekitError(f"{path}:{lineno} has no 'text' field")
                rows.append(text)
            else:
                raise SlicekitError(f"{path}:{lineno}: expected a JSON object with a 'text' field")
    return rows


_READERS = {"lines": _read_lines, "blocks": _read_blocks, "jsonl": _read_jsonl}


def _read_path(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, f) for root, _, names in os.walk(path) for f in names
            if f.endswith((".txt", ".raw", ".tokens", ".jsonl", ".json"))
        )
        if not files:
            raise SlicekitError(f"directory {path} has no .txt/.jsonl files")
        rows: list[str] = []
        for f in files:
            rows.extend(_read_path(f))
        return rows
    if path.endswith((".jsonl", ".json")):
        return _read_jsonl(path)
    return _read_blocks(path)


@dataclass
class TextSource:
    """Rows of text and where they came from (for reports)."""

    rows: list[str]
    description: str

    def joined(self) -> str:
        """The standard protocol: documents joined by a blank line."""
        return "\n\n".join(self.rows)


def load_text(name_or_path: str, split: str | None = None, *, purpose: str = "eval") -> TextSource:
    """Rows of a named dataset split or a local path.

    ``purpose`` is ``"eval"`` or ``"calibration"``: calibration never reads an evaluation split
    (when no split is given it takes the first available of the dataset's calibration splits).
    """
    if name_or_path in DATASETS:
        return _load_named(DATASETS[name_or_path], split, purpose)
    if os.path.exists(name_or_path):
        rows = _read_path(name_or_path)
        return TextSource(rows, f"local {name_or_path}")
    if os.sep in name_or_path or name_or_path.endswith((".txt", ".jsonl", ".json", ".raw")):
        raise SlicekitError(f"dataset file not found: {name_or_path}")
    raise SlicekitError(
        f"unknown dataset {name_or_path!r}: use one of {', '.join(sorted(DATASETS))} or a path to a text/JSONL file or directory"
    )


def _load_named(spec: DatasetSpec, split: str | None, purpose: str) -> TextSource:
    if purpose == "calibration":
        candidates = [split] if split else list(spec.calibration_splits)
        bad = [s for s in candidates if s in spec.eval_splits]
        if bad:
            raise SlicekitError(f"refusing to calibrate on {spec.name} split {bad[0]!r}: it is an evaluation split")
    else:
        candidates = [split] if split else list(spec.eval_splits)
        if not candidates:
            raise SlicekitError(f"{spec.name} has no evaluation split; give --split explicitly")
    root = data_dir()
    if root:
        for s in candidates:
            rel = spec.local.get(s)
            if rel and os.path.isfile(os.path.join(root, rel)):
                path = os.path.join(root, rel)
                return TextSource(spec.rows_of(s, _READERS[spec.reader](path)),
                                  f"{spec.name}/{s}{spec.split_note(s)} from {path}")
    errors = []
    for s in candidates:
        try:
            return _load_hub(spec, s)
        except Exception as err:
            errors.append(f"{s}: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")
    where = f"{DATA_DIR_ENV}={root}" if root else f"{DATA_DIR_ENV} is not set"
    wanted = " or ".join(spec.local[s] for s in candidates if s in spec.local) or "(no local layout)"
    raise SlicekitError(
        f"cannot load {spec.name} ({'/'.join(candidates)}): {where} and the datasets hub failed "
        f"({'; '.join(errors)[:300]}). Put {wanted} under a directory and set {DATA_DIR_ENV} to it."
    )


def _load_hub(spec: DatasetSpec, split: str) -> TextSource:
    import datasets

    path, config, text_field = spec.hub
    hub_split = spec.hub_splits.get(split, split)
    ds = datasets.load_dataset(path, config, split=hub_split)
    return TextSource(spec.rows_of(split, list(ds[text_field])),
                      f"{spec.name}/{split}{spec.split_note(split)} from the hub ({path})")


# ---------------------------------------------------------------- calibration sampling

@dataclass
class CalibrationSet:
    """``input_ids`` of shape (N, L) and a description of how they were drawn."""

    input_ids: torch.Tensor
    description: str

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        return list(torch.split(self.input_ids, batch_size))


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """One long token stream (no special tokens added between documents)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    return ids


def sample_calibration(tokenizer, source: TextSource, nsamples: int, seqlen: int, seed: int = 42,
                       strategy: str = "documents") -> CalibrationSet:
    """``nsamples`` sequences of exactly ``seqlen`` tokens, drawn reproducibly from ``seed``.

    ``strategy="documents"`` (default, the SliceGPT reference's scheme): draw a random position
    in the list of not-yet-used non-empty rows, concatenate rows from there (joined by a blank
    line) until ``seqlen`` tokens are reached, remove the used rows, repeat; a run that reaches
    the end of the list short of ``seqlen`` tokens is discarded.  Samples therefore start at row
    boundaries and never reuse text.  ``strategy="windows"``: random offsets in the joined token
    stream (GPTQ style; windows may overlap).

    Refuses to run on too little text: ``documents`` when it cannot build ``nsamples`` samples
    without reusing text; ``windows`` when the text has fewer than ``seqlen + 1`` tokens or so
    few that a token would appear in more than four samples on average.
    """
    if nsamples < 1 or seqlen < 2:
        raise SlicekitError(f"calibration needs nsamples ≥ 1 and seqlen ≥ 2 (got {nsamples} × {seqlen})")
    if strategy == "windows":
        ids = tokenize_text(tokenizer, source.joined())
        need = max(seqlen + 1, math.ceil(nsamples * seqlen / 4))
        if ids.numel() < need:
            raise SlicekitError(
                f"too little calibration text: {source.description} has {ids.numel()} tokens, "
                f"{nsamples} samples × {seqlen} tokens need at least {need}"
            )
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
        windows = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    elif strategy == "documents":
        windows = _document_samples(tokenizer, [r for r in source.rows if r], nsamples, seqlen, seed, source.description)
    else:
        raise SlicekitError(f"unknown calibration sampling strategy {strategy!r} (documents, windows)")
    return CalibrationSet(windows, f"{nsamples} × {seqlen} tokens from {source.description}, seed {seed}, {strategy}")


def _document_samples(tokenizer, rows: list[str], nsamples: int, seqlen: int, seed: int, desc: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    remaining = list(range(len(rows)))
    samples: list[list[int]] = []
    while len(samples) < nsamples and remaining:
        start = int(torch.randint(0, len(remaining), (1,), generator=gen).item())
        idx, ids = start, []
        while len(ids) < seqlen and idx < len(remaining):
            sep = "\n\n" if ids else ""
            ids += tokenizer(sep + rows[remaining[idx]], add_special_tokens=False).input_ids
            idx += 1
        remaining = remaining[:start] + remaining[idx:]
        if len(ids) >= seqlen:
            samples.append(ids[:seqlen])
    if len(samples) < nsamples:
        raise SlicekitError(
            f"too little calibration text: {desc} yields only {len(samples)} samples of {seqlen} tokens "
            f"without reusing text, {nsamples} requested"
        )
    return torch.tensor(samples, dtype=torch.long)
