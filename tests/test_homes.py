"""One home per modality and per backend: the rest of the kit asks them and never compares their names.

A comparison is ``==``, ``!=``, ``in`` or ``not in`` with a modality's name (``"image"``, ``"text"``, any
registered one) or a backend's (``"onnxruntime"``, ...) written as a string, alone or in a tuple, list or
set. Outside the homes below, fewer than 3 such places may exist for each (docs/architecture.md, "Adding a
modality" and "Adding a backend").
"""
from __future__ import annotations

import ast
from pathlib import Path

from edgexfer.runtime.backends.registry import BACKENDS
from edgexfer.runtime.modalities import modality_names

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edgexfer", "converters", "runtime")
#: where a modality's own facts live: its runtime module (and the preprocessing and data-set readers
#: it builds on) and its host module
MODALITY_HOMES = ("runtime/modalities/", "runtime/text.py", "runtime/textdata.py", "runtime/preprocess.py",
                  "runtime/imagefolder.py", "runtime/augment.py", "edgexfer/modalities/")
#: where a backend's own facts live: its runtime module (runner and spec) and its converter side
BACKEND_HOMES = ("runtime/backends/", "converters/to_onnxruntime.py", "converters/to_openvino.py",
                 "converters/to_tensorrt.py", "converters/trt_lint.py", "converters/qdq.py")
LIMIT = 3


def _strings(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_strings(e) for e in node.elts)) if node.elts else set()
    return set()


def name_comparisons(names: set[str], homes: tuple[str, ...]) -> list[str]:
    """``file:line  source`` of every comparison with one of ``names`` outside ``homes``."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(homes):
                continue
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if isinstance(node, ast.Compare):
                    strings = _strings(node.left).union(*(_strings(c) for c in node.comparators))
                    if strings & names:
                        found.append(f"{rel}:{node.lineno}  {ast.unparse(node)[:90]}")
    return found


def test_fewer_than_three_places_outside_the_modality_modules_compare_a_modality_name():
    found = name_comparisons(set(modality_names()), MODALITY_HOMES)
    assert len(found) < LIMIT, "ask the modality (edgexfer.runtime.modalities.modality_of) instead:\n" + "\n".join(found)


def test_fewer_than_three_places_outside_the_backend_modules_compare_a_backend_name():
    found = name_comparisons(set(BACKENDS), BACKEND_HOMES)
    assert len(found) < LIMIT, "ask the backend's spec (registry.backend_spec) instead:\n" + "\n".join(found)


def test_the_scan_finds_a_planted_comparison(tmp_path):
    """The scan itself sees the forms it forbids (a test that cannot fail would prove nothing)."""
    planted = "if bundle.modality == 'text' or name in ('openvino', 'x') or 'image' != kind:\n    pass\n"
    tree = ast.parse(planted)
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    hits = [n for n in compares if (_strings(n.left).union(*(_strings(c) for c in n.comparators)))
            & (set(modality_names()) | set(BACKENDS))]
    assert len(hits) == 3
