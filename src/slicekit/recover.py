"""Recovery training of a compressed model: LoRA or full fine-tuning, distilled from the dense model.

Compression leaves a model that is smaller but noticeably worse; a short training run on generic
text recovers much of the loss (SliceGPT's "RFT", LLM-Pruner, Minitron).  :func:`recover` trains
the compressed model *in place* and leaves it with exactly the compressed shape, so the saver, the
loader and the parameter counter see the same model as before:

- ``mode="lora"`` (default) puts ``peft`` LoRA adapters on every linear inside the decoder layers
  and trains SliceGPT's shortcut matrices (``attn_shortcut``/``mlp_shortcut``, small square or
  rectangular matrices) fully; the adapters are merged (``merge_and_unload``) at the end, and the
  parameter names and shapes are checked to be those of the input.  ``mode="full"`` trains every
  weight except the token/position embeddings (``train_embeddings`` includes them).
- The loss is ``kd_alpha · T² · KL(teacher ‖ student) + (1 − kd_alpha) · CE`` with the dense
  model as teacher (``loss="distill"``, the default when a teacher is given), or plain next-token
  cross-entropy (``loss="ce"``).  ``hidden_distill`` adds a relative MSE between the student's and
  the teacher's decoder-layer outputs, for models whose residual stream is still in the original
  basis (FASP, MoDeGPT; not SliceGPT, whose stream is rotated).
- The data stream is one tokenisation of the recovery text (resolved like calibration data, so an
  evaluation split is refused), cut into ``seqlen`` windows: every epoch a seeded offset and a
  seeded permutation of the windows, so a sample index alone determines a window and a resumed run
  sees exactly the data an uninterrupted one would.  ``dataset="teacher"`` samples that text from
  the teacher instead (:func:`sample_teacher_text`; kept in ``resume_dir`` for a resumed run).
- With ``resume_dir``, every ``checkpoint_every`` optimizer steps (and at the end) the trainable
  weights, the optimizer state, the schedule position, the RNG states and the loss curve are
  written atomically (temporary directory, then rename) as safetensors + JSON; rerunning with the
  same settings continues from the newest checkpoint and ends with the same weights as an
  uninterrupted run.  Ctrl-C stops at the next step boundary after writing a checkpoint.

Teacher logits (``teacher_cache``):

- ``"none"`` (default): the teacher runs on every micro-batch; exact full-vocabulary KL.  Needs
  teacher and student in memory together (the cheapest choice when they fit).
- ``"memory"`` / ``"disk"``: before training, one teacher pass stores the top ``kd_topk``
  log-probabilities (at temperature ``kd_temperature``) and their token ids for every training
  position, in RAM or as one safetensors file per optimizer step (``cache_dir``, else
  ``resume_dir/teacher-topk``, else a temporary directory removed afterwards).  The teacher is then
  released (pass it as a zero-argument callable so it is loaded only when the cache is incomplete
  and dropped before training).  The KL is computed on the ``k + 1``-bucket coarsening of both
  distributions (the ``k`` teacher tokens and "everything else"), a lower bound of the full KL that
  is exact when the tail mass is zero.  The disk cache is keyed by teacher, data and settings, and
  survives an interruption (a resumed run reuses the files).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from slicekit.arch import get_arch, is_linear
from slicekit.data import DATA_DIR_ENV, DATASETS, data_dir, load_text, tokenize_text
from slicekit.errors import SlicekitError
from slicekit.profiling import Measurement, measure

MODES = ("lora", "full")
PRECISIONS = ("auto", "fp32", "bf16")
LOSSES = ("distill", "ce")
TEACHER_CACHES = ("none", "memory", "disk")
#: ``RecoverConfig.dataset`` value that samples the recovery text from the teacher itself
TEACHER_TEXT = "teacher"
SHORTCUT_NAMES = ("attn_shortcut", "mlp_shortcut")
CHECKPOINT_FORMAT = 1
# Settings that may change between an interrupted run and its resumption (they do not change the
# trained weights).
_RESUMABLE_CHANGES = ("checkpoint_every", "teacher_cache")


@dataclass
class RecoverConfig:
    """Recovery-training settings, validated on construction.

    Data: ``dataset`` is a named dataset or a local text/JSONL path, read like calibration data
    (``split`` defaults to the dataset's calibration split; evaluation splits are refused);
    ``seqlen`` tokens per window; ``dataset="teacher"`` samples the text from the teacher instead
    (data-free distillation, as LLM-QAT does: ``sample_tokens`` tokens, default ``tokens``, in
    samples of ``sample_length`` tokens started from the BOS token, ``sample_batch_size`` at a time,
    at temperature ``sample_temperature`` with nucleus ``sample_top_p``; the sampling time counts
    in the report's ``sample_seconds``).  ``tokens`` is the training budget (rounded up to whole optimizer
    steps of ``batch_size × grad_accum × seqlen`` tokens).  At a short budget the number of optimizer
    steps limits what is recovered: on SmolLM2-135M with FASP at 25 %, 65,536 tokens closed 36 % of
    the WikiText-2 gap in steps of 4 × 512 tokens, 38 % in 2 × 512, 39 % in 1 × 512 and 41 % in
    1 × 256; over 30 minutes on 2 CPU cores 1 × 256 ran 77.8 tokens/s against 77.7 for 4 × 512.
    The defaults (4 × 512) suit devices that need larger batches to be busy; on a CPU prefer ``batch_size=1, seqlen=256``.

    Optimisation: AdamW with ``lr`` (default 2e-4 for LoRA, 2e-5 for full fine-tuning), linear
    warm-up over the first ``warmup`` fraction of the steps then cosine decay to zero,
    ``weight_decay`` on LoRA matrices (full mode: on weight matrices; never on biases, norms or
    shortcut matrices, which are not meant to shrink), gradient clipping at ``max_grad_norm``.

    ``mode``: ``"lora"`` (rank ``lora_r``, scale ``lora_alpha / lora_r``, ``lora_dropout``) or
    ``"full"`` (``train_embeddings`` also trains the token/position tables, and a head tied to
    them).  ``loss``: ``"distill"`` or ``"ce"``; ``None`` picks distill when a teacher is given.
    ``kd_temperature`` T and ``kd_alpha`` (weight of the KL term, ``1 − kd_alpha`` on the CE),
    ``kd_topk`` (teacher tokens kept by the logit cache), ``hidden_distill`` (weight of the
    hidden-state term, 0 = off).  ``teacher_cache``: ``"none"`` | ``"memory"`` | ``"disk"`` (see
    the module docstring).  ``gradient_checkpointing`` trades compute for activation memory.
    ``precision``: ``"bf16"`` runs the student's and the teacher's forward and backward passes
    under bfloat16 autocast (weights, optimizer state and losses stay float32, so the merged
    output has the input's dtype); ``"fp32"`` does not; ``"auto"`` (default) picks bf16 where the
    hardware multiplies bf16 natively (CUDA with bf16 support; x86 CPUs with AVX512-BF16 or AMX),
    which on a 2-core EPYC more than doubles matrix throughput — recovery is compute-bound, so that
    is the budget's largest lever.
    ``checkpoint_every``: optimizer steps between resumable checkpoints (0 = only at the end;
    checkpoints are written only when ``resume_dir`` is given).
    """

    VERSION: ClassVar[int] = 1

    dataset: str = "brown"
    split: str | None = None
    seqlen: int = 512
    tokens: int = 500_000
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None
    warmup: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    mode: Literal["lora", "full"] = "lora"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    train_embeddings: bool = False
    loss: Literal["distill", "ce"] | None = None
    kd_temperature: float = 1.0
    kd_alpha: float = 1.0
    kd_topk: int = 64
    hidden_distill: float = 0.0
    teacher_cache: Literal["none", "memory", "disk"] = "none"
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 42
    checkpoint_every: int = 100
    sample_tokens: int | None = None
    sample_length: int = 256
    sample_batch_size: int = 64
    sample_temperature: float = 1.0
    sample_top_p: float = 0.95

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise SlicekitError("dataset must be a dataset name or a path to text (got an empty value)")
        if self.seqlen < 2:
            raise SlicekitError(f"seqlen must be ≥ 2 (got {self.seqlen})")
        if self.tokens < 1:
            raise SlicekitError(f"tokens (the training budget) must be ≥ 1 (got {self.tokens})")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise SlicekitError(f"batch_size and grad_accum must be ≥ 1 (got {self.batch_size}, {self.grad_accum})")
        if self.mode not in MODES:
            raise SlicekitError(f"mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        if self.train_embeddings and self.mode != "full":
            raise SlicekitError("train_embeddings trains the token table in full fine-tuning; LoRA adapts only the "
                                "linears and would ignore it: use mode='full', or leave train_embeddings off")
        if self.lr is None:
            self.lr = 2e-4 if self.mode == "lora" else 2e-5
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SlicekitError(f"lr must be a positive number (got {self.lr})")
        if not 0.0 <= self.warmup < 1.0:
            raise SlicekitError(f"warmup is a fraction of the steps in [0, 1) (got {self.warmup})")
        if self.weight_decay < 0:
            raise SlicekitError(f"weight_decay must be ≥ 0 (got {self.weight_decay})")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise SlicekitError(f"max_grad_norm must be > 0 or None (got {self.max_grad_norm})")
        if self.lora_r < 1:
            raise SlicekitError(f"lora_r must be ≥ 1 (got {self.lora_r})")
        if not self.lora_alpha > 0:
            raise SlicekitError(f"lora_alpha must be > 0 (got {self.lora_alpha})")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise SlicekitError(f"lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.loss is not None and self.loss not in LOSSES:
            raise SlicekitError(f"loss must be one of {', '.join(LOSSES)} (got {self.loss!r})")
        if not self.kd_temperature > 0:
            raise SlicekitError(f"kd_temperature must be > 0 (got {self.kd_temperature})")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise SlicekitError(f"kd_alpha must be in [0, 1] (got {self.kd_alpha})")
        if self.kd_topk < 1:
            raise SlicekitError(f"kd_topk must be ≥ 1 (got {self.kd_topk})")
        if self.hidden_distill < 0:
            raise SlicekitError(f"hidden_distill must be ≥ 0 (got {self.hidden_distill})")
        if self.teacher_cache not in TEACHER_CACHES:
            raise SlicekitError(f"teacher_cache must be one of {', '.join(TEACHER_CACHES)} (got {self.teacher_cache!r})")
        if self.hidden_distill > 0 and self.teacher_cache != "none":
            raise SlicekitError("hidden_distill needs the teacher's hidden states on the fly: use teacher_cache='none'")
        if self.precision not in PRECISIONS:
            raise SlicekitError(f"precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.seed < 0:
            raise SlicekitError(f"seed must be ≥ 0 (got {self.seed})")
        if self.checkpoint_every < 0:
            raise SlicekitError(f"checkpoint_every must be ≥ 0 (got {self.checkpoint_every})")
        if self.sample_tokens is not None and self.sample_tokens < 1:
            raise SlicekitError(f"sample_tokens must be ≥ 1 (got {self.sample_tokens})")
        if self.sample_length < 1 or self.sample_batch_size < 1:
            raise SlicekitError(f"sample_length and sample_batch_size must be ≥ 1 "
                                f"(got {self.sample_length}, {self.sample_batch_size})")
        if not (math.isfinite(self.sample_temperature) and self.sample_temperature > 0):
            raise SlicekitError(f"sample_temperature must be > 0 (got {self.sample_temperature})")
        if not 0.0 < self.sample_top_p <= 1.0:
            raise SlicekitError(f"sample_top_p must be in (0, 1] (got {self.sample_top_p})")
        if self.dataset == TEACHER_TEXT and (self.sample_tokens or self.tokens) < 2 * self.seqlen:
            raise SlicekitError(f"too little recovery text: sampling {self.sample_tokens or self.tokens} tokens gives "
                                f"less than two windows of {self.seqlen}: raise sample_tokens (or tokens)")
        if self.dataset == TEACHER_TEXT and self.loss == "ce":
            raise SlicekitError("dataset='teacher' samples the text from the teacher, and loss='ce' runs without one: "
                                "use loss='distill' (or another dataset)")

    @property
    def teacher_text(self) -> bool:
        """Whether the recovery text is sampled from the teacher (``dataset="teacher"``)."""
        return self.dataset == TEACHER_TEXT

    @property
    def tokens_per_step(self) -> int:
        return self.seqlen * self.batch_size * self.grad_accum

    @property
    def total_steps(self) -> int:
        return math.ceil(self.tokens / self.tokens_per_step)


@dataclass
class StepInfo:
    """What a ``callback`` sees after every optimizer step (``step`` counts completed steps)."""

    step: int
    total_steps: int
    loss: float
    lr: float
    tokens: int


@dataclass
class RecoverReport:
    """What a recovery run did: settings, data, budget, loss curve and timing.

    ``loss_curve`` has one entry per optimizer step (over the whole run, resumed parts included):
    ``step``, ``loss`` and its parts ``kl``/``ce``/``hidden`` (mean over the step's micro-batches),
    ``lr``.  ``seconds`` and ``tokens_per_s`` cover the training steps of this invocation (not the
    tokenisation, teacher caching, sampling or merge: those are in ``setup_seconds``,
    ``teacher_seconds``, ``sample_seconds`` — a budget for ``dataset="teacher"`` counts both);
    ``measurement`` the whole call.  ``interrupted``: stopped early (callback or Ctrl-C) — the
    model then holds the partially trained weights and a rerun with the same ``resume_dir`` continues.
    """

    settings: dict[str, Any]
    loss: str
    data: str
    teacher: str | None
    steps: int
    total_steps: int
    tokens: int
    tokens_budget: int
    epochs: float
    trainable_params: int
    loss_curve: list[dict[str, float]]
    seconds: float
    tokens_per_s: float
    setup_seconds: float
    teacher_seconds: float
    gradient_checkpointing: str
    resumed_from: int | None
    interrupted: bool
    precision: str = "fp32"
    sample_seconds: float = 0.0
    measurement: Measurement = field(default_factory=Measurement)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["measurement"] = self.measurement.as_dict()
        return out

    def summary(self) -> dict[str, Any]:
        """The fields a model card records (no curve)."""
        first = self.loss_curve[0]["loss"] if self.loss_curve else None
        last = self.loss_curve[-1]["loss"] if self.loss_curve else None
        out = {"data": self.data, "mode": self.settings["mode"], "loss": self.loss, "teacher": self.teacher,
                "tokens": self.tokens, "steps": self.steps, "seqlen": self.settings["seqlen"],
                "lr": self.settings["lr"], "seed": self.settings["seed"], "first_loss": first,
                "last_loss": last, "train_seconds": round(self.seconds, 1),
                "tokens_per_s": round(self.tokens_per_s, 1), "precision": self.precision,
                "interrupted": self.interrupted}
        if self.settings.get("dataset") == TEACHER_TEXT:
            # milliseconds: a short sampling run on a fast machine takes under 0.05 s and must not read as none
            out["sample_seconds"] = round(self.sample_seconds, 3)
        if self.settings.get("train_embeddings"):
            out["train_embeddings"] = True  # the card says the token table (and a tied head) changed too
        return out


# ---------------------------------------------------------------- data

class TokenStream:
    """Seeded ``seqlen`` windows of one token stream, addressable by sample index.

    Epoch ``e`` starts the window grid at a seeded offset in ``[0, seqlen)`` and visits its ``n``
    windows in a seeded permutation; sample ``k`` is window ``perm_e[k mod n]`` of epoch
    ``k div n``.  Nothing depends on what was drawn before, which is what makes resumption exact.
    """

    def __init__(self, ids: torch.Tensor, seqlen: int, seed: int, description: str) -> None:
        self.ids = ids
        self.seqlen = seqlen
        self.seed = seed
        self.description = description
        # n windows after any offset < seqlen still end inside the stream.
        self.windows_per_epoch = (ids.numel() - seqlen) // seqlen
        if self.windows_per_epoch < 1:
            raise SlicekitError(f"too little recovery text: {description} has {ids.numel()} tokens, "
                                f"at least {2 * seqlen} are needed for windows of {seqlen}")
        self._epoch: tuple[int, int, torch.Tensor] | None = None

    def _epoch_order(self, epoch: int) -> tuple[int, torch.Tensor]:
        if self._epoch is None or self._epoch[0] != epoch:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            offset = int(torch.randint(0, self.seqlen, (1,), generator=gen).item())
            self._epoch = (epoch, offset, torch.randperm(self.windows_per_epoch, generator=gen))
        return self._epoch[1], self._epoch[2]

    def window(self, k: int) -> torch.Tensor:
        offset, perm = self._epoch_order(k // self.windows_per_epoch)
        start = offset + int(perm[k % self.windows_per_epoch]) * self.seqlen
        return self.ids[start : start + self.seqlen]

    def batch(self, first: int, count: int) -> torch.Tensor:
        return torch.stack([self.window(k) for k in range(first, first + count)])

    def fingerprint(self) -> str:
        return hashlib.sha256(self.ids.numpy().tobytes()).hexdigest()[:16]


def _refuse_evaluation_file(path: str) -> None:
    """A local path that *is* a named dataset's evaluation file (WikiText-2 test …) is refused,
    as the named split would be: recovery text must not overlap evaluation text."""
    root = data_dir()
    if not root or not os.path.exists(path):
        return
    real = os.path.realpath(path)
    for spec in DATASETS.values():
        cal_files = {os.path.realpath(os.path.join(root, spec.local[s])) for s in spec.calibration_splits if s in spec.local}
        for split in spec.eval_splits:
            rel = spec.local.get(split)
            if rel and os.path.realpath(os.path.join(root, rel)) == real and real not in cal_files:
                raise SlicekitError(f"refusing to train on {path}: it is the {spec.name} {split!r} evaluation split")


def _start_token(tokenizer: Any) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise SlicekitError("dataset='teacher' starts every sample at the tokenizer's BOS (or EOS) token, and this "
                        "tokenizer has neither: recover on a text dataset instead")


def sample_teacher_text(teacher: nn.Module, tokenizer: Any, config: RecoverConfig,
                        progress: bool = False) -> torch.Tensor:
    """Sample ``config.sample_tokens`` (default ``config.tokens``) tokens of text from ``teacher``.

    Why: distilling on the teacher's own samples matches the student to the teacher where the
    teacher puts its probability mass, with no dataset at all (LLM-QAT's data-free distillation);
    a fixed corpus such as Brown covers one register of English.  Every sample starts at the BOS
    token (EOS where there is none) and runs ``sample_length`` new tokens (end-of-text is
    suppressed, so no padding is needed); samples are joined BOS-separated into one stream, which
    :class:`TokenStream` cuts into windows like any other text.  Batch ``b`` is drawn under seed
    ``(seed, b)`` in a forked RNG, so the text depends on the seed and the sampling settings alone
    (not on what ran before in the process) and the caller's RNG is untouched.
    """
    start = _start_token(tokenizer)
    want = config.sample_tokens or config.tokens
    per_sample = config.sample_length + 1
    n_samples = max(1, math.ceil(want / per_sample))
    device = next(teacher.parameters()).device
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else start
    rows: list[torch.Tensor] = []
    batches = math.ceil(n_samples / config.sample_batch_size)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        for b in tqdm(range(batches), desc="sampling recovery text", disable=not progress, leave=False):
            torch.manual_seed((config.seed * 1_000_003 + b) % (2**63))
            count = min(config.sample_batch_size, n_samples - b * config.sample_batch_size)
            prompt = torch.full((count, 1), start, dtype=torch.long, device=device)
            # Every processor a checkpoint's generation_config may switch on (Qwen's repetition
            # penalty, top-k 20 …) is set to "off" here, so the samples follow the teacher's own
            # distribution, changed only by this config's temperature and top-p.
            out = teacher.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                   temperature=config.sample_temperature, top_p=config.sample_top_p, top_k=0,
                                   min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                                   repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1,
                                   max_new_tokens=config.sample_length, min_new_tokens=config.sample_length,
                                   pad_token_id=pad, use_cache=True)
            rows.append(out[:, : per_sample].cpu())
    return torch.cat(rows).reshape(-1)


def _teacher_text_stream(teacher: nn.Module, teacher_fp: str, tokenizer: Any, config: RecoverConfig,
                         resume_dir: str | None, progress: bool) -> tuple[TokenStream, float]:
    """The sampled recovery text as a stream, and the seconds spent sampling it.  With
    ``resume_dir`` the text is kept there (``teacher-text.safetensors``, written atomically, keyed
    by the sampling settings and the teacher) and a resumed run reads it back instead of sampling
    again: the same tokens, without the cost."""
    from safetensors import safe_open

    key = hashlib.sha256(json.dumps({k: getattr(config, k) for k in (*_SAMPLE_FIELDS, "tokens", "seed")}
                                    | {"teacher": teacher_fp}, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(resume_dir, "teacher-text.safetensors") if resume_dir else None
    if path and os.path.exists(path):
        try:
            with safe_open(path, framework="pt") as fh:
                ids = fh.get_tensor("ids") if (fh.metadata() or {}).get("key") == key else None
        except Exception as exc:  # any unreadable file is sampled again
            warnings.warn(f"{path} is unreadable ({exc}); sampling the recovery text again", stacklevel=3)
            ids = None
        if ids is not None:
            return TokenStream(ids, config.seqlen, config.seed, _sampled_description(config, ids)), 0.0
    t0 = time.perf_counter()
    ids = sample_teacher_text(teacher, tokenizer, config, progress)
    seconds = time.perf_counter() - t0
    if path:
        os.makedirs(resume_dir, exist_ok=True)
        _save_tensors_atomic(path, {"ids": ids.contiguous()}, metadata={"key": key})
    return TokenStream(ids, config.seqlen, config.seed, _sampled_description(config, ids)), seconds


def _sampled_description(config: RecoverConfig, ids: torch.Tensor) -> str:
    return (f"{ids.numel():,} tokens sampled from the teacher (samples of {config.sample_length} tokens from BOS, "
            f"temperature {config.sample_temperature:g}, top-p {config.sample_top_p:g}, seed {config.seed})")


def recovery_stream(tokenizer: Any, config: RecoverConfig) -> TokenStream:
    """Tokenise the recovery text once (see :class:`TokenStream`)."""
    if config.teacher_text:
        raise SlicekitError("dataset='teacher' is sampled from the teacher during recover(); there is no file to read")
    if config.dataset not in DATASETS:
        _refuse_evaluation_file(config.dataset)
    source = load_text(config.dataset, config.split, purpose="calibration")
    ids = tokenize_text(tokenizer, source.joined())
    description = source.description
    root = data_dir()
    if root:  # reports and model cards carry no machine paths
        description = description.replace(os.path.abspath(root).rstrip(os.sep), f"${DATA_DIR_ENV}")
        description = description.replace(root.rstrip(os.sep), f"${DATA_DIR_ENV}")
    return TokenStream(ids, config.seqlen, config.seed, description)


# ---------------------------------------------------------------- trainable setup

def _param_shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict().items()}


def _fingerprint(model: nn.Module) -> str:
    """Names, shapes and (rounded) sums of every parameter: tells a resumed run whether it got the
    same starting model."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}{p.dtype}{p.detach().double().sum().item():.9g}".encode())
    return h.hexdigest()[:16]


def _lora_targets(model: nn.Module) -> list[str]:
    """Every non-empty linear inside the decoder layers (LM head and embeddings stay frozen)."""
    spec = get_arch(model.config)
    prefix = spec.layers
    return [f"{prefix}.{name}" for name, mod in spec.layer_list(model).named_modules()
            if is_linear(mod) and mod.weight.numel() > 0]


def _shortcut_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in SHORTCUT_NAMES]


class _Trainable:
    """Puts the model into its training configuration and takes it out again.

    LoRA mode injects peft adapters in place (the model object stays the caller's) and marks the
    shortcut matrices trainable; ``finish`` merges the adapters and restores every parameter's
    ``requires_grad`` flag.
    """

    def __init__(self, model: nn.Module, config: RecoverConfig) -> None:
        self.model = model
        self.config = config
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.peft_model: Any = None
        if config.mode == "lora":
            import peft

            targets = _lora_targets(model)
            if not targets:
                raise SlicekitError("the model has no linear layers in its decoder layers to put LoRA adapters on")
            from transformers.pytorch_utils import Conv1D

            conv = any(isinstance(model.get_submodule(t), Conv1D) for t in targets)
            lcfg = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                   target_modules=targets, bias="none", fan_in_fan_out=conv)
            with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
                warnings.simplefilter("ignore", FutureWarning)
                self.peft_model = peft.get_peft_model(model, lcfg)
            for _, p in _shortcut_params(model):
                p.requires_grad_(True)
        else:
            spec = get_arch(model.config)
            frozen = set()
            if not config.train_embeddings:
                frozen = {id(p) for m in spec.embeddings(model) for p in m.parameters()}
            for p in model.parameters():
                p.requires_grad_(id(p) not in frozen)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def param_groups(self) -> list[dict[str, Any]]:
        """Weight decay only where shrinking is meant: LoRA matrices, or weight matrices in full mode."""
        decay, plain = [], []
        for n, p in self.named:
            leaf = n.rsplit(".", 1)[-1]
            if self.config.mode == "lora":
                wants = ".lora_" in n
            else:
                wants = p.ndim >= 2 and leaf not in SHORTCUT_NAMES
            (decay if wants else plain).append((n, p))
        groups = []
        for members, wd in ((decay, self.config.weight_decay), (plain, 0.0)):
            if members:
                groups.append({"names": [n for n, _ in members], "params": [p for _, p in members], "weight_decay": wd})
        return groups

    def finish(self, merge: bool) -> None:
        if self.peft_model is not None:
            out = self.peft_model.merge_and_unload() if merge else self.peft_model.unload()
            if out is not self.model:  # peft injects in place; anything else would lose the caller's object
                raise RuntimeError("peft returned a different model object from merge_and_unload")
            self.peft_model = None
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.flags.get(n, True))


