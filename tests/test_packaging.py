"""The distribution ships every package: a wheel (not only an editable install) must hold all the code."""
from __future__ import annotations

from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_every_python_package_is_listed_for_the_wheel():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir = setuptools["package-dir"]
    found = set()
    for name, folder in package_dir.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    # a nested package that has its own package-dir entry is found twice under one name: same set
    assert found == set(setuptools["packages"]), f"missing: {sorted(found - set(setuptools['packages']))}"


def _architecture_table_paths() -> set[str]:
    import re

    text = (REPO / "docs" / "architecture.md").read_text()
    table = text[text.index("## Where each concept lives"):]
    table = table[:table.index("\n## ", 1)]
    paths = set()
    for raw in re.findall(r"`([A-Za-z0-9_./{},-]+)`", table):
        if "/" not in raw:
            continue
        if "{" in raw:
            head, rest = raw.split("{", 1)
            options, tail = rest.split("}", 1)
            paths |= {head + option + tail for option in options.split(",")}
        else:
            paths.add(raw)
    return paths


def test_the_concept_table_of_the_architecture_doc_is_true_and_complete():
    paths = _architecture_table_paths()
    assert not [p for p in paths if not (REPO / p).exists()], "rows name files that do not exist"
    folders = tuple(p for p in paths if p.endswith("/"))
    modules = [p.relative_to(REPO).as_posix() for folder in ("edgexfer", "runtime", "converters")
               for p in (REPO / folder).rglob("*.py") if p.name != "__init__.py" ]
    unmapped = [m for m in modules if m not in paths and not m.startswith(folders)]
    assert not unmapped, f"modules without a row in docs/architecture.md: {unmapped}"
