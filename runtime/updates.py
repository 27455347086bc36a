"""Signed field updates of the head (The Update Framework, via ``tuf.ngclient``).

``update(state_dir, repo_url)`` (or ``local_dir=`` for a directory copied to an air-gapped device)
runs, under the state lock, the named steps below; ``EDGEXFER_CRASH_AT=update-<step>`` kills the
process right after that step (crash tests):

download      refresh the signed metadata (root chain, timestamp, snapshot, targets), pick the newest
              head for this device's backbone and group, fetch it into ``trust/staging/`` (ngclient
              checks its length and sha256 against the signed targets metadata)
verify        strict :meth:`Head.load` (safetensors only, exact tensors, shapes, finite values), the
              backbone and feature_dim, classes and kind as signed
stage         ``heads/<n>/`` written atomically as a *candidate* (not active)
switch        ``active.json`` points to the new head (atomic rename)
health-check  the bundle's golden images through the engine and the new head; the local holdout when
              there is one; the new head must not be worse than the old one by more than a tolerance
commit        the head is marked accepted and its update version stored in ``trust/accepted.json``
              (anti-rollback); on failure the old active pair is restored and the head's sha256 is
              recorded in ``trust/rejected.json`` so it is never tried again

A crash between switch and commit leaves the new head active as a candidate; the next ``update``
finishes the health check first (commit or roll back). Trust material lives in ``state/trust/``:
``root.json`` (bootstrapped once from a root file the operator passes, then rotated by TUF itself),
``timestamp.json``, ``snapshot.json``, ``targets.json`` (the last verified metadata, for TUF's own
rollback protection), ``accepted.json`` and ``rejected.json``.
"""
from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from edgexfer.runtime.bundle import file_sha256
from edgexfer.runtime.errors import EdgexferError, HeadError
from edgexfer.runtime.heads import Head
from edgexfer.runtime.manifest import check_relative_path, write_atomic
from edgexfer.runtime.optional import require
from edgexfer.runtime.state import ActiveState, DeviceState, crash_point
from edgexfer.runtime.timing import StepTimer

STEPS = ("download", "verify", "stage", "switch", "health-check", "commit")
#: the new head may be at most this much worse than the active one (golden and holdout accuracy)
DEFAULT_TOLERANCE = 0.05
ALL_GROUP = "all"
TARGET_SUFFIX = "/head.safetensors"
#: a head is tens of kilobytes; anything far larger is not a head
MAX_HEAD_BYTES = 64 * 1024 * 1024


class UpdateError(EdgexferError):
    """A field update was refused (signatures, expiry, payload, health) or cannot be fetched."""


@dataclass
class UpdateReport:
    status: str  #: updated | up-to-date | rejected | rolled-back | recovered
    state: str
    active_head: int
    previous_head: int | None = None
    update_version: int | None = None  #: the publisher's head version that was considered
    target: str | None = None
    reason: str = ""
    health: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -------------------------------------------------------------------------------------------- trust