@contextmanager
def _gradient_checkpointing(model: nn.Module, enabled: bool) -> Iterator[str]:
    """Activation checkpointing of every decoder layer, through transformers' own mechanism
    (its ``GradientCheckpointingLayer``s); layers that are not such a subclass (slicekit blocks
    from before that refactor) get the same non-reentrant ``torch.utils.checkpoint`` wrapper here.
    Yields a description: ``off``, ``transformers`` or ``transformers+N wrapped``/``wrapped``."""
    if not enabled:
        yield "off"
        return
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    kwargs = {"use_reentrant": False}
    hf = False
    had_input_hook = hasattr(model, "_require_grads_hook")
    enable = getattr(model, "activation_checkpointing_enable", None)
    try:
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        hf = True
    except ValueError:  # the model class does not support it: wrap every layer ourselves
        pass
    layers = get_arch(model.config).layer_list(model)
    wrapped = []
    for layer in layers:
        if hf and isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing:
            continue
        original = layer.forward

        def forward(*args: Any, _f: Callable = original, **kw: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_f, *args, use_reentrant=False, **kw)
            return _f(*args, **kw)

        layer.forward = forward
        wrapped.append(layer)
    try:
        if not hf:
            yield "wrapped"
        else:
            yield "transformers" + (f"+{len(wrapped)} wrapped" if wrapped else "")
    finally:
        for layer in wrapped:
            del layer.forward
        if hf:
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
            # transformers leaves the hook that makes embedding outputs require grad (added for
            # frozen embeddings) in place unless peft was loaded through it: remove ours.
            if not had_input_hook and hasattr(model, "_require_grads_hook"):
                model.disable_input_require_grads()


