"""slicekit: structured compression of causal language models into smaller dense models."""

from slicekit.errors import SlicekitError

__version__ = "0.1.0"

__all__ = ["SlicekitError", "__version__", "load", "load_model", "save"]


def load(directory: str, dtype=None, device: str = "cpu"):
    """Load a compressed checkpoint (a directory, or a packed file from ``slicekit pack``)
    without remote code: returns ``(model, tokenizer)``."""
    from slicekit.checkpoint import load as _load

    return _load(directory, dtype=dtype, device=device)


def save(model, tokenizer, directory: str, **kwargs):
    """Save a compressed model as a Hugging Face directory (atomic)."""
    from slicekit.checkpoint import save as _save

    return _save(model, tokenizer, directory, **kwargs)


def load_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """Load an original model by hub id, directory, GGUF file or alias: ``(model, tokenizer)``."""
    from slicekit.models import load_model as _load_model

    return _load_model(spec, dtype=dtype, device=device)
