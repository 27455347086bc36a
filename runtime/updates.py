"""Signed field updates of the head (The Update Framework, via ``tuf.ngclient``).

``update(state_dir, repo_url)`` (or ``local_dir=`` for a directory copied to an air-gapped device)
runs, under the state lock, the named steps below; ``EDGEXFER_CRASH_AT=update-<step>`` kills the
process right after that step (crash tests):

download      refresh the signed metadata (root chain, timestamp, snapshot, targets), pick the newest
              head for this device's backbone and group, fetch it into ``trust/staging/`` (ngclient
              checks its length and sha256 against the signed targets metadata)
verify        strict :meth:`Head.load` (safetensors only, exact tensors, shapes, finite values), the
              backbone and feature_dim, classes and kind as signed; the signed golden logits are
              present, well-formed, one column per class, and bound (sha256) to this bundle's golden
              features
stage         ``heads/<n>/`` written atomically as a *candidate* (not active)
switch        ``active.json`` points to the new head (atomic rename)
health-check  (1) the new head on the bundle's stored golden reference features reproduces the signed
              logits within the fp32 tolerance (head integrity); (2) the device's engine, at the
              device's precision, plus the new head reproduces them within that precision's tolerance
              (:func:`edgexfer.runtime.compare.tolerance_for`); (3) when the device's labelled
              holdout (the split ``retrain`` uses) has at least 20 samples: the new head is rolled back
              if it is significantly worse than the previous one there (one-sided exact McNemar test,
              p <= 0.05); with fewer, it is rolled back if it is more than 10 points less accurate on
              all the device's labelled samples; with none, no local comparison is made and the report
              says why (the publisher's signed validation figures stand)
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

import base64
import hashlib
import json
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.cache import FeatureCache
from edgexfer.runtime.compare import Output, compare, tolerance_for
from edgexfer.runtime.errors import EdgexferError, HeadError
from edgexfer.runtime.fsutil import PRIVATE_FILE, file_sha256, private_dir, write_atomic
from edgexfer.runtime.golden import golden_inputs
from edgexfer.runtime.heads import Head
from edgexfer.runtime.holdout import (
    ALPHA,
    MIN_HOLDOUT_SAMPLES,
    SMALL_SAMPLE_TOLERANCE,
    LocalSplit,
    accuracy_worse,
    correct,
    mcnemar_worse,
)
from edgexfer.runtime.manifest import check_relative_path
from edgexfer.runtime.optional import require
from edgexfer.runtime.state import ActiveState, DeviceState, crash_point
from edgexfer.runtime.timing import StepTimer

STEPS = ("download", "verify", "stage", "switch", "health-check", "commit")
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
        private_dir(self.dir)
        write_atomic(self.root_path, data, mode=PRIVATE_FILE)

    def _read(self, path: Path) -> dict[str, Any]:
        return json.loads(path.read_text()) if path.is_file() else {}

    def accepted(self, backbone: str) -> int:
        return int(self._read(self.accepted_path).get(backbone, {}).get("version", 1))

    def record_accepted(self, backbone: str, version: int, sha256: str) -> None:
        data = self._read(self.accepted_path)
        if version > int(data.get(backbone, {}).get("version", 0)):
            data[backbone] = {"version": version, "sha256": sha256,
                              "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            write_atomic(self.accepted_path, (json.dumps(data, indent=2) + "\n").encode(), mode=PRIVATE_FILE)

    def rejected(self) -> dict[str, Any]:
        return self._read(self.rejected_path)

    def record_rejected(self, sha256: str, target: str, reason: str) -> None:
        data = self._read(self.rejected_path)
        data[sha256] = {"target": target, "reason": reason, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_atomic(self.rejected_path, (json.dumps(data, indent=2) + "\n").encode(), mode=PRIVATE_FILE)


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


# -------------------------------------------------------------------------------------------- signed golden logits
#: how the golden logits are encoded in a target's custom metadata (canonical JSON has no floats)
LOGITS_ENCODING = "float32-le"


def golden_features_sha256(features: np.ndarray) -> str:
    """sha256 of golden features as row-major little-endian float32: what signed logits are bound to."""
    return hashlib.sha256(np.ascontiguousarray(features, dtype="<f4").tobytes()).hexdigest()


def encode_logits(logits: np.ndarray) -> dict[str, Any]:
    """``{"encoding": "float32-le", "shape": [N, C], "base64": …}`` (JSON without floats)."""
    arr = np.ascontiguousarray(logits, dtype="<f4")
    return {"encoding": LOGITS_ENCODING, "shape": [int(n) for n in arr.shape],
            "base64": base64.b64encode(arr.tobytes()).decode("ascii")}


def signed_golden(head: Head, golden_features: np.ndarray) -> dict[str, Any]:
    """What a publisher signs with ``head``: its logits on a bundle's golden reference features, and
    the sha256 of those features (so the logits are checked against that golden set only)."""
    features = np.asarray(golden_features, dtype=np.float32)
    return {"golden_features_sha256": golden_features_sha256(features),
            "golden_logits": encode_logits(head.logits(features))}


def _decode_logits(obj: Any) -> np.ndarray:
    """The signed logits as float32 ``[N, C]``; malformed metadata is an :class:`UpdateError`."""
    def malformed(problem: str) -> UpdateError:
        return UpdateError("signed golden logits are malformed", got=problem,
                           expected=f'{{"encoding": "{LOGITS_ENCODING}", "shape": [N, C], "base64": …}}',
                           todo="republish the head with `edgexfer heads publish`")

    if not isinstance(obj, dict) or obj.get("encoding") != LOGITS_ENCODING:
        raise malformed(f"encoding {obj.get('encoding') if isinstance(obj, dict) else type(obj).__name__!r}")
    shape = obj.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise malformed(f"shape {shape!r}")
    try:
        raw = base64.b64decode(str(obj.get("base64", "")), validate=True)
    except ValueError:  # binascii.Error
        raise malformed("no valid base64") from None
    if len(raw) != 4 * shape[0] * shape[1]:
        raise malformed(f"{len(raw)} bytes for shape {shape}")
    logits = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
    if not np.isfinite(logits).all():
        raise malformed("non-finite values")
    return logits


def expected_golden_logits(signed: dict[str, Any], golden_features: np.ndarray, num_classes: int) -> np.ndarray:
    """The logits the publisher signed, once they are known to be for this golden set and this head.

    Refused (one-line :class:`UpdateError`): no signed logits (a head published without them), logits
    bound to other golden features than this device's bundle holds, or a shape that does not fit.
    """
    missing = [k for k in ("golden_logits", "golden_features_sha256") if k not in signed]
    if missing:
        raise UpdateError("update carries no signed golden logits", got=f"no {' and no '.join(missing)}",
                          expected="golden_logits and golden_features_sha256 signed with the head",
                          todo="republish the head with this edgexfer's `heads publish` (it signs them)")
    here = golden_features_sha256(golden_features)
    if signed["golden_features_sha256"] != here:
        raise UpdateError("signed golden logits are for another golden set",
                          got=f"signed for golden features {str(signed['golden_features_sha256'])[:16]}…",
                          expected=f"this bundle's {here[:16]}…",
                          todo="publish with --bundle set to the bundle this device runs")
    logits = _decode_logits(signed["golden_logits"])
    if logits.shape != (len(golden_features), num_classes):
        raise UpdateError("signed golden logits do not fit", got=f"shape {list(logits.shape)}",
                          expected=f"[{len(golden_features)} golden images, {num_classes} classes]",
                          todo="republish the head with `edgexfer heads publish`")
    return logits


# -------------------------------------------------------------------------------------------- health
def health_check(state: DeviceState, active: ActiveState, candidate: int, *, backend: str = "auto",
                 precision: str = "fp32") -> tuple[bool, dict[str, Any], str]:
    """Judge the candidate head (active after the switch): ``(passed, figures, reason)``.

    1. integrity: the candidate on the bundle's stored golden reference features reproduces the signed
       logits within the fp32 tolerance;
    2. engine: this device's engine at ``precision`` plus the candidate reproduces them within that
       precision's tolerance (a broken engine or head fails; a head with more classes passes);
    3. local: the previous and the candidate head on the device's own labelled samples: with at least
       :data:`~edgexfer.runtime.holdout.MIN_HOLDOUT_SAMPLES` holdout samples the candidate fails if it is
       significantly worse there (one-sided exact McNemar test at :data:`~edgexfer.runtime.holdout.ALPHA`);
       with fewer, if it is more than :data:`~edgexfer.runtime.holdout.SMALL_SAMPLE_TOLERANCE` less
       accurate on all the labelled samples (a poisoned fleet head must not pass a device for want of a
       holdout); with no labelled sample, not compared.
    """
    from edgexfer.runtime.device import Device

    bundle = state.bundle(active.bundle)
    dim = bundle.manifest.backbone.feature_dim
    record = state.head_record(candidate)
    new = state.load_head(candidate, feature_dim=dim)
    golden = bundle.golden()
    figures: dict[str, Any] = {"publisher": {k: v for k, v in record.metrics.items() if k not in _DEVICE_KEYS}}
    try:
        expected = expected_golden_logits(record.metrics, golden["features"], len(new.classes))
    except UpdateError as exc:
        return False, figures, str(exc)
    figures["golden_features_sha256"] = record.metrics["golden_features_sha256"]
    failures: list[str] = []
    integrity = compare([Output("logits", expected, new.logits(golden["features"]), classes=True)],
                        tolerance_for("fp32"), where="new head on the golden reference features")
    figures["integrity"] = integrity.to_dict()
    failures += [f"signed logits not reproduced: {line.removeprefix('- ')}" for line in integrity.failures]

    with Device(state.root, backend=backend, precision=precision) as dev:
        engine = dev.engine(bundle)
        feats = engine.run(golden_inputs(bundle, golden))
        ran = {"backend": engine.name, "precision": engine.precision}
    on_engine = compare([Output("logits", expected, new.logits(feats), classes=True)], tolerance_for(ran["precision"]),
                        where=f"{ran['backend']}/{ran['precision']} engine and new head on the golden images")
    figures["engine"] = {**ran, **on_engine.to_dict()}
    failures += [f"signed logits not reproduced: {line.removeprefix('- ')}" for line in on_engine.failures]

    previous = state.load_head(active.previous_head, feature_dim=dim) if active.previous_head is not None else None
    local = _local_comparison(state, active, bundle, previous, new)
    figures["local"] = local
    if local.get("new_is_worse"):
        where = "holdout" if local.get("method") == "holdout" else "labelled samples"
        failures.append(f"new head worse on the local {where}: {local['reason']}")
    if failures:
        return False, figures, "; ".join(failures)
    return True, figures, f"health check passed; {local['reason']}"


def _local_comparison(state: DeviceState, active: ActiveState, bundle: Bundle, previous: Head | None,
                      new: Head) -> dict[str, Any]:
    """The previous and the new head on the device's own labelled samples.

    From :data:`MIN_HOLDOUT_SAMPLES` holdout samples on: McNemar's test on the holdout. Below that, on
    all the labelled samples (holdout and training), the new head failing if it is more than
    :data:`SMALL_SAMPLE_TOLERANCE` less accurate (:func:`~edgexfer.runtime.holdout.accuracy_worse`).
    """
    if previous is None:
        return {"compared": False, "holdout_count": 0,
                "reason": "local comparison skipped: no previous head to compare with"}
    with FeatureCache(state.cache_path) as cache:
        # the split retrain uses: the previous (active before the switch) head's classes first, default seed
        split = LocalSplit.of(*cache.labelled(active.bundle, bundle.preprocess.key()), previous.classes)
    hold = split.hold
    out: dict[str, Any] = {"holdout_count": int(len(hold)), "holdout_digest": split.digest,
                           "min_holdout_count": MIN_HOLDOUT_SAMPLES}
    if len(hold) >= MIN_HOLDOUT_SAMPLES:
        X, y = split.holdout_features, split.holdout_labels
        paired = mcnemar_worse(correct(previous, X, y), correct(new, X, y), ALPHA)
        return {**out, "compared": True, "method": "holdout", **paired.to_dict(), "reason": paired.describe()}
    if not split.labels:
        return {**out, "compared": False,
                "reason": "local comparison skipped: no labelled samples on the device; the publisher's signed "
                          "figures stand"}
    # too few held out for a test: a head much worse on the device's own samples is refused all the same
    X, y = split.features, split.labels
    few = accuracy_worse(correct(previous, X, y), correct(new, X, y), SMALL_SAMPLE_TOLERANCE)
    return {**out, "compared": True, "method": "all-samples", **few.to_dict(),
            "reason": f"{few.describe()} ({len(hold)} holdout samples < {MIN_HOLDOUT_SAMPLES})"}


# -------------------------------------------------------------------------------------------- update
def update(state_dir: str | Path | None, repo_url: str | None = None, *, local_dir: str | Path | None = None,
           group: str = ALL_GROUP, root: str | Path | None = None, backend: str = "auto",
           precision: str = "fp32") -> UpdateReport:
    """Fetch, verify, install and health-check the newest signed head for this device (see module doc)."""
    state = DeviceState(state_dir)
    trust = TrustStore(state)
    timer = StepTimer()  #: duration of each step
    with state.locked():
        recovered = _finish_interrupted(state, trust, backend=backend, precision=precision)
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
        private_dir(staging)
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
            head, signed = _verify(staged, meta, state, active)
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
            source_file=staged, metrics={**_metrics(meta), **signed, "update_version": version, "target": path,
                                         # what a failed health check restores, even after a crash
                                         "restore_previous_head": active.previous_head})
        shutil.rmtree(staging, ignore_errors=True)
        timer.lap("stage")
        crash_point("update-stage")

        state.activate_head(record.version)
        timer.lap("switch")
        crash_point("update-switch")

        report = _health_and_commit(state, trust, backend=backend, precision=precision)
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


#: what the device itself stores in an update head's record metrics, next to the publisher's figures
_DEVICE_KEYS = frozenset({"update_version", "target", "restore_previous_head", "golden_features_sha256",
                          "golden_logits"})


def _metrics(meta: dict[str, Any]) -> dict[str, Any]:
    """The publisher's figures: a JSON object encoded as a string (canonical JSON has no floats)."""
    try:
        value = json.loads(meta.get("metrics") or "{}")
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _verify(staged: Path, meta: dict[str, Any], state: DeviceState,
            active: ActiveState) -> tuple[Head, dict[str, Any]]:
    """The head, strictly loaded, and its signed golden expectation (checked against this bundle)."""
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
    signed = {k: meta[k] for k in ("golden_features_sha256", "golden_logits") if k in meta}
    expected_golden_logits(signed, bundle.golden()["features"], len(head.classes))
    return head, signed


def _health_and_commit(state: DeviceState, trust: TrustStore, *, backend: str, precision: str) -> UpdateReport:
    """Health-check the active candidate; commit it, or restore the previous pair and remember the refusal."""
    active = state.active()
    record = state.head_record(active.head)
    ok, figures, reason = health_check(state, active, active.head, backend=backend, precision=precision)
    crash_point("update-health-check")
    version = int(record.metrics.get("update_version", 0))
    target = record.metrics.get("target")
    if ok:
        state.set_head_status(active.head, "accepted")
        trust.record_accepted(active.bundle, version, record.sha256)
        crash_point("update-commit")
        return UpdateReport(status="updated", state=str(state.root), active_head=active.head,
                            previous_head=active.previous_head, update_version=version, target=target,
                            reason=reason, health=figures)
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
