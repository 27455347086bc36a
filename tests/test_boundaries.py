"""Package boundaries of ARCHITECTURE.md, checked in fresh interpreters."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import edgexfer.runtime

REPO = Path(__file__).resolve().parents[1]


def _modules(package) -> list[str]:
    return [package.__name__] + [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]


def _imported_after(modules: list[str]) -> set[str]:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(' '.join(sorted(m for m in ('torch', 'onnx', 'onnxslim', 'edgexfer.converters', 'edgexfer.train', "
              "'edgexfer.backbones', 'sklearn') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return set(out.stdout.split())


def test_runtime_never_imports_torch_onnx_or_host_modules():
    modules = _modules(edgexfer.runtime)
    assert "edgexfer.runtime.cache" in modules and "edgexfer.runtime.backends.onnxruntime" in modules
    assert _imported_after(modules) == set()


def test_converters_never_import_torch():
    import edgexfer.converters

    assert not {"torch"} & _imported_after(_modules(edgexfer.converters))


def test_top_level_package_and_cli_stay_light():
    assert _imported_after(["edgexfer", "edgexfer.cli"]) == set()


def test_help_works_without_loading_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom edgexfer.cli import main\n"
            "r = CliRunner().invoke(main, ['train', '--help'])\nassert r.exit_code == 0, r.output\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_no_top_level_torch_import_under_runtime_or_converters():
    for folder in ("runtime", "converters"):
        for path in (REPO / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                assert not line.startswith(("import torch", "from torch", "import onnx\n")), f"{path}: {line}"
