"""The device state directory (docs/architecture.md, "Device state directory").

```
state/
  bundles/<backbone-sha>      link to the active content of that backbone's bundle:
  bundles/<backbone-sha>.<id>/  installed bundle contents (id: sha256 of manifest.json), immutable
  heads/<version>/            head.safetensors + head.json
  active.json                 {"bundle": sha, "head": version, "previous_head": version | null}
  features.sqlite             the feature cache
  engines/ trust/             engines built on the device; update trust root
```

Invariant: after a crash at any point exactly one complete (bundle, head) pair is active. New bundles
and heads are written under a temporary name, fsynced and renamed into place (:class:`fsutil.StagedDir`);
only then does ``active.json`` change, itself replaced atomically (temp file, fsync, rename, fsync directory).
Writers (install, retrain, rollback, update) hold an exclusive lock on ``state/lock``.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import EdgexferError, HeadError
from edgexfer.runtime.fsutil import (
    PRIVATE_FILE,
    StagedDir,
    file_sha256,
    fsync_dir,
    make_private,
    private_dir,
    write_atomic,
)
from edgexfer.runtime.heads import Head

STATE_ENV = "EDGEXFER_STATE"
DEFAULT_STATE = "/var/lib/edgexfer"
#: test hook: ``EDGEXFER_CRASH_AT=<step>`` makes the process SIGKILL itself when it reaches that step
CRASH_ENV = "EDGEXFER_CRASH_AT"


class StateError(EdgexferError):
    """The device state directory is missing, locked or inconsistent."""


def crash_point(step: str) -> None:
    """Die at a named step when the crash-test hook asks for it (no effect otherwise)."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def manifest_id(bundle_dir: Path) -> str:
    """Short id of a bundle's exact content: the sha256 of its manifest, which lists every file's sha256."""
    return file_sha256(Path(bundle_dir) / "manifest.json")[:12]


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV, DEFAULT_STATE))


@dataclass(frozen=True)
class ActiveState:
    bundle: str  #: backbone sha256 = folder name under bundles/
    head: int  #: head version under heads/
    previous_head: int | None = None  #: what `rollback` returns to

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()


@dataclass(frozen=True)
class HeadRecord:
    """``heads/<version>/head.json``."""

    version: int
    kind: str
    classes: list[str]
    backbone_sha256: str
    sha256: str  #: of head.safetensors
    created_utc: str
    parent: int | None = None
    status: str = "candidate"  #: candidate | accepted | rejected
    source: str = "retrain"  #: bundle | retrain | update
    metrics: dict[str, Any] = field(default_factory=dict)


