"""The host side of signed head updates: a TUF repository whose targets are head files.

Layout (``REPO_DIR`` is what a web server serves; keys live elsewhere)::

    REPO_DIR/metadata/   1.root.json … N.root.json, N.targets.json, N.snapshot.json, timestamp.json
    REPO_DIR/targets/    heads/<group>/<backbone-sha>/<head-version>/<sha256>.head.safetensors
    KEYS_DIR/            targets.key, snapshot.key, timestamp.key (online keys, mode 0600)
    ROOT_KEY             root.key: the offline root key, only needed by `init` and `rotate`

Consistent snapshots are on, so a device that fetches while a publish is under way always sees one
complete, signed set of metadata and target files.

Roles and keys: one Ed25519 key per role, threshold 1. The root key signs only root metadata and is
meant to live offline (a USB stick, a vault); `edgexfer heads keygen` writes it. The targets, snapshot
and timestamp keys are online: `publish` and `promote` use them, `rotate ROLE` replaces one (a new
root version signed by the offline root key, then the role re-signed with the new key).

Rollout (canary first): the group is part of the target path, ``heads/<group>/<backbone>/<version>/``.
`publish` adds a head under one group (default ``canary``); `promote` adds the same bytes (same
hashes) under ``heads/all/…``. A device configured for group G considers ``heads/G/`` and
``heads/all/``. Groups select; they do not restrict: every target is signed by the one targets key,
so a group is not a security boundary (delegated roles would be the tool for that, and are not needed
while one team signs every head).

Each head target carries custom metadata ``{"edgexfer": {...}}``: backbone_sha256, classes, kind,
head_version, feature_dim, group, published_utc, metrics (the host validation figures, a JSON string:
canonical JSON has no floats), and what the device's health check verifies: golden_logits (the head's
logits on the bundle's golden reference features, ``{"encoding": "float32-le", "shape": [N, C],
"base64": …}``) and golden_features_sha256 (binds them to that golden set). The golden features come
from the bundle the devices run: a bundle source's own, else the ``bundle=`` argument (``--bundle``).
Devices pick the newest head_version for their backbone and refuse anything not newer than the highest
version they have accepted.

Signing backends: ``cryptography`` (pyca, constant-time; the default) or ``pure-python`` (the
reference Ed25519 implementation vendored by securesystemslib: not constant-time, so use it only on
a trusted machine that signs offline). Ed25519 is deterministic: both give identical signatures.
No pickle anywhere: keys and metadata are JSON.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import EdgexferError
from edgexfer.runtime.fsutil import file_sha256, write_atomic
from edgexfer.runtime.heads import Head
from edgexfer.runtime.manifest import check_relative_path
from edgexfer.runtime.optional import require
from edgexfer.runtime.updates import signed_golden

KEY_SCHEMA = "edgexfer.key/1"
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
ALL_ROLES = ("root", *ONLINE_ROLES)
#: default lifetimes; the timestamp is short so a device notices a frozen repository quickly
EXPIRY_DAYS = {"root": 365, "targets": 90, "snapshot": 30, "timestamp": 7}
SIGNER_BACKENDS = ("cryptography", "pure-python")
DEFAULT_GROUP = "canary"
ALL_GROUP = "all"
_GROUP_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class HeadsRepoError(EdgexferError):
    """The head update repository, a key or a head to publish is not usable."""


# ------------------------------------------------------------------------------------------------ keys
@dataclass(frozen=True)
class KeyFile:
    """An Ed25519 key on disk: JSON with the public key and the 32-byte private seed (hex)."""

    role: str
    public: str  #: hex, 32 bytes
    private: str  #: hex, 32-byte seed

    def public_key(self):
        """The securesystemslib ``SSlibKey`` (keyid = sha256 of the canonical public key)."""
        from securesystemslib.signer import SSlibKey
        from securesystemslib.signer._utils import compute_default_keyid

        keyval = {"public": self.public}
        return SSlibKey(compute_default_keyid("ed25519", "ed25519", keyval), "ed25519", "ed25519", keyval)

    def save(self, path: Path) -> None:
        data = {"schema": KEY_SCHEMA, "keytype": "ed25519", "role": self.role, "public": self.public,
                "private": self.private}
        path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o077)  # private key: owner only
        try:
            write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
            os.chmod(path, 0o600)
        finally:
            os.umask(old)

    @classmethod
    def load(cls, path: Path) -> KeyFile:
        try:
            obj = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise HeadsRepoError("key file not found", got=str(path), expected="a key written by `edgexfer heads keygen`",
                                 todo="pass the right --keys/--root-key path") from None
        except ValueError as exc:
            raise HeadsRepoError("key file is not JSON", got=f"{path}: {exc}", expected=KEY_SCHEMA,
                                 todo="restore the key from its backup") from None
        if not isinstance(obj, dict) or obj.get("schema") != KEY_SCHEMA or obj.get("keytype") != "ed25519":
            raise HeadsRepoError("key file has the wrong format", got=str(path), expected=f"schema {KEY_SCHEMA}, ed25519",
                                 todo="write keys with `edgexfer heads keygen`")
        for field in ("public", "private"):
            if not isinstance(obj.get(field), str) or not re.fullmatch(r"[0-9a-f]{64}", obj[field]):
                raise HeadsRepoError(f"key file field '{field}' is malformed", got=str(path), expected="64 hex digits",
                                     todo="restore the key from its backup")
        return cls(role=str(obj.get("role", "")), public=obj["public"], private=obj["private"])

    @classmethod
    def generate(cls, role: str) -> KeyFile:
        from securesystemslib._vendor.ed25519 import ed25519 as ref

        seed = os.urandom(32)
        # deriving the public key is a scalar multiplication of public data by the seed's hash; it
        # happens once per key, on the machine that creates it
        return cls(role=role, public=ref.publickey_unsafe(seed).hex(), private=seed.hex())


def _make_signer(key: KeyFile, backend: str):
    """A securesystemslib ``Signer`` for ``key``; ``backend`` is chosen by the caller, never guessed."""
    from securesystemslib.signer import Signature, Signer

    if backend not in SIGNER_BACKENDS:
        raise HeadsRepoError("unknown signing backend", got=repr(backend), expected=f"one of {SIGNER_BACKENDS}",
                             todo="pass --signer-backend cryptography or pure-python")
    seed = bytes.fromhex(key.private)
    public = key.public_key()
    if backend == "cryptography":
        ed = require("cryptography.hazmat.primitives.asymmetric.ed25519", "signing with the cryptography backend")
        private = ed.Ed25519PrivateKey.from_private_bytes(seed)

        def raw_sign(payload: bytes) -> bytes:
            return private.sign(payload)
    else:
        from securesystemslib._vendor.ed25519 import ed25519 as ref

        pub_bytes = bytes.fromhex(key.public)

        def raw_sign(payload: bytes) -> bytes:
            return ref.signature_unsafe(payload, seed, pub_bytes)

    class _FileKeySigner(Signer):
        @classmethod
        def from_priv_key_uri(cls, priv_key_uri, public_key, secrets_handler=None):
            raise HeadsRepoError("edgexfer key signers are made from key files", got=priv_key_uri,
                                 expected="a KeyFile", todo="use edgexfer.publish.KeyFile.load")

        @property
        def public_key(self):
            return public

        def sign(self, payload: bytes) -> Signature:
            return Signature(public.keyid, raw_sign(payload).hex())

    return _FileKeySigner()


def keygen(out: str | Path, role: str = "root", force: bool = False) -> dict[str, str]:
    """Write a new Ed25519 key file (mode 0600). For the root key, keep ``out`` offline."""
    out = Path(out)
    if role not in ALL_ROLES:
        raise HeadsRepoError("unknown role", got=repr(role), expected=f"one of {ALL_ROLES}", todo="pick a TUF role")
    if out.exists() and not force:
        raise HeadsRepoError("key file exists already", got=str(out), expected="a new path",
                             todo="choose another path (or --force to overwrite a key you no longer need)")
    key = KeyFile.generate(role)
    key.save(out)
    return {"path": str(out), "role": role, "keyid": key.public_key().keyid}


# ------------------------------------------------------------------------------------------------ repo
def _utc(days: float) -> datetime:
    return (datetime.now(timezone.utc) + timedelta(days=days)).replace(microsecond=0)


class HeadsRepo:
    """A TUF repository directory of head targets. Construct with :meth:`init` or :meth:`open`."""

    def __init__(self, repo_dir: str | Path, keys_dir: str | Path, *, signer_backend: str = "cryptography"):
        require("tuf", "publishing head updates")
        self.root_dir = Path(repo_dir)
        self.metadata_dir = self.root_dir / "metadata"
        self.targets_dir = self.root_dir / "targets"
        self.keys_dir = Path(keys_dir)
        self.signer_backend = signer_backend
        if self.keys_dir.resolve() == self.root_dir.resolve() or self.root_dir.resolve() in self.keys_dir.resolve().parents:
            raise HeadsRepoError("keys directory is inside the served repository", got=str(self.keys_dir),
                                 expected=f"a directory outside {self.root_dir}", todo="pass --keys elsewhere")

    # ----------------------------------------------------------------------- create / open
    @classmethod
    def init(cls, repo_dir: str | Path, keys_dir: str | Path, root_key: str | Path, *,
             signer_backend: str = "cryptography", expiry_days: dict[str, float] | None = None) -> HeadsRepo:
        """Create an empty repository: online keys in ``keys_dir``, root signed with ``root_key``."""
        from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

        repo = cls(repo_dir, keys_dir, signer_backend=signer_backend)
        if (repo.metadata_dir / "1.root.json").exists():
            raise HeadsRepoError("repository exists already", got=str(repo.metadata_dir), expected="an empty directory",
                                 todo="use `edgexfer heads publish` on it, or choose another --repo")
        days = {**EXPIRY_DAYS, **(expiry_days or {})}
        root_keyfile = KeyFile.load(Path(root_key))
        root = Root(expires=_utc(days["root"]), consistent_snapshot=True)
        root.add_key(root_keyfile.public_key(), "root")
        for role in ONLINE_ROLES:
            path = repo.keys_dir / f"{role}.key"
            key = KeyFile.load(path) if path.exists() else KeyFile.generate(role)
            if not path.exists():
                key.save(path)
            root.add_key(key.public_key(), role)
        repo.metadata_dir.mkdir(parents=True, exist_ok=True)
        repo.targets_dir.mkdir(parents=True, exist_ok=True)
        md_root = Metadata(root)
        md_root.sign(_make_signer(root_keyfile, signer_backend))
        repo._write(md_root, "root")
        repo._write_signed(Metadata(Targets(expires=_utc(days["targets"]))), "targets")
        repo._write_signed(Metadata(Snapshot(expires=_utc(days["snapshot"]))), "snapshot")
        repo._write_signed(Metadata(Timestamp(expires=_utc(days["timestamp"]))), "timestamp")
        return repo

    @classmethod
    def open(cls, repo_dir: str | Path, keys_dir: str | Path, *, signer_backend: str = "cryptography") -> HeadsRepo:
        repo = cls(repo_dir, keys_dir, signer_backend=signer_backend)
        if not (repo.metadata_dir / "timestamp.json").is_file():
            raise HeadsRepoError("not a heads repository", got=str(repo_dir), expected="metadata/timestamp.json inside",
                                 todo="create one with `edgexfer heads init`")
        return repo

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (two publishes must not both sign version N+1)."""
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.keys_dir / "repo.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ----------------------------------------------------------------------- metadata files
    def _versions(self, role: str) -> list[int]:
        return sorted(int(p.name.split(".")[0]) for p in self.metadata_dir.glob(f"*.{role}.json")
                      if p.name.split(".")[0].isdigit())

    def load(self, role: str):
        from tuf.api.metadata import Metadata

        if role == "timestamp":
            return Metadata.from_file(str(self.metadata_dir / "timestamp.json"))
        versions = self._versions(role)
        return Metadata.from_file(str(self.metadata_dir / f"{versions[-1]}.{role}.json"))

    def root_path(self, version: int | None = None) -> Path:
        """The root file devices bootstrap from (the first one; they walk the chain to the newest)."""
        return self.metadata_dir / f"{version or 1}.root.json"

    def _write(self, md, role: str) -> None:
        from tuf.api.serialization.json import JSONSerializer

        data = md.to_bytes(JSONSerializer(compact=False))
        name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        write_atomic(self.metadata_dir / name, data)

    def _signer(self, role: str):
        return _make_signer(KeyFile.load(self.keys_dir / f"{role}.key"), self.signer_backend)

    def _write_signed(self, md, role: str) -> None:
        md.signatures.clear()
        md.sign(self._signer(role))
        self._write(md, role)

    def _bump(self, md, role: str, expires_days: float | None = None) -> None:
        md.signed.version += 1
        md.signed.expires = _utc(EXPIRY_DAYS[role] if expires_days is None else expires_days)

    def commit_targets(self, targets_md, *, expiry_days: dict[str, float] | None = None) -> None:
        """Sign and write new targets, then the snapshot and timestamp that point to it (in that order)."""
        from tuf.api.metadata import MetaFile

        days = {**EXPIRY_DAYS, **(expiry_days or {})}
        self._bump(targets_md, "targets", days["targets"])
        self._write_signed(targets_md, "targets")
        snapshot = self.load("snapshot")
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets_md.signed.version)
        self._bump(snapshot, "snapshot", days["snapshot"])
        self._write_signed(snapshot, "snapshot")
        self.refresh_timestamp(days["timestamp"], snapshot_version=snapshot.signed.version)

    def resign_timestamp(self, days: float | None = None) -> int:
        """Re-sign the timestamp under the repository lock (cron, well within its expiry); its new version."""
        with self._locked():
            return self.refresh_timestamp(days)

    def refresh_timestamp(self, days: float | None = None, *, snapshot_version: int | None = None) -> int:
        """Re-sign the timestamp (callers hold the lock, or are alone); returns its new version."""
        from tuf.api.metadata import MetaFile

        ts = self.load("timestamp")
        if snapshot_version is None:
            snapshot_version = self._versions("snapshot")[-1]
        ts.signed.snapshot_meta = MetaFile(version=snapshot_version)
        self._bump(ts, "timestamp", days)
        self._write_signed(ts, "timestamp")
        return ts.signed.version

    # ----------------------------------------------------------------------- targets
    def heads(self) -> list[dict[str, Any]]:
        """Every head target with its custom metadata."""
        return list_heads(self.root_dir)

    def add_target(self, path: str, data: bytes, custom: dict[str, Any], *,
                   expiry_days: dict[str, float] | None = None) -> str:
        """Store ``data`` as target ``path`` (hash-prefixed file name) and sign new metadata.

        Low level: it checks only the path. :meth:`publish` validates the head first.
        """
        from tuf.api.metadata import TargetFile

        info = TargetFile.from_data(path, data, ["sha256"])
        info.unrecognized_fields["custom"] = {"edgexfer": custom}
        directory, _, name = path.rpartition("/")
        dest = self.targets_dir / directory / f"{info.hashes['sha256']}.{name}"
        with self._locked():
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(dest, data)
            targets = self.load("targets")
            targets.signed.targets[path] = info
            self.commit_targets(targets, expiry_days=expiry_days)
        return path

    def next_version(self, backbone_sha256: str) -> int:
        versions = [h.get("head_version", 0) for h in self.heads() if h.get("backbone_sha256") == backbone_sha256]
        # a bundle's own head is version 1 on the device, so updates start at 2
        return max([1, *versions]) + 1

    def publish(self, source: str | Path, *, group: str = DEFAULT_GROUP, backbone_sha256: str | None = None,
                bundle: str | Path | None = None, version: int | None = None, metrics: dict[str, Any] | None = None,
                expiry_days: dict[str, float] | None = None) -> dict[str, Any]:
        """Publish a head from a bundle dir, a run dir, or a head.safetensors.

        The head's logits on the golden reference features of the bundle devices run are signed with
        it: a bundle source's own golden set, or ``bundle`` (required for a run dir or a head file; its
        backbone must be the head's). A bare head file takes its backbone from ``bundle`` or from
        ``backbone_sha256``.
        """
        _check_group(group)
        golden_bundle = Bundle.open(bundle, verify=True) if bundle is not None else None
        if backbone_sha256 is None and golden_bundle is not None and Path(source).is_file():
            backbone_sha256 = golden_bundle.manifest.backbone.sha256
        head_path, sha, feature_dim, found_metrics, own_bundle = _head_source(Path(source), backbone_sha256)
        golden_bundle = golden_bundle or own_bundle
        if golden_bundle is None:
            raise HeadsRepoError("a run directory or head file needs the bundle the devices run",
                                 got=f"{source} without --bundle",
                                 expected="--bundle BUNDLE_DIR (its golden.npz: the head's logits on it are signed)",
                                 todo="pass the bundle installed on the devices, or publish from a bundle directory")
        if golden_bundle.manifest.backbone.sha256 != sha:
            raise HeadsRepoError("the bundle has another backbone than the head", got=f"bundle backbone "
                                 f"{golden_bundle.manifest.backbone.sha256[:16]}… ({golden_bundle.root})",
                                 expected=f"the head's backbone {sha[:16]}…",
                                 todo="pass the bundle the devices of this head run (same backbone.onnx)")
        head = Head.load(head_path, feature_dim=feature_dim or golden_bundle.manifest.backbone.feature_dim)
        signed = signed_golden(head, golden_bundle.golden()["features"])
        existing = [h for h in self.heads() if h.get("backbone_sha256") == sha]
        if version is None:
            version = self.next_version(sha)
        elif version < 2 or any(h.get("head_version") == version and h.get("group") == group for h in existing):
            raise HeadsRepoError("head version cannot be published", got=version,
                                 expected="an integer >= 2 not yet published for this backbone and group",
                                 todo=f"omit --version to get {self.next_version(sha)}")
        data = head_path.read_bytes()
        # TUF signs canonical JSON, which has no floats: metrics travel as one JSON string
        custom = {"backbone_sha256": sha, "classes": list(head.classes), "kind": head.kind, "head_version": version,
                  "feature_dim": head.feature_dim, "metrics": json.dumps({**found_metrics, **(metrics or {})}),
                  "group": group, **signed,
                  "published_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path = head_target_path(group, sha, version)
        self.add_target(path, data, custom, expiry_days=expiry_days)
        return {"target": path, **custom, "sha256": file_sha256(head_path), "bytes": len(data)}

    def promote(self, backbone_sha256: str, version: int, *, from_group: str = DEFAULT_GROUP,
                to_group: str = ALL_GROUP) -> dict[str, Any]:
        """Publish the exact bytes of ``from_group``'s head ``version`` under ``to_group`` (canary → all)."""
        _check_group(to_group)
        source = head_target_path(from_group, backbone_sha256, version)
        targets = self.load("targets")
        info = targets.signed.targets.get(source)
        if info is None:
            have = [h["path"] for h in self.heads() if h.get("backbone_sha256") == backbone_sha256]
            raise HeadsRepoError("nothing to promote", got=source, expected=f"one of {have}",
                                 todo="publish the head to the canary group first")
        directory, _, name = source.rpartition("/")
        data = (self.targets_dir / directory / f"{info.hashes['sha256']}.{name}").read_bytes()
        custom = {**info.custom["edgexfer"], "group": to_group, "promoted_from": from_group}
        path = head_target_path(to_group, backbone_sha256, version)
        self.add_target(path, data, custom)
        return {"target": path, **custom}

    # ----------------------------------------------------------------------- key rotation
    def rotate(self, role: str, root_key: str | Path) -> dict[str, Any]:
        """Replace the key of an online role: new root version (signed offline), role re-signed."""
        with self._locked():
            return self._rotate(role, root_key)

    def _rotate(self, role: str, root_key: str | Path) -> dict[str, Any]:
        if role not in ONLINE_ROLES:
            raise HeadsRepoError("only online roles rotate here", got=repr(role), expected=f"one of {ONLINE_ROLES}",
                                 todo="rotating the root key needs a ceremony with old and new root keys")
        root_keyfile = KeyFile.load(Path(root_key))
        root = self.load("root")
        if root_keyfile.public_key().keyid not in root.signed.roles["root"].keyids:
            raise HeadsRepoError("root key does not match the repository", got=str(root_key),
                                 expected="the offline root key this repository was created with",
                                 todo="pass the right --root-key")
        old_ids = list(root.signed.roles[role].keyids)
        new_key = KeyFile.generate(role)
        for keyid in old_ids:
            root.signed.revoke_key(keyid, role)
        root.signed.add_key(new_key.public_key(), role)
        self._bump(root, "root")
        root.signatures.clear()
        root.sign(_make_signer(root_keyfile, self.signer_backend))
        keypath = self.keys_dir / f"{role}.key"
        pending = self.keys_dir / f"{role}.key.new"
        # the new key is on disk before the root that trusts it, so a crash never strands the role
        new_key.save(pending)
        self._write(root, "root")
        if keypath.exists():
            os.replace(keypath, self.keys_dir / f"{role}.key.retired-{root.signed.version}")
        os.replace(pending, keypath)
        # re-sign with the new key so devices see metadata the new root trusts
        if role == "targets":
            self.commit_targets(self.load("targets"))
        elif role == "snapshot":
            snapshot = self.load("snapshot")
            self._bump(snapshot, "snapshot")
            self._write_signed(snapshot, "snapshot")
            self.refresh_timestamp(snapshot_version=snapshot.signed.version)
        else:
            self.refresh_timestamp()
        return {"role": role, "keyid": new_key.public_key().keyid, "root_version": root.signed.version,
                "retired": old_ids}


def list_heads(repo_dir: str | Path) -> list[dict[str, Any]]:
    """Every head target of a repository with its custom metadata (read-only: no keys needed)."""
    require("tuf", "listing head updates")
    from tuf.api.metadata import Metadata

    metadata_dir = Path(repo_dir) / "metadata"
    versions = sorted(int(p.name.split(".")[0]) for p in metadata_dir.glob("*.targets.json") if p.name.split(".")[0].isdigit())
    if not versions:
        raise HeadsRepoError("not a heads repository", got=str(repo_dir), expected="metadata/N.targets.json inside",
                             todo="create one with `edgexfer heads init`")
    targets = Metadata.from_file(str(metadata_dir / f"{versions[-1]}.targets.json")).signed
    out = []
    for path, info in sorted(targets.targets.items()):
        meta = dict(info.custom.get("edgexfer", {})) if isinstance(info.custom, dict) else {}
        out.append({"path": path, "length": info.length, "sha256": info.hashes.get("sha256"), **meta})
    return out


def head_target_path(group: str, backbone_sha256: str, version: int) -> str:
    return check_relative_path(f"heads/{group}/{backbone_sha256}/{int(version)}/head.safetensors", "target path")


def _check_group(group: str) -> None:
    if not _GROUP_RE.match(group):
        raise HeadsRepoError("group name is not usable", got=repr(group), expected="lowercase letters, digits, - and _",
                             todo="use e.g. canary or all")


def _head_source(source: Path, backbone_sha256: str | None) -> tuple[Path, str, int | None, dict[str, Any], Bundle | None]:
    """(head file, backbone sha256, feature_dim, metrics, the bundle itself) of a bundle dir, run dir or head file."""
    if source.is_dir() and (source / "manifest.json").is_file():
        bundle = Bundle.open(source, verify=True)
        m = bundle.manifest
        return bundle.head_path, m.backbone.sha256, m.backbone.feature_dim, dict(m.head.metrics), bundle
    if source.is_dir() and (source / "run.json").is_file():
        run = json.loads((source / "run.json").read_text())
        metrics: dict[str, Any] = {}
        if (source / "metrics.json").is_file():
            val = json.loads((source / "metrics.json").read_text()).get("val_accuracy")
            if isinstance(val, (int, float)):
                metrics["val_accuracy"] = float(val)
        bb = run.get("backbone", {})
        sha = bb.get("onnx_sha256") or file_sha256(source / "backbone.onnx")
        return source / "head.safetensors", sha, bb.get("feature_dim"), metrics, None
    if source.is_file():
        if source.suffix != ".safetensors":
            raise HeadsRepoError("only safetensors heads are published", got=source.name, expected="*.safetensors",
                                 todo="export the head with edgexfer (pickle and .pt files are never shipped)")
        if not backbone_sha256 or not _SHA_RE.match(backbone_sha256):
            raise HeadsRepoError("a bare head file needs its backbone", got=repr(backbone_sha256),
                                 expected="--bundle BUNDLE_DIR (or --backbone-sha <64 hex digits of backbone.onnx>)",
                                 todo="or publish from the bundle or run directory")
        return source, backbone_sha256, None, {}, None
    raise HeadsRepoError("nothing to publish", got=str(source),
                         expected="a bundle directory, a run directory or a head.safetensors",
                         todo="pass the output of `edgexfer export` or `edgexfer train`")