class TrustStore:
    """``state/trust/``: the TUF metadata directory plus edgexfer's anti-rollback records."""

    def __init__(self, state: DeviceState):
        self.dir = state.trust_dir
        self.root_path = self.dir / "root.json"
        self.accepted_path = self.dir / "accepted.json"
        self.rejected_path = self.dir / "rejected.json"
        self.staging_dir = self.dir / "staging"

    def bootstrap(self, root_file: str | Path | None) -> None:
        """Install the first trusted root; later roots come only through TUF's signed chain."""
        if self.root_path.is_file():
            return
        if root_file is None:
            raise UpdateError("this device has no update trust root yet", got=f"no {self.root_path}",
                              expected="--root ROOT_JSON the first time (the repository's 1.root.json)",
                              todo="copy the root file from the publisher over a trusted channel and pass --root")
        data = Path(root_file).read_bytes()
        try:
            obj = json.loads(data)
            ok = obj["signed"]["_type"] == "root"
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise UpdateError("trust root file is not TUF root metadata", got=str(root_file), expected="1.root.json",
                              todo="pass the repository's metadata/1.root.json")
        write_atomic(self.root_path, data)

    def _read(self, path: Path) -> dict[str, Any]:
        return json.loads(path.read_text()) if path.is_file() else {}

    def accepted(self, backbone: str) -> int:
        return int(self._read(self.accepted_path).get(backbone, {}).get("version", 1))

    def record_accepted(self, backbone: str, version: int, sha256: str) -> None:
        data = self._read(self.accepted_path)
        if version > int(data.get(backbone, {}).get("version", 0)):
            data[backbone] = {"version": version, "sha256": sha256,
                              "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            write_atomic(self.accepted_path, (json.dumps(data, indent=2) + "\n").encode())

    def rejected(self) -> dict[str, Any]:
        return self._read(self.rejected_path)

    def record_rejected(self, sha256: str, target: str, reason: str) -> None:
        data = self._read(self.rejected_path)
        data[sha256] = {"target": target, "reason": reason, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_atomic(self.rejected_path, (json.dumps(data, indent=2) + "\n").encode())


# -------------------------------------------------------------------------------------------- fetching
def _local_fetcher(root: Path):
    """A ``tuf.ngclient`` fetcher that reads ``file://`` URLs under ``root`` only (air-gapped copies)."""
    from tuf.api.exceptions import DownloadHTTPError
    from tuf.ngclient import FetcherInterface

    base = root.resolve()

    class _DirFetcher(FetcherInterface):
        def _fetch(self, url: str):
            parsed = urlparse(url)
            path = Path(unquote(parsed.path)).resolve()
            if parsed.scheme != "file" or base not in path.parents:
                raise DownloadHTTPError(f"{url} is outside {base}", 403)
            if not path.is_file():
                raise DownloadHTTPError(f"{url} not found", 404)
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 16):
                    yield chunk

    return _DirFetcher()


def _updater(trust: TrustStore, repo_url: str | None, local_dir: str | Path | None):
    require("tuf", "signed head updates")
    from tuf.ngclient import Updater, UpdaterConfig

    if (repo_url is None) == (local_dir is None):
        raise UpdateError("say where updates come from", got=f"repo_url={repo_url!r}, local_dir={local_dir!r}",
                          expected="exactly one of --repo URL and --dir DIR", todo="pass one of them")
    fetcher = None
    if local_dir is not None:
        root = Path(local_dir)
        if not (root / "metadata").is_dir():
            raise UpdateError("update directory has no metadata", got=str(root), expected="DIR/metadata and DIR/targets",
                              todo="copy the whole repository directory")
        base = root.resolve().as_uri()
        fetcher = _local_fetcher(root)
    else:
        parsed = urlparse(repo_url)
        if parsed.scheme not in ("http", "https"):
            raise UpdateError("update repository URL", got=repr(repo_url), expected="http(s)://HOST[:PORT]/PATH",
                              todo="use --dir for a local copy")
        base = repo_url.rstrip("/")
    config = UpdaterConfig(max_root_rotations=64, targets_max_length=MAX_HEAD_BYTES)
    return Updater(metadata_dir=str(trust.dir), metadata_base_url=f"{base}/metadata/",
                   target_base_url=f"{base}/targets/", target_dir=str(trust.staging_dir), fetcher=fetcher,
                   config=config, bootstrap=None)


def _tuf_error(step: str, exc: Exception) -> UpdateError:
    # ngclient wraps network failures in exceptions whose own text can be empty: show the cause then
    text = str(exc).strip() or str(exc.__cause__ or exc.__context__ or "").strip() or repr(exc)
    return UpdateError(f"update refused at {step}: {type(exc).__name__}", got=text.splitlines()[0][:200],
                       expected="metadata and targets signed by the trusted keys, unexpired, and intact",
                       todo="check the repository (timestamp expiry, keys) and the network; the active head is unchanged")


# -------------------------------------------------------------------------------------------- health
def health_check(state: DeviceState, active: ActiveState, candidate: int, *, backend: str = "auto",
                 precision: str = "fp32", tolerance: float = DEFAULT_TOLERANCE) -> tuple[bool, dict[str, Any], str]:
    """Compare the candidate head with the previous one on golden images (engine run) and the holdout."""
    from edgexfer.runtime.device import Device
    from edgexfer.runtime.holdout import DEFAULT_HOLDOUT, DEFAULT_SEED, holdout_split

    bundle = state.bundle(active.bundle)
    dim = bundle.manifest.backbone.feature_dim
    new = state.load_head(candidate, feature_dim=dim)
    old = state.load_head(active.previous_head, feature_dim=dim) if active.previous_head is not None else None
    golden = bundle.golden()
    with Device(state.root, backend=backend, precision=precision) as dev:
        feats = dev.engine(bundle).run(golden["images"])
    figures: dict[str, Any] = {"golden_count": int(len(feats))}
    problems: list[str] = []
    ref_classes = list(bundle.manifest.head.classes)
    truth = np.array([ref_classes[i] for i in golden["labels"]])

    def accuracy(head: Head, X: np.ndarray, y: np.ndarray) -> float:
        logits = head.logits(X)
        if not np.all(np.isfinite(logits)):
            problems.append("non-finite logits")
            return 0.0
        return float(np.mean(np.array(head.classes)[logits.argmax(1)] == y))

    figures["golden_accuracy"] = accuracy(new, feats, truth)
    if old is not None:
        figures["golden_accuracy_previous"] = accuracy(old, feats, truth)
        if figures["golden_accuracy"] < figures["golden_accuracy_previous"] - tolerance:
            problems.append(f"golden accuracy {figures['golden_accuracy']:.3f} < previous "
                            f"{figures['golden_accuracy_previous']:.3f} - {tolerance}")
    with Device(state.root) as dev, dev.cache() as cache:
        _, X_local, labels = cache.labelled(active.bundle, bundle.preprocess.key())
    if len(labels):
        y = np.array(labels)
        # still alphabetical here (retrain puts the active head's classes first): the next change aligns it
        _, hold = holdout_split(labels, sorted(set(labels)), DEFAULT_HOLDOUT, DEFAULT_SEED)
        if len(hold):
            figures["holdout_count"] = int(len(hold))
            figures["holdout_accuracy"] = accuracy(new, X_local[hold], y[hold])
            if old is not None:
                figures["holdout_accuracy_previous"] = accuracy(old, X_local[hold], y[hold])
                if figures["holdout_accuracy"] < figures["holdout_accuracy_previous"] - tolerance:
                    problems.append(f"holdout accuracy {figures['holdout_accuracy']:.3f} < previous "
                                    f"{figures['holdout_accuracy_previous']:.3f} - {tolerance}")
    return not problems, figures, "; ".join(problems) or "ok"


# -------------------------------------------------------------------------------------------- update
def update(state_dir: str | Path | None, repo_url: str | None = None, *, local_dir: str | Path | None = None,
           group: str = ALL_GROUP, root: str | Path | None = None, backend: str = "auto", precision: str = "fp32",
           tolerance: float = DEFAULT_TOLERANCE) -> UpdateReport:
    """Fetch, verify, install and health-check the newest signed head for this device (see module doc)."""
    state = DeviceState(state_dir)
    trust = TrustStore(state)
    timer = StepTimer()  #: duration of each step
    with state.locked():
        recovered = _finish_interrupted(state, trust, backend=backend, precision=precision, tolerance=tolerance)
        active = state.active()
        trust.bootstrap(root)
        updater = _updater(trust, repo_url, local_dir)
        try:
            updater.refresh()
            updater.get_targetinfo("heads/.load")  # loads and verifies the top-level targets metadata
        except Exception as exc:  # tuf raises RepositoryError / DownloadError subclasses and ValueError
            raise _tuf_error("download", exc) from None
        from tuf.api.metadata import Metadata

        targets = Metadata.from_file(str(trust.dir / "targets.json")).signed.targets  # as verified just now
        pick, skipped = _choose(targets, active.bundle, group, trust)
        if pick is None:
            report = UpdateReport(status=recovered or "up-to-date", state=str(state.root), active_head=active.head,
                                  previous_head=active.previous_head, reason="no newer head for this backbone",
                                  skipped=skipped)
            report.seconds = {"total": timer.total()}
            return report
        path, meta = pick
        version = int(meta["head_version"])
        shutil.rmtree(trust.staging_dir, ignore_errors=True)
        staging = trust.staging_dir / uuid.uuid4().hex
        staging.mkdir(parents=True)
        staged = staging / "head.safetensors"
        try:
            info = updater.get_targetinfo(path)
            if info is None:
                raise UpdateError("target vanished between listing and fetching", got=path, expected="the listed target")
            updater.download_target(info, filepath=str(staged))
        except UpdateError:
            raise
        except Exception as exc:
            raise _tuf_error("download", exc) from None
        timer.lap("download")
        crash_point("update-download")

        sha = file_sha256(staged)
        base = UpdateReport(status="rejected", state=str(state.root), active_head=active.head,
                            previous_head=active.previous_head, update_version=version, target=path, skipped=skipped)
        try:
            head = _verify(staged, meta, state, active)
        except EdgexferError as exc:
            trust.record_rejected(sha, path, str(exc))
            shutil.rmtree(staging, ignore_errors=True)
            base.reason = str(exc)
            base.seconds = timer.with_total()
            return base
        timer.lap("verify")
        crash_point("update-verify")

        record = _staged_before(state, sha, active.bundle) or state.add_head(
            head, backbone_sha256=active.bundle, parent=active.head, status="candidate", source="update",
            source_file=staged, metrics={**_metrics(meta), "update_version": version, "target": path,
                                         # what a failed health check restores, even after a crash
                                         "restore_previous_head": active.previous_head})
        shutil.rmtree(staging, ignore_errors=True)
        timer.lap("stage")
        crash_point("update-stage")

        state.activate_head(record.version)
        timer.lap("switch")
        crash_point("update-switch")

        report = _health_and_commit(state, trust, backend=backend, precision=precision, tolerance=tolerance)
        report.skipped = skipped
        timer.lap("health-check+commit")
        report.seconds = timer.with_total()
        return report


def _choose(targets: dict[str, Any], backbone: str, group: str, trust: TrustStore):
    """The newest acceptable head target for ``backbone`` in ``group`` or ``all``; and what was skipped why."""
    accepted = trust.accepted(backbone)
    rejected = trust.rejected()
    skipped: list[dict[str, Any]] = []
    best = None
    for path, info in targets.items():
        custom = info.custom.get("edgexfer") if isinstance(info.custom, dict) else None
        if not isinstance(custom, dict):
            continue
        try:
            check_relative_path(path, "target path")
        except EdgexferError:
            skipped.append({"target": path, "reason": "path is not a plain relative path"})
            continue
        if not (path.startswith("heads/") and path.endswith(TARGET_SUFFIX)):
            skipped.append({"target": path, "reason": "not a heads/…/head.safetensors target"})
            continue
        if custom.get("backbone_sha256") != backbone or custom.get("group") not in (group, ALL_GROUP):
            continue  # another device's head: not an error
        version = custom.get("head_version")
        if not isinstance(version, int) or isinstance(version, bool):
            skipped.append({"target": path, "reason": "head_version is not an integer"})
            continue
        if version <= accepted:
            skipped.append({"target": path, "reason": f"version {version} <= accepted {accepted}"})
            continue
        if info.hashes.get("sha256") in rejected:
            skipped.append({"target": path, "reason": "rejected before: " + rejected[info.hashes["sha256"]]["reason"][:120]})
            continue
        if best is None or version > best[1]["head_version"]:
            best = (path, custom)
    return best, skipped


def _staged_before(state: DeviceState, sha256: str, backbone: str):
    """A candidate of this very file left by an update killed after staging: reuse it, don't stage twice."""
    for version in state.head_versions():
        rec = state.head_record(version)
        if (rec.source, rec.status, rec.sha256, rec.backbone_sha256) == ("update", "candidate", sha256, backbone):
            return rec
    return None


def _metrics(meta: dict[str, Any]) -> dict[str, Any]:
    """The publisher's figures: a JSON object encoded as a string (canonical JSON has no floats)."""
    try:
        value = json.loads(meta.get("metrics") or "{}")
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _verify(staged: Path, meta: dict[str, Any], state: DeviceState, active: ActiveState) -> Head:
    bundle = state.bundle(active.bundle)
    dim = bundle.manifest.backbone.feature_dim
    with open(staged, "rb") as fh:
        magic = fh.read(2)
    if magic[:1] == b"\x80" or magic == b"PK":
        raise UpdateError("update payload is a pickle or a zip (.pt) file", got=repr(magic),
                          expected="safetensors", todo="publish heads exported by edgexfer; pickles are never loaded")
    head = Head.load(staged, feature_dim=dim)
    if list(head.classes) != list(meta.get("classes", [])) or head.kind != meta.get("kind"):
        raise HeadError("head file differs from its signed description", got=f"{head.kind} {list(head.classes)[:4]}…",
                        expected=f"{meta.get('kind')} {list(meta.get('classes', []))[:4]}…", todo="republish the head")
    return head


def _health_and_commit(state: DeviceState, trust: TrustStore, *, backend: str, precision: str,
                       tolerance: float) -> UpdateReport:
    """Health-check the active candidate; commit it, or restore the previous pair and remember the refusal."""
    active = state.active()
    record = state.head_record(active.head)
    ok, figures, reason = health_check(state, active, active.head, backend=backend, precision=precision,
                                       tolerance=tolerance)
    crash_point("update-health-check")
    version = int(record.metrics.get("update_version", 0))
    target = record.metrics.get("target")
    if ok:
        state.set_head_status(active.head, "accepted")
        trust.record_accepted(active.bundle, version, record.sha256)
        crash_point("update-commit")
        return UpdateReport(status="updated", state=str(state.root), active_head=active.head,
                            previous_head=active.previous_head, update_version=version, target=target,
                            reason="health check passed", health=figures)
    state.set_active(ActiveState(bundle=active.bundle, head=active.previous_head,
                                 previous_head=record.metrics.get("restore_previous_head")))
    state.set_head_status(active.head, "rejected")
    trust.record_rejected(record.sha256, str(target), f"health check failed: {reason}")
    return UpdateReport(status="rolled-back", state=str(state.root), active_head=active.previous_head,
                        update_version=version, target=target, reason=f"health check failed: {reason}", health=figures)


def _finish_interrupted(state: DeviceState, trust: TrustStore, **kw) -> str | None:
    """An update killed between switch and commit left its head active as a candidate: finish it."""
    try:
        active = state.active()
        record = state.head_record(active.head)
    except EdgexferError:
        return None
    if record.source != "update":
        return None
    if record.status == "candidate":
        report = _health_and_commit(state, trust, **kw)
        return "recovered" if report.status == "updated" else "rolled-back"
    if record.status == "accepted":  # killed between status and accepted.json
        trust.record_accepted(active.bundle, int(record.metrics.get("update_version", 0)), record.sha256)
    return None
