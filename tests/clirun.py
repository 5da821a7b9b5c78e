"""Running ``slicekit`` as a user does, for the command-line tests: in this process or in a new one.

A new interpreter per command costs several seconds of imports (torch, transformers, lm-eval) and
the suite runs well over a hundred commands, which put CI over its time budget.  Most commands
therefore run :func:`slicekit.cli.main` in the test process, with what a user would see captured
at the file-descriptor level as well as through ``sys.stdout``/``sys.stderr`` and every logging
handler, and with the process state a fresh interpreter would have put back afterwards (working
directory, environment, torch threads and RNG, warning filters, Hugging Face progress bars).

What only a new process shows is tested in one: import-time output, exit on signals, resource
limits (``preexec_fn``), peak memory, and bit-identical results across interpreters.  Pass
``fresh=True`` for those.  The bad-input tests also keep one case per command fresh, and
``test_bad_inputs.test_in_process_runs_print_what_a_new_interpreter_prints`` runs the same
commands both ways and compares what they print, so the runner cannot quietly drift.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch


@dataclasses.dataclass
class Run:
    rc: int
    out: str
    err: str
    seconds: float
    fresh: bool = False

    @property
    def returncode(self) -> int:  # the name subprocess.CompletedProcess uses
        return self.rc

    @property
    def stdout(self) -> str:
        return self.out

    @property
    def stderr(self) -> str:
        return self.err


def offline_env(**extra: str) -> dict[str, str]:
    """This process's environment, offline, without ``SLICEKIT_DEBUG`` (a user's default)."""
    env = {k: v for k, v in os.environ.items() if k != "SLICEKIT_DEBUG"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def run_cli(*args: str, cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
            fresh: bool = False, timeout: float = 600, preexec_fn: Callable[[], None] | None = None) -> Run:
    """``slicekit ARGS…`` with no standard input; ``env`` defaults to :func:`offline_env`."""
    env = dict(env) if env is not None else offline_env()
    argv = [str(a) for a in args]
    if fresh or preexec_fn is not None:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "slicekit.cli", *argv], cwd=cwd, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=preexec_fn)
        return Run(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0, fresh=True)
    return _in_process(argv, cwd, env)


def run_script(path: str | Path, *args: str, cwd: str | Path | None = None,
               env: Mapping[str, str] | None = None) -> Run:
    """``python PATH ARGS…`` in this process (a benchmark script run as ``__main__``), captured and
    isolated like :func:`run_cli`; ``sys.argv`` and ``sys.path`` are put back, and the modules it
    imported from its own folder are forgotten (so a sibling with a common name cannot shadow another)."""
    import runpy

    env = dict(env) if env is not None else offline_env()
    argv = [str(path), *(str(a) for a in args)]
    saved_argv, saved_path, saved_modules = sys.argv, list(sys.path), set(sys.modules)

    def main(_: list[str]) -> int:
        sys.argv = argv
        sys.path.insert(0, str(Path(path).resolve().parent))  # as ``python PATH`` does
        runpy.run_path(str(path), run_name="__main__")
        return 0

    t0 = time.monotonic()
    try:
        with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
            with _isolated(cwd, env), _captured(out_f, err_f):
                rc = _call(main, argv)
            out_f.seek(0)
            err_f.seek(0)
            out = out_f.read().decode("utf-8", "replace")
            err = err_f.read().decode("utf-8", "replace")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        here = str(Path(path).resolve().parent)
        for name in set(sys.modules) - saved_modules:  # the script's sibling modules (benchmarks/common.py)
            module_file = getattr(sys.modules.get(name), "__file__", None)
            if module_file and os.path.abspath(module_file).startswith(here + os.sep):
                sys.modules.pop(name, None)  # libraries it imported stay: reimporting extensions is unsafe
    gc.collect()
    return Run(rc, out, err, time.monotonic() - t0)


# Python's own warning filters (``python -W`` unset, not ``__main__``): what a new interpreter starts with.
_DEFAULT_FILTERS = (("ignore", DeprecationWarning), ("ignore", PendingDeprecationWarning),
                    ("ignore", ImportWarning), ("ignore", ResourceWarning))


def _in_process(argv: list[str], cwd: str | Path | None, env: dict[str, str]) -> Run:
    from slicekit import cli

    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        with _isolated(cwd, env), _captured(out_f, err_f):
            rc = _call(cli.main, argv)
        out_f.seek(0)
        err_f.seek(0)
        out = out_f.read().decode("utf-8", "replace")
        err = err_f.read().decode("utf-8", "replace")
    gc.collect()
    return Run(rc, out, err, time.monotonic() - t0)


def _call(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """The exit status ``python -m slicekit.cli`` would have: ``SystemExit`` (argparse) and an
    escaping exception (``SLICEKIT_DEBUG``) are turned into what the interpreter does with them."""
    try:
        rc = main(argv)
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    return 0 if rc is None else int(rc)


@contextlib.contextmanager
def _isolated(cwd: str | Path | None, env: dict[str, str]) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    saved_env = dict(os.environ)
    saved_cwd = os.getcwd()
    saved_stdin = sys.stdin
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    try:
        os.environ.clear()
        os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        sys.stdin = open(os.devnull)  # noqa: SIM115  # like stdin=DEVNULL: reads see end of file
        hf_logging.enable_progress_bar()  # a new interpreter shows them until --quiet turns them off
        with warnings.catch_warnings():
            warnings.resetwarnings()  # also forgets which warnings were already shown
            for action, category in _DEFAULT_FILTERS:
                warnings.simplefilter(action, category)
            warnings.showwarning = warnings._showwarning_orig  # type: ignore[attr-defined]
            warnings._showwarnmsg_impl = _print_warning  # type: ignore[attr-defined]  # not pytest's recorder
            yield
    finally:
        if sys.stdin is not saved_stdin:
            sys.stdin.close()
            sys.stdin = saved_stdin
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
        hf_logging.set_verbosity(verbosity)


def _print_warning(msg: warnings.WarningMessage) -> None:
    sys.stderr.write(warnings._formatwarnmsg(msg))  # type: ignore[attr-defined]


@contextlib.contextmanager
def _captured(out_f: io.BufferedRandom, err_f: io.BufferedRandom) -> Iterator[None]:
    """stdout/stderr into the two files: file descriptors 1 and 2 (C code, subprocesses),
    ``sys.stdout``/``sys.stderr``, and the logging handlers that hold the old streams."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    old_streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    new_out = io.TextIOWrapper(open(out_f.fileno(), "wb", closefd=False), encoding="utf-8", write_through=True)  # noqa: SIM115
    new_err = io.TextIOWrapper(open(err_f.fileno(), "wb", closefd=False), encoding="utf-8", write_through=True)  # noqa: SIM115
    saved_fds = (os.dup(1), os.dup(2))
    retargeted: list[tuple[logging.StreamHandler, object]] = []
    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if type(h) is logging.StreamHandler and any(h.stream is s for s in old_streams):  # not lastResort's
                to = new_out if any(h.stream is s for s in (old_streams[0], old_streams[2])) else new_err
                retargeted.append((h, h.stream))
                h.setStream(to)
    sys.stdout, sys.stderr = new_out, new_err
    os.dup2(out_f.fileno(), 1)
    os.dup2(err_f.fileno(), 2)
    try:
        yield
    finally:
        for stream in (new_out, new_err):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        sys.stdout, sys.stderr = old_streams[0], old_streams[1]
        for h, stream in retargeted:
            h.setStream(stream)  # type: ignore[arg-type]
        new_out.detach()
        new_err.detach()
