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


#: what no device-side module may load: the host's heavy packages
HEAVY = ("torch", "onnx", "onnxslim", "sklearn")


def _host_modules() -> list[str]:
    """Every module of the host package, found by walking ``edgexfer/`` (the runtime and the converters live in
    their own folders), less ``edgexfer`` itself: its light ``__init__`` is the parent of ``edgexfer.runtime``."""
    found = []
    for path in sorted((REPO / "edgexfer").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1:
            found.append(".".join(parts))
    return found


def _imported_after(modules: list[str], watched: tuple[str, ...] | list[str]) -> set[str]:
    """Which of ``watched`` a fresh interpreter has loaded after importing ``modules``."""
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + f"print(' '.join(sorted(m for m in {tuple(watched)!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]  # an import that fails (a cycle through a host module, say)
    return set(out.stdout.split())


def test_runtime_never_imports_torch_onnx_or_host_modules():
    modules = _modules(edgexfer.runtime)
    assert "edgexfer.runtime.cache" in modules and "edgexfer.runtime.backends.onnxruntime" in modules
    host = _host_modules()
    assert {"edgexfer.cli", "edgexfer.export", "edgexfer.publish", "edgexfer.fleet", "edgexfer.fleet.result_bundle",
            "edgexfer.train", "edgexfer.backbones"} <= set(host)
    assert _imported_after(modules, (*HEAVY, "edgexfer.converters", *host)) == set()


def test_converters_never_import_torch():
    import edgexfer.converters

    assert not {"torch"} & _imported_after(_modules(edgexfer.converters), ("torch",))


def test_top_level_package_and_cli_stay_light():
    # the CLI imports its command modules, but none of the heavy ones until a command runs
    watched = (*HEAVY, "edgexfer.converters", "edgexfer.train", "edgexfer.backbones")
    assert _imported_after(["edgexfer", "edgexfer.cli"], watched) == set()


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
