"""Typed errors whose message is one line: ``what | got ... | expected ... | what to do``."""
from __future__ import annotations


class EdgexferError(Exception):
    """Base of every error edgexfer raises on purpose.

    The message is built from four parts so that a person reading one line of a log knows what
    failed, what was seen, what was expected and what to do about it.
    """

    exit_code = 1

    def __init__(self, what: str, got: object = None, expected: object = None, todo: str | None = None):
        self.what = what
        self.got = got
        self.expected = expected
        self.todo = todo
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = [self.what]
        if self.got is not None:
            parts.append(f"got {self.got}")
        if self.expected is not None:
            parts.append(f"expected {self.expected}")
        if self.todo:
            parts.append(self.todo)
        return " | ".join(str(p).replace("\n", " ") for p in parts)


class InputError(EdgexferError):
    """A user-supplied input (image, array, path, option) is not usable."""


class DataError(EdgexferError):
    """A data set on disk is not usable (missing directory, empty class, single class)."""


class BundleError(EdgexferError):
    """A bundle or manifest is malformed, incomplete or fails its checksums."""


class HeadError(EdgexferError):
    """A head file is malformed or does not fit the backbone it is used with."""


class MissingDependencyError(EdgexferError):
    """An optional package is needed for this operation and is not installed."""


class CacheError(EdgexferError):
    """The feature cache cannot be opened or written."""


class ValidationError(EdgexferError):
    """Outputs of an engine or export do not match the reference within tolerance.

    ``failures`` holds one line per output that failed, all collected before raising.
    """

    def __init__(self, what: str, failures: list[str], todo: str | None = None):
        self.failures = list(failures)
        super().__init__(what, got="; ".join(self.failures), expected="every output within tolerance", todo=todo)