# ---------------------------------------------------------------- precision

def _cpu_has_bf16() -> bool:
    """Whether this x86 CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); elsewhere bf16
    autocast is emulated and slower than float32."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` made concrete for ``device`` (see :class:`RecoverConfig`)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if _cpu_has_bf16() else "fp32"
    return "fp32"


def _autocast(precision: str, device: torch.device) -> Any:
    """bf16 autocast on ``device`` for ``precision == "bf16"``; a no-op context otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- losses

def _kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """``T² · KL(p_teacher ‖ p_student)`` at temperature T, mean over positions."""
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (p.exp() * (p - s)).sum(-1).mean() * (t * t)


def _kl_topk(student_logits: torch.Tensor, index: torch.Tensor, logp: torch.Tensor, t: float) -> torch.Tensor:
    """KL between the ``k + 1``-bucket coarsenings (the teacher's top-k tokens, and the rest)."""
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    s_k = s.gather(-1, index.long())
    p_k = logp.exp()
    kl = (p_k * (logp - s_k)).sum(-1)
    tail_p = (1.0 - p_k.sum(-1)).clamp_min(0.0)
    tail_q = (1.0 - s_k.exp().sum(-1)).clamp_min(1e-12)
    kl = kl + torch.where(tail_p > 0, tail_p * (tail_p.clamp_min(1e-12).log() - tail_q.log()), torch.zeros_like(kl))
    return kl.mean() * (t * t)


