"""Perplexity with the standard protocol.

Documents joined by ``"\\n\\n"``, tokenised once, cut into non-overlapping windows of ``seqlen``
tokens (the tail shorter than a window is dropped), token-level negative log-likelihood of every
predicted token (``seqlen − 1`` per window), ``ppl = exp(mean NLL)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from slicekit.data import TextSource, tokenize_text
from slicekit.errors import SlicekitError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    windows: int
    seqlen: int
    tokens: int  # predicted (scored) tokens
    dataset: str

    def as_dict(self) -> dict:
        return asdict(self)


def eval_windows(tokenizer, source: TextSource, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """The (W, seqlen) windows the protocol scores."""
    if seqlen < 2:
        raise SlicekitError(f"seqlen must be at least 2 (got {seqlen})")
    ids = tokenize_text(tokenizer, source.joined())
    n = ids.numel() // seqlen
    if n == 0:
        raise SlicekitError(f"{source.description} has {ids.numel()} tokens: fewer than one window of {seqlen}")
    if max_windows is not None:
        if max_windows < 1:
            raise SlicekitError(f"--max-windows must be ≥ 1 (got {max_windows})")
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity_of_windows(model: nn.Module, windows: torch.Tensor, batch_size: int = 1,
                          progress: bool = True, desc: str = "perplexity") -> tuple[float, int]:
    """Mean token NLL over the windows (float64 accumulation) and the number of scored tokens."""
    if batch_size < 1:
        raise SlicekitError(f"batch size must be ≥ 1 (got {batch_size})")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in tqdm(torch.split(windows, batch_size), desc=desc, disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)
        total += nll.double().sum().item()
        count += nll.numel()
    return total / count, count


def perplexity(model: nn.Module, tokenizer, source: TextSource, seqlen: int = 2048,
               max_windows: int | None = None, batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    windows = eval_windows(tokenizer, source, seqlen, max_windows)
    return perplexity_result(model, windows, source.description, batch_size, progress)


def perplexity_result(model: nn.Module, windows: torch.Tensor, dataset: str, batch_size: int = 1,
                      progress: bool = True) -> PerplexityResult:
    """Score already-tokenised windows (tokenise once when evaluating several models)."""
    nll, count = perplexity_of_windows(model, windows, batch_size, progress)
    return PerplexityResult(math.exp(nll), nll, windows.shape[0], windows.shape[1], count, dataset)