class DeviceState:
    """Files of one device. Cheap to construct; nothing is read until asked."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_state_dir()
        self.bundles_dir = self.root / "bundles"
        self.heads_dir = self.root / "heads"
        self.active_path = self.root / "active.json"
        self.cache_path = self.root / "features.sqlite"
        self.engines_dir = self.root / "engines"
        self.trust_dir = self.root / "trust"
        self.last_retrain_path = self.root / "last_retrain.json"

    # ---------------------------------------------------------------------------- locking
    @contextlib.contextmanager
    def locked(self, timeout: float = 60.0) -> Iterator[DeviceState]:
        """Exclusive writer lock (flock: released by the kernel if the holder dies)."""
        private_dir(self.root)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StateError("device state is locked by another edgexfer process", got=str(self.root),
                                         expected="no other install/retrain/rollback/update running",
                                         todo="wait for it to finish and retry") from None
                    time.sleep(0.05)
            self._sweep_temporaries()
            yield self
        finally:
            os.close(fd)

    def _sweep_temporaries(self) -> None:
        """Remove what a killed writer left behind; none of it was ever made active.

        That is half-written bundles and heads (``.tmp-*`` directories) and the temp files of
        :func:`write_atomic` (``.active.json.*`` and the like: a SIGKILL skips its cleanup). Called
        only under the lock, so no live writer still owns any of them.
        """
        for parent in (self.bundles_dir, self.heads_dir, self.engines_dir):
            if parent.is_dir():
                for child in parent.iterdir():
                    if child.name.startswith(".tmp-"):
                        if child.is_symlink():  # a bundle link not yet renamed into place
                            child.unlink()
                        else:
                            shutil.rmtree(child, ignore_errors=True)
        stale = [*self.root.glob(f".{self.active_path.name}.*"), *self.root.glob(f".{self.last_retrain_path.name}.*")]
        if self.heads_dir.is_dir():
            stale += self.heads_dir.glob("[0-9]*/.head.json.*")  # set_head_status rewrites head.json
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def exposed(self) -> list[str]:
        """What of the state others than its owner can read or write: ``"PATH mode 0755"`` entries.

        The state holds the images a site took, its labels and its heads; it is created 0700 with 0600
        files, and ``device status`` warns about anything here that is not. Looks at the directory, its
        files and folders, and the heads (not inside bundles or engines, which live in 0700 folders).
        """
        if not self.root.is_dir():
            return []
        paths = [self.root, *self.root.iterdir()]
        for folder in (self.heads_dir, self.trust_dir):
            if folder.is_dir():
                paths += [p for child in folder.iterdir() for p in ([child, *child.iterdir()] if child.is_dir() else [child])]
        out = []
        for path in paths:
            if path.is_symlink():
                continue
            with contextlib.suppress(FileNotFoundError):
                mode = stat.S_IMODE(path.stat().st_mode)
                if mode & 0o077:
                    out.append(f"{path} mode {mode:04o}")
        return out

    # ---------------------------------------------------------------------------- active pair
    def active(self) -> ActiveState:
        if not self.active_path.is_file():
            raise StateError("no model is installed on this device", got=f"no {self.active_path}",
                             expected="an installed bundle", todo=f"run `edgexfer device install BUNDLE_DIR --state {self.root}`")
        try:
            obj = json.loads(self.active_path.read_text())
            return ActiveState(bundle=str(obj["bundle"]), head=int(obj["head"]),
                               previous_head=None if obj.get("previous_head") is None else int(obj["previous_head"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError("active.json is unreadable", got=str(exc), expected="the file edgexfer wrote",
                             todo="re-run `edgexfer device install BUNDLE_DIR` to write it again (heads and cache are kept)") from None

    def set_active(self, state: ActiveState) -> None:
        crash_point("before-switch")
        write_atomic(self.active_path, state.to_json(), mode=PRIVATE_FILE)
        crash_point("after-switch")

    # ---------------------------------------------------------------------------- bundles
    def bundle(self, sha: str | None = None, verify: bool = False) -> Bundle:
        """The installed bundle of a backbone (default: the active one), opened at its content directory.

        The ``bundles/<sha>`` link is resolved once, so one :class:`Bundle` reads one immutable content
        even if a newer content of the same backbone is linked meanwhile.
        """
        sha = sha or self.active().bundle
        return Bundle.open((self.bundles_dir / sha).resolve(), verify=verify)

    def install_bundle(self, source: str | Path) -> tuple[Bundle, bool]:
        """Copy a verified bundle into its content directory ``bundles/<sha>.<manifest-id>`` (verified again).

        A content directory is immutable: a bundle with the same backbone but other files (a new head,
        another engine, a TensorRT kit) gets its own, and :meth:`link_bundle` later points
        ``bundles/<sha>`` at it. Returns the bundle opened there and whether it was copied now. Must be
        called under :meth:`locked`.
        """
        src = Bundle.open(source, verify=True)
        sha = src.manifest.backbone.sha256
        self._refuse_unlinked(self.bundles_dir / sha)  # before anything is copied
        dest = self.bundles_dir / f"{sha}.{manifest_id(src.root)}"
        if dest.is_dir():
            return Bundle.open(dest, verify=True), False
        private_dir(self.bundles_dir)
        with StagedDir(dest, private=True) as staged:  # .tmp-<random>: swept by the next writer after a crash
            for rel in ["manifest.json", *src.manifest.files]:
                (staged.path / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src.root / rel, staged.path / rel)
            make_private(staged.path)
            crash_point("bundle-copied")
            Bundle.open(staged.path, verify=True)  # what landed on this disk, not what was read
        crash_point("bundle-renamed")
        return Bundle.open(dest), True

    @staticmethod
    def _refuse_unlinked(link: Path) -> None:
        if link.exists() and not link.is_symlink():
            raise StateError("installed bundle directory from an older edgexfer", got=f"{link} is a directory",
                             expected="a link to bundles/<sha>.<manifest-id>",
                             todo=f"remove {link} (heads and the feature cache are kept) and install the bundle again")

    def installed_backbones(self) -> list[str]:
        """Backbone sha256 of every linked bundle."""
        if not self.bundles_dir.is_dir():
            return []
        return sorted(p.name for p in self.bundles_dir.iterdir() if p.is_symlink() and len(p.name) == 64)

    def link_bundle(self, bundle: Bundle) -> None:
        """Point ``bundles/<sha>`` at ``bundle``'s content directory atomically (a symlink replaced by rename).

        Keeps the content the link pointed to before (a running process may still read it) and removes
        older contents of the same backbone. Must be called under :meth:`locked`.
        """
        sha = bundle.manifest.backbone.sha256
        link = self.bundles_dir / sha
        target = bundle.root.name
        if not target.startswith(f"{sha}.") or bundle.root.parent.resolve() != self.bundles_dir.resolve():
            raise StateError("only an installed bundle can be linked", got=str(bundle.root),
                             expected=f"{self.bundles_dir}/{sha}.<manifest-id>", todo="install the bundle first")
        previous = os.readlink(link) if link.is_symlink() else None
        if previous == target:
            return
        self._refuse_unlinked(link)
        tmp = self.bundles_dir / f".tmp-link-{uuid.uuid4().hex}"
        os.symlink(target, tmp)
        os.replace(tmp, link)
        fsync_dir(self.bundles_dir)
        crash_point("bundle-linked")
        for old in self.bundles_dir.glob(f"{sha}.*"):
            if old.name not in (target, previous):
                shutil.rmtree(old, ignore_errors=True)

    # ---------------------------------------------------------------------------- heads
    def head_versions(self) -> list[int]:
        if not self.heads_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.heads_dir.iterdir() if p.name.isdigit() and (p / "head.json").is_file())

    def head_record(self, version: int) -> HeadRecord:
        path = self.heads_dir / str(version) / "head.json"
        if not path.is_file():
            raise StateError("no such head version", got=version, expected=f"one of {self.head_versions()}",
                             todo="list heads with `edgexfer device heads`")
        return HeadRecord(**json.loads(path.read_text()))

    def load_head(self, version: int, feature_dim: int | None = None) -> Head:
        record = self.head_record(version)
        path = self.heads_dir / str(version) / "head.safetensors"
        if file_sha256(path) != record.sha256:
            raise HeadError(f"head version {version} is damaged", got="sha256 differs from head.json",
                            expected=record.sha256[:16] + "…", todo="roll back to another head")
        return Head.load(path, feature_dim=feature_dim)

    def add_head(self, head: Head, *, backbone_sha256: str, parent: int | None, status: str, source: str,
                 metrics: dict[str, Any] | None = None, version: int | None = None,
                 source_file: Path | None = None) -> HeadRecord:
        """Write a new ``heads/<version>/`` directory atomically (temp dir, fsync, rename).

        ``source_file`` copies that head file byte for byte (a bundle's or an update's, whose sha256
        was verified) instead of serialising ``head`` again.
        """
        existing = self.head_versions()
        if version is None:
            version = (max(existing) + 1) if existing else 1
        elif version in existing:
            raise StateError("head version exists already", got=version, expected="a new version number")
        private_dir(self.heads_dir)
        with StagedDir(self.heads_dir / str(version), private=True) as staged:  # .tmp-<random>, like bundles
            tmp = staged.path
            if source_file is not None:
                shutil.copyfile(source_file, tmp / "head.safetensors")
            else:
                head.save(tmp / "head.safetensors")
            record = HeadRecord(version=version, kind=head.kind, classes=list(head.classes),
                                backbone_sha256=backbone_sha256, sha256=file_sha256(tmp / "head.safetensors"),
                                created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                parent=parent, status=status, source=source, metrics=dict(metrics or {}))
            write_atomic(tmp / "head.json", (json.dumps(asdict(record), indent=2) + "\n").encode(), mode=PRIVATE_FILE)
            os.chmod(tmp / "head.safetensors", PRIVATE_FILE)
            crash_point("head-written")
        crash_point("head-renamed")
        return record

    def set_head_status(self, version: int, status: str) -> None:
        record = self.head_record(version)
        updated = HeadRecord(**{**asdict(record), "status": status})
        write_atomic(self.heads_dir / str(version) / "head.json", (json.dumps(asdict(updated), indent=2) + "\n").encode(),
                     mode=PRIVATE_FILE)

    def activate_head(self, version: int) -> ActiveState:
        """Make ``version`` the active head; a head bound to another backbone is refused."""
        current = self.active()
        record = self.head_record(version)
        if record.backbone_sha256 != current.bundle:
            raise HeadError("head is bound to another backbone", got=f"head {version} for {record.backbone_sha256[:16]}…",
                            expected=f"backbone {current.bundle[:16]}…", todo="retrain the head for the installed backbone")
        bundle = self.bundle(current.bundle)
        self.load_head(version, feature_dim=bundle.manifest.backbone.feature_dim)  # complete and loadable
        new = ActiveState(bundle=current.bundle, head=version, previous_head=current.head)
        self.set_active(new)
        return new

    def rollback(self) -> ActiveState:
        current = self.active()
        if current.previous_head is None:
            raise StateError("nothing to roll back to", got=f"head {current.head} has no previous head",
                             expected="a previous head", todo="install a bundle or retrain first")
        return self.activate_head(current.previous_head)
