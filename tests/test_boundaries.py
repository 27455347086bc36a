"""Package boundaries of ARCHITECTURE.md, checked in fresh interpreters."""
from __future__ import annotations

import ast
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


def _top_level_imports(path: Path) -> set[str]:
    """Root packages a module imports when it is imported (module level, also inside if/try blocks)."""
    found: set[str] = set()
    body = list(ast.parse(path.read_text()).body)
    while body:
        node = body.pop()
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try)):
            body += node.body + node.orelse + getattr(node, "finalbody", []) + \
                [s for h in getattr(node, "handlers", []) for s in h.body]
    return found


def test_no_top_level_torch_or_onnx_import_under_runtime_or_converters():
    # engines and converters import their heavy packages inside functions, so a device without them
    # still imports every module (the runtime needs neither; converters never need torch)
    forbidden = {"runtime": {"torch", "onnx", "onnxslim"}, "converters": {"torch", "onnx", "onnxslim"}}
    for folder, names in forbidden.items():
        for path in (REPO / folder).rglob("*.py"):
            assert not _top_level_imports(path) & names, f"{path}: {sorted(_top_level_imports(path) & names)}"
