"""Host modalities: what training, export and evaluation do differently for each kind of input.

One module per modality (:mod:`edgexfer.modalities.image`, :mod:`edgexfer.modalities.text`), each with a
:class:`~edgexfer.modalities.base.HostModality` subclass; the trainer (:mod:`edgexfer.train`), the exporter
(:mod:`edgexfer.export`) and the other host commands stay generic and ask it. The registry is keyed by the
runtime's modality name (a backbone config's ``modality``, a manifest's ``backbone.modality``) and maps it to a
``"module:Class"`` string, imported on first use, so registering a modality imports nothing.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from edgexfer.runtime.errors import InputError

if TYPE_CHECKING:
    from edgexfer.modalities.base import HostModality

_TARGETS: dict[str, str] = {
    "image": "edgexfer.modalities.image:ImageModality",
    "text": "edgexfer.modalities.text:TextModality",
    "audio": "edgexfer.modalities.audio:AudioModality",
}
_LOADED: dict[str, HostModality] = {}


def register_host_modality(name: str, target: str) -> None:
    """Add (or replace) the host side of modality ``name``: ``target`` is ``"module:Class"``."""
    _TARGETS[name] = target
    _LOADED.pop(name, None)


def host_modality_names() -> tuple[str, ...]:
    """The registered modality names, in registration order."""
    return tuple(_TARGETS)


def host_modality(name: str) -> HostModality:
    """The host side of modality ``name``; an unknown name lists the known ones."""
    if name not in _LOADED:
        if name not in _TARGETS:
            raise InputError("unknown modality", got=repr(name), expected=" or ".join(_TARGETS),
                             todo="register its host side with edgexfer.modalities.register_host_modality")
        module, _, attr = _TARGETS[name].partition(":")
        _LOADED[name] = getattr(importlib.import_module(module), attr)()
    return _LOADED[name]


def modality_of_data(path: str | os.PathLike[str]) -> HostModality:
    """The modality a training data set is made of: the first that claims it, else the catch-all one (images)."""
    modalities = [host_modality(name) for name in _TARGETS]
    for modality in modalities:
        if not modality.catch_all and modality.claims_data(Path(path)):
            return modality
    return next(m for m in modalities if m.catch_all)
