"""The device side: predict, learn new samples, retrain the head, switch heads atomically.

Field learning never touches the backbone. ``learn`` stores each new sample with its features (one
transaction: a sample is confirmed with its features or not at all), running the backbone only for
samples the cache does not have. ``retrain`` fits a new head on cached features plus the bundle's
exemplars, warm-started from the active head, and activates it only if it is not worse than the active
head on a seeded holdout of the local samples (minus a tolerance); otherwise the candidate is kept as
rejected, with its figures.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.backends.base import AUTO_ORDER, EngineRunner, available_backends, open_backend
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.cache import DEFAULT_PER_CLASS_CAPACITY, FeatureCache, SampleRecord
from edgexfer.runtime.errors import BundleError, EdgexferError, InputError
from edgexfer.runtime.heads import Head
from edgexfer.runtime.manifest import write_atomic
from edgexfer.runtime.predictor import ImageInput, Prediction, Predictor, SampleError
from edgexfer.runtime.preprocess import decode_image, resize_to_spec, stack
from edgexfer.runtime.state import ActiveState, DeviceState, crash_point

#: default acceptance gate: the new head may be at most this much worse on the holdout
DEFAULT_TOLERANCE = 0.01
#: share of local labelled samples held out for the gate and for temperature calibration
DEFAULT_HOLDOUT = 0.25


def choose_backend(bundle: Bundle, backend: str = "auto", precision: str = "fp32") -> str:
    """``auto``: the first of :data:`AUTO_ORDER` that is installed and has an engine in the bundle."""
    if backend != "auto":
        return backend
    installed = set(available_backends())
    for name in AUTO_ORDER:
        if name not in installed:
            continue
        try:
            bundle.engine_file(name, precision)
            return name
        except BundleError:
            continue
    raise InputError("no usable backend for this bundle", got=f"installed: {', '.join(sorted(installed)) or 'none'}",
                     expected=f"one of {', '.join(AUTO_ORDER)} with a {precision} engine in the bundle",
                     todo="pip install 'edgexfer[onnxruntime]' or convert the bundle for an installed engine")


@dataclass(frozen=True)
class LearnReport:
    label: str
    added: int  #: samples newly confirmed in the cache
    already_known: int  #: samples the cache had (features reused)
    backbone_runs: int  #: images that went through the backbone
    errors: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RetrainReport:
    accepted: bool
    version: int
    active_head: int
    kind: str
    classes: list[str]
    holdout_count: int
    holdout_accuracy_new: float | None
    holdout_accuracy_old: float | None
    tolerance: float
    train_count: int
    exemplar_count: int
    frozen_classes: list[str]
    temperature: float | None
    seconds: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Device:
    """One device's state directory, opened for work."""

    def __init__(self, state_dir: str | Path | None = None, *, backend: str = "auto", precision: str = "fp32",
                 keep_images: bool = True, per_class_capacity: int | None = DEFAULT_PER_CLASS_CAPACITY):
        self.state = DeviceState(state_dir)
        self.backend_choice = backend
        self.precision = precision
        self.keep_images = keep_images
        self.per_class_capacity = per_class_capacity
        self._engine: EngineRunner | None = None
        self._engine_bundle: str | None = None

    # ---------------------------------------------------------------------------- plumbing
    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def cache(self) -> FeatureCache:
        return FeatureCache(self.state.cache_path, keep_images=self.keep_images,
                            per_class_capacity=self.per_class_capacity)

    def bundle(self) -> Bundle:
        return self.state.bundle()

    def engine(self, bundle: Bundle | None = None) -> EngineRunner:
        """The engine of ``bundle`` (default: the active one), reopened when the bundle changed."""
        bundle = bundle or self.bundle()
        sha = bundle.manifest.backbone.sha256
        if self._engine is not None and self._engine_bundle != sha:
            # another backbone was installed since: its features must never come from the old engine
            self.close()
        if self._engine is None:
            name = choose_backend(bundle, self.backend_choice, self.precision)
            self._engine = open_backend(name, bundle.engine_file(name, self.precision), precision=self.precision)
            self._engine_bundle = sha
        return self._engine

    def active_head(self, active: ActiveState | None = None) -> tuple[ActiveState, Head]:
        active = active or self.state.active()
        bundle = self.state.bundle(active.bundle)
        return active, self.state.load_head(active.head, feature_dim=bundle.manifest.backbone.feature_dim)

    # ---------------------------------------------------------------------------- install
    def install(self, bundle_dir: str | Path) -> dict[str, Any]:
        """Verify, copy and activate a bundle with its own head; recompute cached features if the backbone changed."""
        started = time.perf_counter()
        with self.state.locked():
            bundle, new = self.state.install_bundle(bundle_dir)
            m = bundle.manifest
            head = bundle.head()
            sha = m.backbone.sha256
            # reuse the head version if this very head was installed before (re-install is idempotent)
            version = None
            for v in self.state.head_versions():
                rec = self.state.head_record(v)
                if rec.source == "bundle" and rec.backbone_sha256 == sha and rec.sha256 == m.files["head.safetensors"].sha256:
                    version = v
            if version is None:
                version = self.state.add_head(head, backbone_sha256=sha, parent=None, status="accepted", source="bundle",
                                              metrics=dict(m.head.metrics), source_file=bundle.head_path).version
            try:
                previous = self.state.active()
            except EdgexferError:
                previous = None
            same_backbone = previous is not None and previous.bundle == sha
            # Re-installing the active pair changes nothing; rewriting it would set previous_head to the
            # active head itself and lose the rollback target.
            if not (same_backbone and previous.head == version):
                self.state.set_active(ActiveState(bundle=sha, head=version,
                                                  previous_head=previous.head if same_backbone else None))
        recomputed = self.recompute_features() if not same_backbone else 0
        return {"bundle": sha, "name": m.name, "head": version, "new_bundle": new, "recomputed_features": recomputed,
                "seconds": round(time.perf_counter() - started, 3)}

    def recompute_features(self) -> int:
        """Features for the active backbone of every stored sample that lacks them (images kept)."""
        bundle = self.bundle()
        spec = bundle.preprocess
        key = spec.key()
        with self.cache() as cache:
            todo = cache.samples_without_features(bundle.manifest.backbone.sha256, key)
            done = 0
            for start in range(0, len(todo), 16):
                chunk = [s for s in todo[start:start + 16] if cache.image(s) is not None]
                if not chunk:
                    continue
                pixels = stack([resize_to_spec(decode_image(cache.image(s), fill=spec.fill), spec) for s in chunk])
                feats = self.engine(bundle).run(pixels)
                cache.put_features(bundle.manifest.backbone.sha256, key, dict(zip(chunk, feats)))
                done += len(chunk)
        return done

    # ---------------------------------------------------------------------------- predict
    def predict(self, items: Sequence[ImageInput], top_k: int = 3) -> list[Prediction | SampleError]:
        active = self.state.active()  # read once: bundle and head of one consistent pair
        bundle = self.state.bundle(active.bundle)
        _, head = self.active_head(active)
        engine = self.engine(bundle)
        predictor = Predictor(bundle, engine, head, engine.name, self.precision, details=dict(engine.details))
        return predictor.predict(items, top_k=top_k)

    # ---------------------------------------------------------------------------- learn
    def learn(self, items: Sequence[ImageInput], label: str, source: str = "device") -> LearnReport:
        """Store labelled samples with their features; bad inputs are reported, good ones still learned."""
        if not isinstance(label, str) or not label.strip() or label != label.strip() or "/" in label:
            raise InputError("label", got=repr(label), expected="a non-empty class name without '/' or outer spaces")
        bundle = self.bundle()
        spec = bundle.preprocess
        backbone = bundle.manifest.backbone.sha256
        key = spec.key()
        errors: list[dict[str, str]] = []
        decoded: dict[str, tuple[bytes, str, Any]] = {}
        for i, item in enumerate(items):
            name = str(item) if isinstance(item, (str, os.PathLike)) else f"bytes[{i}]"
            try:
                data = Path(item).read_bytes() if isinstance(item, (str, os.PathLike)) else item
                if not isinstance(data, (bytes, bytearray)):
                    raise InputError("learn takes image files or encoded image bytes", got=type(item).__name__,
                                     expected="a path or bytes")
                img = decode_image(bytes(data), fill=spec.fill)
            except OSError as exc:
                errors.append({"source": name, "error": f"cannot read file | got {exc.strerror}"})
                continue
            except EdgexferError as exc:
                errors.append({"source": name, "error": str(exc)})
                continue
            decoded.setdefault(FeatureCache.content_sha256(bytes(data)), (bytes(data), name, img))
        with self.cache() as cache:
            shas = list(decoded)
            missing = set(cache.missing(backbone, key, shas))
            engine = self.engine(bundle)
            runs_before = engine.stats.images
            feats: dict[str, np.ndarray] = {}
            todo = [s for s in shas if s in missing]
            for start in range(0, len(todo), 16):
                chunk = todo[start:start + 16]
                out = engine.run(stack([resize_to_spec(decoded[s][2], spec) for s in chunk]))
                feats.update(zip(chunk, out))
            crash_point("learn-before-commit")
            # one transaction: the samples and their features are confirmed together or not at all
            with cache.transaction():
                kept = cache.add_samples([SampleRecord(s, label, f"{source}:{decoded[s][1]}", decoded[s][0]) for s in shas])
                kept_set = set(kept)
                cache.put_features(backbone, key, {s: f for s, f in feats.items() if s in kept_set})
            crash_point("learn-committed")
        return LearnReport(label=label, added=len(todo), already_known=len(shas) - len(todo),
                           backbone_runs=engine.stats.images - runs_before, errors=errors)

    # ---------------------------------------------------------------------------- retrain
    def retrain(self, *, kind: str | None = None, tolerance: float = DEFAULT_TOLERANCE,
                holdout: float = DEFAULT_HOLDOUT, seed: int = 0, C: float = 1.0) -> RetrainReport:
        """Train a candidate head on cached features and activate it if it passes the gate."""
        from edgexfer.runtime.head_training import HeadTrainer, fit_temperature

        started = time.perf_counter()
        with self.state.locked():
            active, old_head = self.active_head()
            bundle = self.state.bundle(active.bundle)
            kind = kind or old_head.kind
            with self.cache() as cache:
                _, X_local, labels_local = cache.labelled(active.bundle, bundle.preprocess.key())
            if len(labels_local) == 0:
                raise InputError("nothing to retrain on", got="no labelled samples for the installed backbone",
                                 expected="samples added with `edgexfer device learn`", todo="learn some samples first")
            classes = list(old_head.classes) + sorted(set(labels_local) - set(old_head.classes))
            y_local = np.array([classes.index(lbl) for lbl in labels_local], dtype=np.int64)
            train_idx, hold_idx = _holdout_split(y_local, holdout, seed)
            ex = bundle.exemplars()
            X_ex, y_ex = (ex if ex is not None else (np.zeros((0, X_local.shape[1]), np.float32), np.zeros(0, np.int64)))
            X_train = np.concatenate([X_ex, X_local[train_idx]])
            y_train = np.concatenate([y_ex, y_local[train_idx]])
            params: dict[str, Any] = {"seed": seed} if kind == "mlp" else {}
            if kind == "linear":
                # float32 products and a 1e-5 gradient tolerance: ~2.5x faster than the host's exact
                # settings, with weights within ~1e-3 of them (measured on 1,000 x 1,280 features)
                params = {"C": C, "tol": 1e-5, "matmul_dtype": "float32"}
            warm = old_head if (old_head.kind == kind) else None
            frozen: list[str] = []
            if kind == "linear" and warm is not None:
                # classes without local samples keep the bundle's row: the device has no evidence
                # about them beyond the exemplars the row was already trained on (and more)
                frozen = [c for c in old_head.classes if c not in set(labels_local)]
                params["frozen_classes"] = frozen
            candidate = HeadTrainer(kind, **params).fit(X_train, y_train, classes, warm_start=warm)
            acc_new = acc_old = None
            temperature = None
            if len(hold_idx):
                X_hold, y_hold = X_local[hold_idx], y_local[hold_idx]
                acc_new = float(np.mean(candidate.logits(X_hold).argmax(1) == y_hold))
                old_pred = np.array([classes.index(old_head.classes[j]) for j in old_head.logits(X_hold).argmax(1)])
                acc_old = float(np.mean(old_pred == y_hold))
                if len(hold_idx) >= 10:
                    temperature = fit_temperature(candidate.logits(X_hold), y_hold)
                    candidate = replace(candidate, temperature=temperature)
            accepted = acc_new is None or acc_new >= acc_old - tolerance
            reason = ("no holdout: accepted on training data alone" if acc_new is None else
                      f"holdout accuracy {acc_new:.3f} vs active {acc_old:.3f} (tolerance {tolerance:.3f})")
            metrics = {k: v for k, v in {"holdout_accuracy": acc_new, "holdout_accuracy_previous": acc_old,
                                         "holdout_count": len(hold_idx), "train_count": len(y_train)}.items() if v is not None}
            # "candidate" until the switch is done: a crash in between leaves a candidate that never ran
            record = self.state.add_head(candidate, backbone_sha256=active.bundle, parent=active.head,
                                         status="candidate" if accepted else "rejected", source="retrain",
                                         metrics=metrics)
            if accepted:
                self.state.activate_head(record.version)
                self.state.set_head_status(record.version, "accepted")
            report = RetrainReport(
                accepted=accepted, version=record.version, active_head=record.version if accepted else active.head,
                kind=kind, classes=classes, holdout_count=int(len(hold_idx)), holdout_accuracy_new=acc_new,
                holdout_accuracy_old=acc_old, tolerance=tolerance, train_count=int(len(y_train)),
                exemplar_count=int(len(y_ex)), frozen_classes=frozen, temperature=temperature,
                seconds=round(time.perf_counter() - started, 3), reason=reason)
            write_atomic(self.state.last_retrain_path, (json.dumps(report.to_dict(), indent=2) + "\n").encode())
            crash_point("retrain-done")
        return report

    def rollback(self) -> ActiveState:
        with self.state.locked():
            return self.state.rollback()

    # ---------------------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        active = self.state.active()
        bundle = self.state.bundle(active.bundle)
        record = self.state.head_record(active.head)
        with self.cache() as cache:
            counts = cache.counts()
            n_features = cache.features_count(active.bundle)
        last = json.loads(self.state.last_retrain_path.read_text()) if self.state.last_retrain_path.is_file() else None
        try:
            backend = choose_backend(bundle, self.backend_choice, self.precision)
        except EdgexferError as exc:
            backend = f"none ({exc.what})"
        return {
            "state": str(self.state.root),
            "bundle": {"name": bundle.manifest.name, "backbone_sha256": active.bundle, "arch": bundle.manifest.backbone.arch},
            "head": {"version": active.head, "previous": active.previous_head, "kind": record.kind,
                     "classes": record.classes, "source": record.source, "metrics": record.metrics},
            "backend": backend, "precision": self.precision,
            "cache": {"samples_per_class": counts, "features_for_backbone": n_features},
            "last_retrain": last,
        }

    def heads(self) -> list[dict[str, Any]]:
        active = self.state.active()
        out = []
        for v in self.state.head_versions():
            rec = asdict(self.state.head_record(v))
            rec["active"] = v == active.head
            out.append(rec)
        return out


def _holdout_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class holdout; a class with fewer than 3 samples stays entirely in training."""
    rng = np.random.default_rng(seed)
    train, hold = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_hold = int(round(len(idx) * fraction)) if len(idx) >= 3 else 0
        hold += list(idx[:n_hold])
        train += list(idx[n_hold:])
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(hold), dtype=np.int64)
