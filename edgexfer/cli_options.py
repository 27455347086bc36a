"""Options and output shared by every command group (``cli``, ``cli_fleet``, ``cli_bench``), defined once.

Only light modules are imported here: the choices come from the registry and the vocabularies, which
import no engine and no numpy, so ``edgexfer --help`` stays fast.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgexfer.runtime.backends.registry import BACKENDS, DEVICE_DEFAULT, HOST_DEFAULT, auto_order
from edgexfer.runtime.precision import PRECISIONS

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress output.")
state_option = click.option("--state", "state", type=click.Path(path_type=Path), default=None,
                            help="Device state directory (default $EDGEXFER_STATE or /var/lib/edgexfer).")
precision_option = click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                                help="What the engine computes in (bf16: OpenVINO on CPUs with avx512_bf16/AMX).")


def host_engine_options(f: Callable) -> Callable:
    """``--backend`` (default: the bundle's fp32 ONNX Runtime reference) and ``--precision``, for host commands."""
    f = precision_option(f)
    return click.option("--backend", type=click.Choice(list(BACKENDS)), default=HOST_DEFAULT, show_default=True,
                        help="Engine to run (the bundle must have it for this precision).")(f)


def device_engine_options(f: Callable) -> Callable:
    """``--backend`` (default ``auto``) and ``--precision``, for commands that run on the device."""
    f = precision_option(f)
    return click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default=DEVICE_DEFAULT,
                        show_default=True,
                        help=f"auto: the first of {', '.join(auto_order())} installed with an engine.")(f)


def emit(obj: Any, as_json: bool, text: str) -> None:
    """One JSON object on stdout with ``--json``, else the human text."""
    click.echo(json.dumps(obj, indent=2) if as_json else text)


text_option = click.option("--text", "texts", multiple=True,
                           help="A text to classify (text bundles; repeat for more). FILE '-' reads one text per "
                                "stdin line.")


def split_inputs(items: tuple[str, ...], texts: tuple[str, ...]) -> tuple[list[str], list[str], list[str]]:
    """Command-line inputs as (files, literal texts, the texts' sources).

    ``-`` among the files stands for stdin, one text per line (blank lines skipped); ``--text`` values are
    texts. Nothing given at all is a usage error.
    """
    import sys

    files = [item for item in items if item != "-"]
    literal = list(texts)
    sources = [f"text[{i}]" for i in range(len(texts))]
    if "-" in items:
        for number, line in enumerate(sys.stdin.read().splitlines(), start=1):
            if line.strip():
                literal.append(line)
                sources.append(f"stdin:line {number}")
    if not files and not literal:
        raise click.UsageError("nothing to do: give files, --text TEXT, or - (one text per stdin line)")
    return files, literal, sources