def _hidden_mse(student_h: list[torch.Tensor], teacher_h: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ``‖h_s − h_t‖² / ‖h_t‖²``: relative, so late layers with large
    activations do not dominate."""
    terms = [((hs.float() - ht.float()).pow(2).mean() / ht.float().pow(2).mean().clamp_min(1e-12))
             for hs, ht in zip(student_h, teacher_h, strict=True)]
    return torch.stack(terms).mean()


class _LayerOutputs:
    """Forward hooks that keep every decoder layer's output hidden states (for hidden_distill)."""

    def __init__(self, model: nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handles = [layer.register_forward_hook(self._hook) for layer in get_arch(model.config).layer_list(model)]

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _rotated_stream(model: nn.Module) -> bool:
    """SliceGPT rotates the residual stream (and replaces norms by weightless ones): its hidden
    states are in another basis than the dense model's, so comparing them is meaningless."""
    return any(type(m).__name__ == "UnitRMSNorm" for m in model.modules()) or bool(_shortcut_params(model))


# ---------------------------------------------------------------- teacher logits

TeacherArg = nn.Module | Callable[[], nn.Module] | None


def _materialise(teacher: TeacherArg, vocab: int | None) -> nn.Module:
    model = teacher if isinstance(teacher, nn.Module) else teacher()  # type: ignore[misc]
    head = model.get_output_embeddings()
    if vocab is not None and head is not None and head.weight.shape[0] != vocab:
        raise SlicekitError(f"the teacher has {head.weight.shape[0]} output tokens and the student {vocab}: "
                            "distillation needs the same vocabulary (use the dense original as teacher)")
    model.eval()
    return model


def _teacher_fingerprint(teacher: nn.Module) -> str:
    return _fingerprint(teacher)


@torch.no_grad()
def _teacher_topk(teacher: nn.Module, ids: torch.Tensor, t: float, k: int,
                  precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    device = next(teacher.parameters()).device
    with _autocast(precision, device):
        logits = teacher(input_ids=ids.to(device), use_cache=False).logits[:, :-1].float()
    logp = F.log_softmax(logits / t, dim=-1)
    values, index = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return index.to(torch.int32).cpu(), values.cpu()


class _TopKCache:
    """Top-k teacher log-probabilities per optimizer step, in RAM or one safetensors file per step."""

    def __init__(self, kind: str, directory: str | None, key: str) -> None:
        self.kind = kind
        self.memory: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.directory = directory
        self._tmp: tempfile.TemporaryDirectory | None = None
        if kind == "disk":
            if directory is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="slicekit-teacher-")
                self.directory = self._tmp.name
            os.makedirs(self.directory, exist_ok=True)
            manifest = os.path.join(self.directory, "manifest.json")
            old = None
            if os.path.isfile(manifest):
                with open(manifest) as fh:
                    old = json.load(fh).get("key")
            if old != key:  # other teacher, data or settings: start over
                for f in os.listdir(self.directory):
                    if f.startswith("step-") and f.endswith(".safetensors"):
                        os.remove(os.path.join(self.directory, f))
                _write_json_atomic(manifest, {"key": key, "format": CHECKPOINT_FORMAT})

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, f"step-{step:08d}.safetensors")  # type: ignore[arg-type]

    def has(self, step: int) -> bool:
        return step in self.memory if self.kind == "memory" else os.path.isfile(self._path(step))

    def put(self, step: int, index: torch.Tensor, logp: torch.Tensor) -> None:
        if self.kind == "memory":
            self.memory[step] = (index, logp)
            return
        _save_tensors_atomic(self._path(step), {"index": index.contiguous(), "logp": logp.contiguous()})

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "memory":
            return self.memory[step]
        from safetensors.torch import load_file

        data = load_file(self._path(step))
        return data["index"], data["logp"]

    def close(self) -> None:
        self.memory.clear()
        if self._tmp is not None:
            self._tmp.cleanup()


# ---------------------------------------------------------------- checkpoints

def _save_tensors_atomic(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written to a temporary sibling and renamed: a reader never sees half of it."""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _checkpoint_dirs(resume_dir: str) -> list[tuple[int, str]]:
    found = []
    if os.path.isdir(resume_dir):
        for name in os.listdir(resume_dir):
            if name.startswith("step-") and name[5:].isdigit() and os.path.isfile(os.path.join(resume_dir, name, "state.json")):
                found.append((int(name[5:]), os.path.join(resume_dir, name)))
    return sorted(found)


def _save_checkpoint(resume_dir: str, step: int, trainable: _Trainable, optimizer: torch.optim.Optimizer,
                     state: dict[str, Any]) -> None:
    """Trainable weights, flattened optimizer state and RNG states as safetensors, the rest as JSON,
    written to a temporary directory that is renamed into place; older checkpoints are removed
    afterwards, so an interruption at any moment leaves at least one complete checkpoint."""
    from safetensors.torch import save_file

    os.makedirs(resume_dir, exist_ok=True)
    final = os.path.join(resume_dir, f"step-{step:08d}")
    if os.path.isdir(final):
        return
    tmp = tempfile.mkdtemp(prefix=f".step-{step:08d}.tmp-", dir=resume_dir)
    try:
        save_file({n: p.detach().contiguous().cpu() for n, p in trainable.named}, os.path.join(tmp, "trainable.safetensors"))
        tensors, opt_json = _flatten_optimizer(optimizer, trainable)
        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda/{i}"] = s
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
        py_state = random.getstate()
        full = {**state, "format": CHECKPOINT_FORMAT, "step": step, "optimizer": opt_json,
                "rng": {"python": [py_state[0], list(py_state[1]), py_state[2]], **_numpy_rng_state()}}
        with open(os.path.join(tmp, "state.json"), "w") as fh:
            json.dump(full, fh, indent=1, sort_keys=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old_step, path in _checkpoint_dirs(resume_dir):
        if old_step < step:
            shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(resume_dir):
        if name.startswith(".step-") and ".tmp-" in name:
            shutil.rmtree(os.path.join(resume_dir, name), ignore_errors=True)


def _numpy_rng_state() -> dict[str, Any]:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch
        return {}
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}


def _restore_rng(tensors: dict[str, torch.Tensor], rng: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    v, internal, gauss = rng["python"]
    random.setstate((v, tuple(internal), gauss))
    if "numpy" in rng:
        import numpy as np

        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _flatten_optimizer(optimizer: torch.optim.Optimizer, trainable: _Trainable) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer.state_dict()`` with parameters named, tensors split out (no pickle)."""
    sd = optimizer.state_dict()
    index_names = [n for g in optimizer.param_groups for n in g["names"]]
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        name = index_names[idx]
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{name}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"})
    return tensors, {"param_groups": groups, "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], opt_json: dict) -> None:
    live = optimizer.state_dict()
    index_of = {n: i for i, n in enumerate(n for g in optimizer.param_groups for n in g["names"])}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("state/"):
            continue
        name, _, leaf = key[len("state/"):].rpartition("/")
        if name not in index_of:
            raise SlicekitError(f"the checkpoint's optimizer state names a parameter this model lacks ({name})")
        state.setdefault(index_of[name], {})[leaf] = value
    for name, extra in opt_json["scalars"].items():
        state.setdefault(index_of[name], {}).update(extra)
    groups = []
    for live_g, saved_g in zip(live["param_groups"], opt_json["param_groups"], strict=True):
        g = {**saved_g, "params": live_g["params"]}
        if isinstance(live_g.get("betas"), tuple):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------- the run

class _StopFlag:
    """First Ctrl-C: finish the current step, write a checkpoint, stop.  Second: abort at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("recover: stopping after this step (Ctrl-C again to abort without a checkpoint)")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel for the parameters' devices.

    Why: with the per-tensor loop, the optimizer step of a 100M-parameter student took 0.25–0.4 s
    of a 3.6 s step on a 2-core CPU; the fused kernel does the same update in one pass over each
    tensor (0.1 s), so the same recovery budget buys ~5 % more tokens.  The update is the same
    AdamW with the same state (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints resume
    either way.  torch refuses ``fused=True`` at construction for devices without the kernel; the
    plain loop is used there instead of failing."""
    kwargs: dict[str, Any] = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, foreach=False, **kwargs)


def _lr_at(step: int, total: int, warmup_steps: int, base: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to zero at ``total``."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def _resolve_loss(config: RecoverConfig, teacher: TeacherArg) -> str:
    loss = config.loss or ("distill" if teacher is not None else "ce")
    if loss == "distill" and teacher is None:
        raise SlicekitError("loss='distill' needs a teacher (the dense model); pass one or use loss='ce'")
    if config.hidden_distill > 0 and loss != "distill":
        raise SlicekitError("hidden_distill needs loss='distill' and a teacher")
    return loss


_SAMPLE_FIELDS = ("sample_tokens", "sample_length", "sample_batch_size", "sample_temperature", "sample_top_p")


def _settings(config: RecoverConfig) -> dict[str, Any]:
    """The settings a checkpoint and a report record.  The sampling settings appear only when the
    text is sampled, so a run on a named dataset keeps the identity earlier versions wrote (and
    resumes their checkpoints)."""
    out = {"config_version": config.VERSION, **asdict(config)}
    if not config.teacher_text:
        for k in _SAMPLE_FIELDS:
            out.pop(k)
    return out


def _check_resumable(saved: dict[str, Any], expected: dict[str, Any], resume_dir: str,
                     keys: tuple[str, ...] = ("settings", "loss", "data", "student", "teacher")) -> None:
    diffs = []
    for key in keys:
        a, b = saved.get(key), expected.get(key)
        if key == "settings":
            a = {k: v for k, v in (a or {}).items() if k not in _RESUMABLE_CHANGES}
            b = {k: v for k, v in b.items() if k not in _RESUMABLE_CHANGES}
            diffs += [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(key)
    if diffs:
        raise SlicekitError(f"{resume_dir} holds a recovery run with other settings ({', '.join(diffs)} differ): "
                            "rerun with the same settings and model, or use a new resume directory")


def recover(student: nn.Module, tokenizer: Any, config: RecoverConfig, teacher: TeacherArg = None, *,
            progress: bool = True, resume_dir: str | None = None, cache_dir: str | None = None,
            callback: Callable[[StepInfo], bool | None] | None = None) -> RecoverReport:
    """Train ``student`` (a compressed model) in place to recover quality; see the module docstring.

    ``teacher``: the dense model (or a zero-argument callable returning it, loaded only when
    needed) for ``loss="distill"``; it runs in eval mode under ``no_grad`` and is never changed.
    ``resume_dir``: where resumable checkpoints go and are resumed from.  ``cache_dir``: where
    ``teacher_cache="disk"`` keeps the teacher's top-k logits.  ``callback(StepInfo)`` runs after
    every optimizer step; returning True stops the run like Ctrl-C (checkpoint, merge, report with
    ``interrupted=True``).  Evaluation before/after is the caller's (the report has the loss curve).
    """
    with measure() as whole:
        report = _recover(student, tokenizer, config, teacher, progress, resume_dir, cache_dir, callback)
    report.measurement = whole
    return report


def _recover(student: nn.Module, tokenizer: Any, config: RecoverConfig, teacher: TeacherArg, progress: bool,
             resume_dir: str | None, cache_dir: str | None,
             callback: Callable[[StepInfo], bool | None] | None) -> RecoverReport:
    t0 = time.perf_counter()
    loss_kind = _resolve_loss(config, teacher)
    if loss_kind == "ce":
        teacher = None  # not needed: never load or run it
    if config.hidden_distill > 0 and _rotated_stream(student):
        raise SlicekitError("hidden_distill cannot compare hidden states of a model with a rotated residual "
                            "stream (SliceGPT): set hidden_distill to 0")
    shapes_before = _param_shapes(student)
    vocab = student.get_output_embeddings().weight.shape[0] if student.get_output_embeddings() is not None else None
    settings = _settings(config)
    student_fp = _fingerprint(student)

    saved_state: dict[str, Any] | None = None
    saved_path = None
    if resume_dir:
        found = _checkpoint_dirs(resume_dir)
        if found:
            saved_path = found[-1][1]
            with open(os.path.join(saved_path, "state.json")) as fh:
                saved_state = json.load(fh)
            if saved_state.get("format") != CHECKPOINT_FORMAT:
                raise SlicekitError(f"{saved_path} was written by another slicekit version (format {saved_state.get('format')})")

    sample_seconds = 0.0
    teacher_fp: str | None = None
    if config.teacher_text:
        if teacher is None:
            raise SlicekitError("dataset='teacher' samples the recovery text from the teacher: pass the dense model as "
                                "teacher (CLI: --teacher)")
        if saved_state is not None:  # another run's directory is refused before minutes of sampling, not after
            _check_resumable(saved_state, {"settings": settings, "loss": loss_kind, "student": student_fp},
                             resume_dir, keys=("settings", "loss", "student"))
        teacher = _materialise(teacher, vocab)
        teacher_fp = _teacher_fingerprint(teacher)
        stream, sample_seconds = _teacher_text_stream(teacher, teacher_fp, tokenizer, config, resume_dir, progress)
    else:
        stream = recovery_stream(tokenizer, config)
    if vocab is not None and int(stream.ids.max()) >= vocab:
        raise SlicekitError(f"the tokenizer produces ids up to {int(stream.ids.max())} but the model has {vocab} tokens")
    total = config.total_steps
    per_step = config.batch_size * config.grad_accum
    precision = resolve_precision(config.precision, next(student.parameters()).device)
    teacher_model: nn.Module | None = teacher if isinstance(teacher, nn.Module) else None
    identity = {"settings": settings, "loss": loss_kind,
                "data": {"description": stream.description, "tokens": int(stream.ids.numel()), "hash": stream.fingerprint()},
                "student": student_fp,
                "teacher": None if teacher is None else ("callable" if teacher_model is None
                                                         else teacher_fp or _teacher_fingerprint(teacher_model))}
    if saved_state is not None:
        _check_resumable(saved_state, identity, resume_dir)
    start = saved_state["step"] if saved_state else 0

    was_training = student.training
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    trainable = _Trainable(student, config)
    finished = False
    cache: _TopKCache | None = None
    try:
        groups = trainable.param_groups()
        optimizer = _adamw(groups, config.lr)
        curve: list[dict[str, float]] = []
        elapsed_before = 0.0
        if saved_state is not None:
            from safetensors.torch import load_file

            weights = load_file(os.path.join(saved_path, "trainable.safetensors"))
            named = dict(trainable.named)
            if set(weights) != set(named):
                raise SlicekitError(f"{saved_path} holds other trainable weights than this run trains: use a new resume directory")
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(weights[n])
            tensors = load_file(os.path.join(saved_path, "optimizer.safetensors"))
            _load_optimizer(optimizer, tensors, saved_state["optimizer"])
            _restore_rng(tensors, saved_state["rng"])
            curve = saved_state["curve"]
            elapsed_before = saved_state.get("elapsed_s", 0.0)

        # Teacher: on the fly, or top-k logits cached before training.
        t_teacher = time.perf_counter()
        if teacher is not None and config.teacher_cache != "none":
            key = hashlib.sha256(json.dumps({k: identity[k] for k in ("data", "teacher")} | {
                "seqlen": config.seqlen, "batch": config.batch_size, "accum": config.grad_accum, "seed": config.seed,
                "k": config.kd_topk, "T": config.kd_temperature, "precision": precision}, sort_keys=True).encode()).hexdigest()[:16]
            directory = cache_dir or (os.path.join(resume_dir, "teacher-topk") if resume_dir else None)
            cache = _TopKCache(config.teacher_cache, directory if config.teacher_cache == "disk" else None, key)
            missing = [s for s in range(start, total) if not cache.has(s)]
            if missing:
                teacher_model = _materialise(teacher, vocab)
                for s in tqdm(missing, desc="teacher logits", disable=not progress, leave=False):
                    parts = [_teacher_topk(teacher_model, stream.batch(s * per_step + m * config.batch_size, config.batch_size),
                                           config.kd_temperature, config.kd_topk, precision)
                             for m in range(config.grad_accum)]
                    cache.put(s, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
            teacher_model = None  # released: training does not need it
            teacher = None
        elif teacher is not None:
            teacher_model = _materialise(teacher, vocab)
        teacher_seconds = time.perf_counter() - t_teacher

        student_hooks = teacher_hooks = None
        if config.hidden_distill > 0 and teacher_model is not None:
            n_s = len(get_arch(student.config).layer_list(student))
            n_t = len(get_arch(teacher_model.config).layer_list(teacher_model))
            if n_s != n_t:
                raise SlicekitError(f"hidden_distill pairs layers one to one, but the student has {n_s} layers and the "
                                    f"teacher {n_t}: set hidden_distill to 0")
            student_hooks, teacher_hooks = _LayerOutputs(student), _LayerOutputs(teacher_model)

        warmup_steps = round(config.warmup * total)
        device = next(student.parameters()).device
        setup_seconds = time.perf_counter() - t0 - teacher_seconds - sample_seconds
        t_train = time.perf_counter()
        tokens_run = 0
        interrupted = False
        student.train()
        bar = tqdm(total=total, initial=start, desc="recover", unit="step", disable=not progress, dynamic_ncols=True)
        try:
            with _gradient_checkpointing(student, config.gradient_checkpointing) as gc_mode, _StopFlag() as stop:
                for step in range(start, total):
                    lr = _lr_at(step, total, warmup_steps, config.lr)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0, "hidden": 0.0}
                    cached = cache.get(step) if cache is not None else None
                    for m in range(config.grad_accum):
                        first = step * per_step + m * config.batch_size
                        ids = stream.batch(first, config.batch_size).to(device)
                        with _autocast(precision, device):
                            parts = _micro_batch_loss(student, ids, loss_kind, config, teacher_model, cached, m,
                                                      student_hooks, teacher_hooks)
                        (parts["loss"] / config.grad_accum).backward()
                        for k, v in parts.items():
                            sums[k] += float(v.detach()) / config.grad_accum
                        tokens_run += ids.numel()
                    if config.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_([p for _, p in trainable.named], config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    entry = {"step": step + 1, "lr": lr, **{k: v for k, v in sums.items()
                                                          if k == "loss" or _part_used(k, loss_kind, config)}}
                    curve.append(entry)
                    done = step + 1
                    rate = tokens_run / max(time.perf_counter() - t_train, 1e-9)
                    bar.set_postfix(loss=f"{sums['loss']:.4f}", tok_s=f"{rate:.0f}")
                    bar.update(1)
                    want_stop = stop.requested
                    if callback is not None:
                        want_stop = bool(callback(StepInfo(done, total, sums["loss"], lr, done * config.tokens_per_step))) or want_stop
                    due = config.checkpoint_every > 0 and done % config.checkpoint_every == 0
                    if resume_dir and (due or done == total or want_stop):
                        state = {**identity, "curve": curve, "samples": done * per_step,
                                 "scheduler": {"step": done, "warmup_steps": warmup_steps, "total_steps": total},
                                 "elapsed_s": elapsed_before + time.perf_counter() - t_train}
                        _save_checkpoint(resume_dir, done, trainable, optimizer, state)
                    if want_stop and done < total:
                        interrupted = True
                        break
        finally:
            bar.close()
            for h in (student_hooks, teacher_hooks):
                if h is not None:
                    h.remove()
        train_seconds = time.perf_counter() - t_train
        steps_done = len(curve)
        finished = True
    finally:
        student.train(was_training)
        trainable.finish(merge=finished)
        if cache is not None:
            cache.close()
    after = _param_shapes(student)
    if after != shapes_before:
        changed = sorted(set(after) ^ set(shapes_before)) or [k for k in after if after[k] != shapes_before[k]]
        raise RuntimeError(f"recovery changed the model's parameters: {changed[:5]}")
    return RecoverReport(
        settings=settings, loss=loss_kind, data=stream.description,
        teacher=None if loss_kind == "ce" else f"dense model, teacher_cache={config.teacher_cache}",
        steps=steps_done, total_steps=total, tokens=steps_done * config.tokens_per_step, tokens_budget=config.tokens,
        epochs=steps_done * per_step / stream.windows_per_epoch, trainable_params=sum(p.numel() for _, p in trainable.named),
        loss_curve=curve, seconds=train_seconds, tokens_per_s=tokens_run / max(train_seconds, 1e-9),
        setup_seconds=setup_seconds, teacher_seconds=teacher_seconds, gradient_checkpointing=gc_mode,
        resumed_from=start if saved_state else None, interrupted=interrupted, precision=precision,
        sample_seconds=sample_seconds)


def _part_used(part: str, loss_kind: str, config: RecoverConfig) -> bool:
    if part == "kl":
        return loss_kind == "distill" and config.kd_alpha > 0
    if part == "ce":
        return loss_kind == "ce" or config.kd_alpha < 1
    if part == "hidden":
        return loss_kind == "distill" and config.hidden_distill > 0
    return False


def _micro_batch_loss(student: nn.Module, ids: torch.Tensor, loss_kind: str, config: RecoverConfig,
                      teacher: nn.Module | None, cached: tuple[torch.Tensor, torch.Tensor] | None, micro: int,
                      student_hooks: _LayerOutputs | None, teacher_hooks: _LayerOutputs | None) -> dict[str, torch.Tensor]:
    if student_hooks is not None:
        student_hooks.take()  # drop outputs a checkpointed backward may have recorded
    logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
    labels = ids[:, 1:]
    zero = logits.new_zeros(())
    parts = {"loss": zero, "kl": zero, "ce": zero, "hidden": zero}
    ce_weight = 1.0 if loss_kind == "ce" else 1.0 - config.kd_alpha
    if ce_weight > 0:
        parts["ce"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
    if loss_kind == "distill" and (config.kd_alpha > 0 or config.hidden_distill > 0):
        t = config.kd_temperature
        if cached is not None:
            rows = slice(micro * config.batch_size, (micro + 1) * config.batch_size)
            index, logp = cached[0][rows].to(logits.device), cached[1][rows].to(logits.device)
            parts["kl"] = _kl_topk(logits, index, logp, t)
        else:
            with torch.no_grad():
                t_logits = teacher(input_ids=ids.to(next(teacher.parameters()).device), use_cache=False).logits[:, :-1]
            parts["kl"] = _kl_full(logits, t_logits.to(logits.device), t)
        if config.hidden_distill > 0 and student_hooks is not None and teacher_hooks is not None:
            hs, ht = student_hooks.take(), teacher_hooks.take()
            parts["hidden"] = _hidden_mse(hs, [h.to(logits.device) for h in ht])
    kl_weight = config.kd_alpha if loss_kind == "distill" else 0.0
    parts["loss"] = ce_weight * parts["ce"] + kl_weight * parts["kl"] + config.hidden_distill * parts["hidden"]
    return parts
