"""Rules of the code (issue 22), read from the source with ``ast``: no module over 600 lines, no function over
80 lines without a comment saying why, no import cycle among edgexfer's modules.

A long function is accepted with a ``# long: <why>`` comment right above its ``def`` (or its decorators), or in
the comment lines before its first statement, or with a docstring line ``long: <why>``.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the package folders and the name each is imported as (pyproject.toml's package-dir)
PACKAGES = {"edgexfer": "edgexfer", "converters": "edgexfer.converters", "runtime": "edgexfer.runtime"}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
#: the marker of a long function, followed by its reason
LONG_COMMENT = re.compile(r"#\s*long:\s*\S")

#: Offenders found when these rules came (issue 22), each removed by the change that fixes it: the lead empties
#: this set when issue 22 closes. "path" is a module over MAX_MODULE_LINES, "path::name" a function over
#: MAX_FUNCTION_LINES (lines today in the comment). An entry that no longer offends fails the test: remove it.
KNOWN_OVER_LIMIT: set[str] = set()


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three packages."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function, methods and nested functions included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def _says_why(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> bool:
    """A ``# long: <why>`` comment above the def (or its decorators) or before the first statement, or a
    docstring line ``long: <why>``."""
    top = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1  # 0-based index of the first line
    above = top - 1
    while above >= 0 and lines[above].strip().startswith("#"):
        if LONG_COMMENT.search(lines[above]):
            return True
        above -= 1
    if any(LONG_COMMENT.search(line) for line in lines[node.lineno - 1:node.body[0].lineno - 1]):
        return True
    doc = ast.get_docstring(node) or ""
    return any(re.match(r"long:\s*\S", line.strip()) for line in doc.splitlines())


def _over_limit() -> dict[str, str]:
    """Every module over the line limit and long function without a reason: entry -> what is wrong."""
    found = {}
    for path in _module_files().values():
        source = path.read_text()
        lines = source.splitlines()
        if len(lines) > MAX_MODULE_LINES:
            found[_rel(path)] = f"{len(lines)} lines (at most {MAX_MODULE_LINES})"
        for name, node in _functions(ast.parse(source)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and not _says_why(node, lines):
                found[f"{_rel(path)}::{name}"] = (f"line {node.lineno}: {length} lines (at most {MAX_FUNCTION_LINES} "
                                                  "without a '# long: <why>' comment above the def)")
    return found


def test_no_module_or_function_over_its_limit():
    found = _over_limit()
    new = {entry: why for entry, why in found.items() if entry not in KNOWN_OVER_LIMIT}
    assert not new, "over the limit:\n" + "\n".join(f"  {entry}: {why}" for entry, why in sorted(new.items()))


def test_known_offenders_still_offend():
    """An entry of KNOWN_OVER_LIMIT that was fixed must leave the list, so the rule holds for it again."""
    fixed = sorted(KNOWN_OVER_LIMIT - set(_over_limit()))
    assert not fixed, f"within the limits now, remove from KNOWN_OVER_LIMIT: {fixed}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_statements(body: list[ast.stmt]):
    """Statements that run when the module is imported: not inside functions, not under ``if TYPE_CHECKING:``."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _module_level_statements(node.orelse if _is_type_checking(node.test) else node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _module_level_statements(node.body + node.orelse + node.finalbody
                                                + [s for h in node.handlers for s in h.body])
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _module_level_statements(node.body)


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports at module level."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _module_level_statements(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base in known:
                out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    files = _module_files()
    return {name: _imports(name, path, set(files)) for name, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest cycle through the group's first module, staying inside the group (breadth first)."""
    start = min(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & group):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    raise AssertionError(f"no cycle in strongly connected group {sorted(group)}")


def test_the_import_graph_is_read_from_the_source():
    graph = import_graph()
    assert "edgexfer.runtime.fsutil" in graph["edgexfer.runtime.state"]
    assert "edgexfer.runtime.bundle" in graph["edgexfer.fleet.result_bundle"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_package_modules():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join("  " + " -> ".join(c) for c in cycles)
