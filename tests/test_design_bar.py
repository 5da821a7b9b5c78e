"""Issue #12's design bar, checked on the source: architecture knowledge lives in ``slicekit.arch``'s
table.  Outside ``arch.py`` no module reads or compares a ``model_type`` (it asks the table, or
``arch.model_type_of`` for a name in a message or report) and none probes a model with ``hasattr``.

The checks walk the syntax tree, not the text, so a docstring may mention ``model_type`` and an
output dict may have a ``"model_type"`` key, but ``config.model_type == "x"`` cannot come back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import slicekit
from slicekit.errors import SlicekitError

SRC = Path(slicekit.__file__).parent

#: Files exempt from the ``model_type`` rule, with the reason.
MODEL_TYPE_EXEMPT = {
    "arch.py": "the table itself",
    # ships inside every checkpoint and needs only torch/transformers/safetensors, so it cannot ask
    # slicekit.arch; it copies the base config's model_type key into the config.json it writes
    "modeling_slicekit.py": "standalone loader",
}

#: The only ``hasattr`` calls allowed outside arch.py, as ``(file, call source)``, with the reason.
#: None of them looks inside a model's architecture.
HASATTR_ALLOWED = {
    ("validate.py", "hasattr(field, 'contents')"): "a gguf.GGUFReader field (older gguf packages lack it)",
    ("validate.py", "hasattr(args, attr)"): "an argparse namespace",
    ("zeroshot.py", "hasattr(manager, 'load')"): "lm-eval's TaskManager API differs between releases",
    # transformers' own flag that its input-embedding require-grad hook is installed (the BC
    # attribute its disable_input_require_grads checks too); no public call reports it
    ("recover.py", "hasattr(model, '_require_grads_hook')"): "transformers' input-grad hook flag",
}


def _sources() -> list[tuple[str, ast.Module]]:
    files = sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) > 10 and (SRC / "arch.py") in files  # the walk really sees the package
    return [(p.relative_to(SRC).as_posix(), ast.parse(p.read_text(), filename=str(p))) for p in files]


def _is_model_type(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value == "model_type"


def model_type_reads(tree: ast.Module) -> list[str]:
    """Every read or comparison of ``model_type`` in a module: ``x.model_type``, ``getattr(x,
    "model_type")``, ``x.get("model_type")``, ``x["model_type"]``, and a comparison of a variable
    named ``model_type``.  Writing the key (dict literals, keyword arguments, class attributes) is
    not a read."""
    found = []
    for node in ast.walk(tree):
        bad = False
        if isinstance(node, ast.Attribute) and node.attr == "model_type" and isinstance(node.ctx, ast.Load):
            bad = True
        elif isinstance(node, ast.Call):
            func, args = node.func, node.args
            bad = (isinstance(func, ast.Name) and func.id == "getattr" and len(args) >= 2
                   and _is_model_type(args[1])) or \
                  (isinstance(func, ast.Attribute) and func.attr == "get" and len(args) >= 1
                   and _is_model_type(args[0]))
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            bad = _is_model_type(node.slice)
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            bad = any(isinstance(o, ast.Name) and o.id == "model_type" for o in operands)
        if bad:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def hasattr_calls(tree: ast.Module) -> list[str]:
    return [ast.unparse(n) for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "hasattr"]


def test_the_checkers_catch_what_the_bar_forbids():
    """A checker that finds nothing proves nothing: each forbidden form is caught, each allowed one is not."""
    forbidden = ['if config.model_type == "mistral": pass', 'x = getattr(config, "model_type", None)',
                 'x = raw.get("model_type")', 'x = base.get("model_type", "slicekit")', 'x = raw["model_type"]',
                 'ok = model_type in TABLE']
    for code in forbidden:
        assert len(model_type_reads(ast.parse(code))) == 1, code
    allowed = ['out = {"model_type": model_type_of(cfg)}', "Report(model_type=model_type_of(cfg))",
               "class C:\n    model_type = 'x'", '"""model_type in a docstring"""', "n = spec.model_types"]
    for code in allowed:
        assert model_type_reads(ast.parse(code)) == [], code
    assert hasattr_calls(ast.parse("if hasattr(layer, 'mlp'): pass")) == ["hasattr(layer, 'mlp')"]


def test_no_model_type_reads_outside_arch():
    offenders = {name: reads for name, tree in _sources()
                 if Path(name).name not in MODEL_TYPE_EXEMPT and (reads := model_type_reads(tree))}
    assert offenders == {}, f"ask slicekit.arch (get_arch, model_type_of, gguf_spec) instead: {offenders}"


def test_no_hasattr_probing_outside_arch():
    seen = {(Path(name).name, call) for name, tree in _sources() if Path(name).name != "arch.py"
            for call in hasattr_calls(tree)}
    assert seen - set(HASATTR_ALLOWED) == set(), "no hasattr probing: put the fact in slicekit.arch's table"
    assert set(HASATTR_ALLOWED) - seen == set(), "an allowed hasattr is gone: drop it from HASATTR_ALLOWED"


# ---------------------------------------------------------------- the GGUF facts are the table's


def test_gguf_facts_come_from_the_table():
    from transformers import AutoConfig

    from slicekit.arch import ARCHITECTURES, gguf_families, gguf_model_types, gguf_spec

    assert gguf_model_types() == ["llama", "mistral", "qwen2"]
    assert gguf_families() == {mt: ARCHITECTURES[mt].gguf for mt in gguf_model_types()}
    assert gguf_spec(AutoConfig.for_model("mistral")).gguf_arch == "llama"  # llama.cpp's name for Mistral
    assert gguf_spec({"model_type": "qwen2"}).qkv_bias  # a raw config.json dict works too
    with pytest.raises(SlicekitError, match=r"supports model types llama, mistral, qwen2; ck is 'opt'"):
        gguf_spec({"model_type": "opt"}, source="ck")
    with pytest.raises(SlicekitError, match=r"this model is None"):
        gguf_spec({})


def test_sliding_window_rules():
    from transformers import AutoConfig

    from slicekit.arch import gguf_spec, is_slicekit_format

    short = AutoConfig.for_model("mistral", sliding_window=16, max_position_embeddings=128)
    assert gguf_spec(short).dropped_window(short) == 16
    whole = AutoConfig.for_model("mistral", sliding_window=128, max_position_embeddings=128)
    assert gguf_spec(whole).dropped_window(whole) is None  # the window covers the context: nothing lost
    assert gguf_spec(short).window_refusal(short) is None
    on = AutoConfig.for_model("qwen2", use_sliding_window=True, sliding_window=16)
    off = AutoConfig.for_model("qwen2")
    assert "use_sliding_window=True" in gguf_spec(on).window_refusal(on)
    assert gguf_spec(off).window_refusal(off) is None and gguf_spec(off).dropped_window(off) is None
    assert is_slicekit_format({"model_type": "llama", "base_config": {}})
    assert is_slicekit_format({"model_type": "slicekit"}) and not is_slicekit_format(off)


def test_export_refuses_qwen2_sliding_window():
    from transformers import AutoConfig, AutoModelForCausalLM

    from slicekit.export import check_exportable
    from tiny import TINY_CONFIGS

    cfg = AutoConfig.for_model("qwen2", vocab_size=64, use_sliding_window=True, sliding_window=16,
                               **TINY_CONFIGS["qwen2"])
    torch.manual_seed(0)
    with pytest.raises(SlicekitError, match="use_sliding_window=True has no GGUF equivalent"):
        check_exportable(AutoModelForCausalLM.from_config(cfg))
