"""Modalities: what a backbone reads (images, texts, ...), one plug-in module each.

A modality owns everything that depends on the kind of input: the noun used in messages, reading and
validating an input (a path, bytes, an array or a literal), the sample identity hash, the preprocessing
key, turning samples into the engine's feed, the golden inputs, and the service's input description. The
rest of the kit asks the bundle's modality (:func:`modality_of`) and never compares a modality's name.

The registry maps a name (the manifest's ``backbone.modality``) to ``"module:Class"``; a module is imported
only when its modality is used. A plug-in outside the package registers itself with
:func:`register_modality` (the toy modality of the tests does).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edgexfer.runtime.errors import BundleError, InputError

if TYPE_CHECKING:
    from edgexfer.runtime.modalities.base import Modality

#: the modality of a manifest without ``backbone.modality`` (bundles from before text existed)
DEFAULT_MODALITY = "image"

_REGISTRY: dict[str, str] = {
    "image": "edgexfer.runtime.modalities.image:ImageModality",
    "text": "edgexfer.runtime.modalities.text:TextModality",
    "audio": "edgexfer.runtime.modalities.audio:AudioModality",
}

_BUILT_IN = tuple(_REGISTRY)


def modality_names() -> tuple[str, ...]:
    """The registered modality names, in registration order."""
    return tuple(_REGISTRY)


def register_modality(name: str, target: str) -> None:
    """Register ``target`` (``"module:Class"``, a :class:`~edgexfer.runtime.modalities.base.Modality`) as ``name``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise InputError("modality name", got=repr(name), expected="an identifier like 'audio'")
    if not isinstance(target, str) or ":" not in target:
        raise InputError(f"modality {name} target", got=repr(target), expected="'module:Class'")
    _REGISTRY[name] = target


def unregister_modality(name: str) -> None:
    """Remove a plug-in registered with :func:`register_modality` (the built-in ones stay)."""
    if name not in _BUILT_IN:
        _REGISTRY.pop(name, None)


def modality_named(name: str) -> type[Modality]:
    """The class registered as ``name``; a one-line :class:`BundleError` naming the known ones otherwise."""
    if name not in _REGISTRY:
        raise BundleError("unknown modality", got=repr(name), expected=" or ".join(_REGISTRY),
                          todo="install the edgexfer version the bundle was made with, or register the plug-in")
    module, _, cls = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def modality_of(bundle: Any) -> Modality:
    """The modality of a :class:`~edgexfer.runtime.bundle.Bundle`, made once per bundle object."""
    return bundle.input_modality
