"""The device side: predict, learn new samples, retrain the head, switch heads atomically.

``Device`` is a facade over one state directory; the work is done where each concept lives.
Field learning never touches the backbone. ``learn`` streams its inputs through
:class:`edgexfer.runtime.learning.BatchLearner`: one transaction per batch, in which the per-class capacity
admits the samples, the backbone runs only for admitted samples the cache has no features of, and each
sample is confirmed with its features or not at all. ``retrain``
fits a new head on cached features plus the bundle's exemplars, warm-started from the active head, and
activates it only if :func:`edgexfer.runtime.holdout.retrain_gate` accepts it: not worse than the
active head on a seeded holdout of the local samples (minus a tolerance); otherwise the candidate is
kept as rejected, with its figures. The holdout is :class:`edgexfer.runtime.holdout.LocalSplit`, which
the update health check uses too: with the default seed and fraction both hold out the same samples.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgexfer.runtime.augment import DEFAULT_AUGMENT, MAX_AUGMENT
from edgexfer.runtime.backends.base import EngineRunner
from edgexfer.runtime.backends.registry import available_backends, backend_spec, choose_backend, open_backend
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.cache import DEFAULT_PER_CLASS_CAPACITY, FeatureCache
from edgexfer.runtime.drift import (
    DEFAULT_ALPHA,
    DEFAULT_PERMUTATIONS,
    DEFAULT_WINDOW,
    DriftReport,
    RecentInputs,
    check_recent,
)
from edgexfer.runtime.engine_store import EngineKey, EngineStore
from edgexfer.runtime.errors import EdgexferError, InputError
from edgexfer.runtime.features import cached_features
from edgexfer.runtime.field_accuracy import FieldLabels, estimated_accuracy
from edgexfer.runtime.golden import compare_golden
from edgexfer.runtime.heads import Head
from edgexfer.runtime.holdout import DEFAULT_HOLDOUT, DEFAULT_SEED, DEFAULT_TOLERANCE
from edgexfer.runtime.learning import BatchLearner, LearnReport, learn_inputs
from edgexfer.runtime.modalities import modality_of
from edgexfer.runtime.modalities.base import LazyValues
from edgexfer.runtime.names import DEFAULT_HEAD_POLICY
from edgexfer.runtime.predictor import ImageInput, Prediction, Predictor, SampleError
from edgexfer.runtime.review import ReviewQueue
from edgexfer.runtime.state import ActiveState, DeviceState, crash_point
from edgexfer.runtime.suggest import rank, uncertainty
from edgexfer.runtime.timing import StepTimer

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # retrain loads the trainers when it runs: predicting never needs them
    from edgexfer.runtime.retrain import RetrainReport

#: builds a TensorRT plan of ``bundle`` at ``precision`` into an empty directory; returns what it did.
#: ``edgexfer device install`` passes :func:`edgexfer.converters.to_tensorrt.build_device_engine` (the runtime
#: never imports the converters).
EngineBuilder = Callable[[Bundle, str, Path], dict[str, Any]]


def _engine_versions() -> dict[str, str]:
    """Versions of the engines installed here that build device engines (entries for others are stale)."""
    versions = {name: backend_spec(name).installed_version() for name in available_backends()}
    return {name: version for name, version in versions.items() if version is not None}


class Device:
    """One device's state directory, opened for work."""

    def __init__(self, state_dir: str | Path | None = None, *, backend: str = "auto", precision: str = "fp32",
                 keep_images: bool = True, per_class_capacity: int | None = DEFAULT_PER_CLASS_CAPACITY,
                 engine_builders: Mapping[str, EngineBuilder] | None = None):
        self.state = DeviceState(state_dir)
        self.engines = EngineStore(self.state.engines_dir)
        self.engine_builders = dict(engine_builders or {})
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
        """The engine of ``bundle`` (default: the active one), reopened when the bundle changed. Never builds."""
        bundle = bundle or self.bundle()
        content = str(bundle.root.resolve())
        if self._engine is not None and self._engine_bundle != content:
            # another bundle was installed since: its features must never come from the old engine
            self.close()
        if self._engine is None:
            name = self.choose_backend(bundle)
            model, options, _source = self._locate(bundle, name)
            self._engine = open_backend(name, model, precision=self.precision, **options)
            self._engine_bundle = content
        return self._engine

    # ---------------------------------------------------------------------------- engines on the device
    def engine_key(self, bundle: Bundle, name: str) -> EngineKey | None:
        """The cache key of ``name``'s engine on this device (None: the backend builds nothing here)."""
        return backend_spec(name).engine_key(self, bundle, self.precision)

    def choose_backend(self, bundle: Bundle) -> str:
        """Like :func:`choose_backend`, counting the engines this device has built or can build."""
        return choose_backend(bundle, self.backend_choice, self.precision,
                              lambda name: backend_spec(name).has_engine(self, bundle, self.precision))

    def _locate(self, bundle: Bundle, name: str) -> tuple[Path, dict[str, Any], str]:
        """Model file, backend options and where the engine comes from; builds nothing."""
        return backend_spec(name).locate(self, bundle, self.precision)

    def prepare_engine(self, bundle: Bundle) -> dict[str, Any]:
        """Build or pick the engine of ``bundle`` on this device, keyed so it is rebuilt only when something changed.

        The backend's spec does the work (:mod:`edgexfer.runtime.backends`): TensorRT builds its plan from
        the bundle's kit into ``engines/<key>/`` with the engine builder given for it; OpenVINO compiles its
        IR once into its model cache in ``engines/<key>/``; ONNX Runtime uses the bundle's model as it is.

        Call under the state lock. Returns backend, precision, key, whether it was built, and the source.
        """
        started = time.perf_counter()
        name = self.choose_backend(bundle)
        spec = backend_spec(name)
        key, done = spec.prepare(self, bundle, self.precision)
        crash_point("engine-ready")
        model, _options, source = spec.locate(self, bundle, self.precision)
        return {"backend": name, "precision": self.precision, "key": key.key if key else None,
                "built": bool(done.get("built")), "source": source, "model": model.name,
                "seconds": round(time.perf_counter() - started, 3),
                **{k: v for k, v in done.items() if k not in ("built", "seconds")}}

    def active_head(self, active: ActiveState | None = None) -> tuple[ActiveState, Head]:
        active = active or self.state.active()
        bundle = self.state.bundle(active.bundle)
        return active, self.state.load_head(active.head, feature_dim=bundle.manifest.backbone.feature_dim)

    # ---------------------------------------------------------------------------- install
    def install(self, bundle_dir: str | Path) -> dict[str, Any]:
        """Verify and copy a bundle, build or pick its engine, check the golden outputs, then activate it.

        Until the golden check passes nothing changes what is active: a failed build or check leaves the
        previous (bundle, head) pair serving, with only the inactive copy under ``bundles/`` (reused
        by the next install of the same bundle). A bundle with the backbone of an installed one but other
        files (a better head, a new engine or TensorRT kit) is installed as a new content of that backbone.
        """
        timer = StepTimer()
        with self.state.locked():
            bundle, new = self.state.install_bundle(bundle_dir)
            timer.lap("copy")
            engine = self.prepare_engine(bundle)
            timer.lap("engine")
            golden = compare_golden(bundle, self.engine(bundle), engine["backend"], self.precision)
            timer.lap("golden")
            crash_point("golden-checked")
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
            self.state.link_bundle(bundle)
            if not (same_backbone and previous.head == version):
                self.state.set_active(ActiveState(bundle=sha, head=version,
                                                  previous_head=previous.head if same_backbone else None))
            pruned = self.engines.prune(_engine_versions(), set(self.state.installed_backbones()))
            timer.lap("activate")
        recomputed = self.recompute_features() if not same_backbone else 0
        timer.lap("recompute")
        return {"bundle": sha, "name": m.name, "head": version, "new_bundle": new, "recomputed_features": recomputed,
                "engine": engine, "golden": golden, "pruned_engines": pruned, "steps": timer.seconds,
                "seconds": timer.total()}

    def recompute_features(self) -> int:
        """Features for the active backbone of every stored sample that lacks them (samples kept).

        Stored samples the bundle's modality does not read (another modality's, kept before this bundle
        was installed) are left as they are; the others are decoded only as the engine needs them.
        """
        bundle = self.bundle()
        modality = modality_of(bundle)
        backbone = bundle.manifest.backbone.sha256
        with self.cache() as cache:
            shas = [s for s in cache.samples_without_features(backbone, modality.preprocess.key())
                    if (data := cache.image(s)) is not None and modality.accepts_stored(data)]
            if not shas:  # nothing to do: the engine is not even opened
                return 0
            values = LazyValues(len(shas), lambda i: modality.stored_value(cache.image(shas[i])))
            _, report = cached_features(self.engine(bundle), cache, backbone, modality.preprocess, shas,
                                        progress=False, **modality.cached_args(values))
        return report.requested - report.from_cache

    # ---------------------------------------------------------------------------- predict
    def predict(self, items: Sequence[ImageInput], top_k: int = 3) -> list[Prediction | SampleError]:
        active = self.state.active()  # read once: bundle and head of one consistent pair
        bundle = self.state.bundle(active.bundle)
        _, head = self.active_head(active)
        engine = self.engine(bundle)
        predictor = Predictor(bundle, engine, head, engine.name, self.precision, details=dict(engine.details),
                              observer=self._recorder(bundle))
        return predictor.predict(items, top_k=top_k)

    def predict_texts(self, texts: Sequence[str], top_k: int = 3,
                      sources: Sequence[str] | None = None) -> list[Prediction | SampleError]:
        """Literal texts, with the active text bundle and head (``device predict --text``, stdin lines)."""
        active = self.state.active()
        bundle = self.state.bundle(active.bundle)
        _, head = self.active_head(active)
        engine = self.engine(bundle)
        predictor = Predictor(bundle, engine, head, engine.name, self.precision, details=dict(engine.details),
                              observer=self._recorder(bundle))
        return predictor.predict_texts(texts, top_k=top_k, sources=sources)

    def _recorder(self, bundle: Bundle) -> Callable[[np.ndarray, np.ndarray, list[str]], None]:
        """What keeps classified inputs' features for the drift test (:class:`~edgexfer.runtime.drift.RecentInputs`)."""
        backbone = bundle.manifest.backbone.sha256

        def record(features: np.ndarray, probs: np.ndarray, labels: list[str]) -> None:
            # a prediction never fails for its record: a read-only state or a full disk costs the drift test
            # these rows, with a warning
            try:
                with RecentInputs(self.state.cache_path) as recent:
                    recent.add(backbone, features, labels, np.max(probs, axis=1))
            except EdgexferError as exc:
                log.warning("the drift test's record of %d input(s) was not kept: %s", len(labels), exc)
        return record

    def drift(self, *, window: int = DEFAULT_WINDOW, alpha: float = DEFAULT_ALPHA,
              permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> DriftReport:
        """``device drift``: the latest ``window`` inputs against the active bundle's exemplars (:mod:`edgexfer.runtime.drift`)."""
        active = self.state.active()
        bundle = self.state.bundle(active.bundle)
        _, head = self.active_head(active)
        with RecentInputs(self.state.cache_path) as recent:
            return check_recent(recent, bundle, head, window=window, alpha=alpha, permutations=permutations, seed=seed)

    def suggest(self, items: Sequence[ImageInput] = (), *, k: int = 10, method: str = "suggested") -> list[dict[str, Any]]:
        """``device suggest``: the ``k`` samples most worth a label, best first (:mod:`edgexfer.runtime.suggest`).

        The candidates are ``items`` (files or their bytes), or the review queue's entries when none are given;
        the bundle's exemplars and the device's labelled samples count as covered.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError("k", got=repr(k), expected="a positive integer", todo="pass e.g. --k 10")
        active = self.state.active()
        bundle = self.state.bundle(active.bundle)
        _, head = self.active_head(active)
        engine = self.engine(bundle)
        if items:
            named = [(None, item) for item in items]
        else:
            with ReviewQueue(self.state.cache_path) as queue:
                named = [(e.id, queue.sample(e.id)[0]) for e in queue.entries(limit=1000)]
        kept: list[np.ndarray] = []
        predictor = Predictor(bundle, engine, head, engine.name, self.precision,
                              observer=lambda feats, probs, labels: kept.append(feats))
        results = predictor.predict([item for _, item in named])
        good = [i for i, r in enumerate(results) if isinstance(r, Prediction)]
        if not good:
            return []
        feats = np.concatenate(kept)
        covered = [bundle.exemplars()[0]] if bundle.exemplars() is not None else []
        with self.cache() as cache:
            _, local, _ = cache.labelled(active.bundle, modality_of(bundle).preprocess.key())
        if len(local):
            covered.append(local)
        order = rank(feats, head.probabilities(feats), k, method=method,
                     labelled=np.concatenate(covered) if covered else None)
        out = []
        for j in order:
            i = good[j]
            answer = results[i]
            out.append({"rank": len(out) + 1, "source": answer.source, "review_id": named[i][0],
                        "label": answer.label, "probability": round(answer.probability, 4),
                        "uncertainty": round(float(uncertainty(head.probabilities(feats[j:j + 1]))[0]), 4)})
        return out

    # ---------------------------------------------------------------------------- learn
    def learn(self, items: Iterable[ImageInput], label: str, source: str = "device", *,
              augment: int = DEFAULT_AUGMENT, texts: Sequence[str] = (),
              text_sources: Sequence[str] | None = None, batch_size: int | None = None,
              on_batch: Callable[[LearnReport], None] | None = None) -> LearnReport:
        """Store labelled samples with their features; bad inputs are reported, good ones still learned.

        ``items`` (files, their bytes, or directories, walked for the files the bundle's modality takes) are
        read lazily and learned one batch at a time (``batch_size``, default the modality's): each batch is
        one transaction in which the per-class capacity admits samples *before* the backbone runs, the
        backbone runs only for admitted samples the cache has no features of, and each sample is confirmed
        together with its features or not at all (:mod:`edgexfer.runtime.learning`). An interrupted call
        keeps its committed batches; the same call again skips them. ``on_batch`` gets the report so far
        after each committed batch. ``augment=K`` also stores K augmented views of each sample (mild crops
        and flips, :data:`~edgexfer.runtime.augment.AUGMENT_SETTINGS`, seeded by the sample's sha256: the
        same views every time), one backbone pass each, under
        :func:`~edgexfer.runtime.augment.view_key`; ``retrain`` trains on the views of training samples.

        With a text bundle ``items`` are text files (or their bytes), one sample each, and ``texts`` are
        literal texts, named ``text_sources[i]`` in the report (default ``text[i]``); the cache keeps a text
        sample's normalised UTF-8 text, so a new backbone can recompute its features. ``augment`` is
        refused for text.
        """
        if not isinstance(label, str) or not label.strip() or label != label.strip() or "/" in label:
            raise InputError("label", got=repr(label), expected="a non-empty class name without '/' or outer spaces")
        if isinstance(augment, bool) or not isinstance(augment, int) or not 0 <= augment <= MAX_AUGMENT:
            raise InputError("augment", got=repr(augment), expected=f"an integer 0..{MAX_AUGMENT} (views per image)",
                             todo="pass e.g. --augment 4, or 0 for none")
        bundle = self.bundle()
        modality = modality_of(bundle)
        if augment and not modality.augmentable:
            raise InputError(f"augment with a {modality.name} bundle", got=f"--augment {augment}",
                             expected="0: augmented views are crops and flips of images", todo="leave --augment out")
        if texts and not modality.takes_literals:
            raise InputError(f"texts given to an {modality.name} bundle", got=f"{len(texts)} text(s)",
                             expected=f"{modality.noun} files", todo="learn texts with a text bundle installed")
        inputs = learn_inputs(modality, items, texts, text_sources)
        with self.cache() as cache:
            learner = BatchLearner(lambda: self.engine(bundle), cache, modality, bundle.manifest.backbone.sha256,
                                   label, source, augment=augment, batch_size=batch_size,
                                   on_kept=self._judge(cache, bundle, label))
            return learner.run(inputs, self.per_class_capacity, on_batch)

    def _judge(self, cache: FeatureCache, bundle: Bundle, label: str) -> Callable[[list[str]], None]:
        """What keeps the active head's answer for each sample labelled now (:mod:`edgexfer.runtime.field_accuracy`)."""
        active, head = self.active_head()
        key = modality_of(bundle).preprocess.key()

        def judge(shas: list[str]) -> None:
            # learning never fails for its verdicts: a full disk costs the field accuracy these rows, with a warning
            try:
                feats = cache.get_features(bundle.manifest.backbone.sha256, key, shas)
                have = [sha for sha in shas if sha in feats]
                if have:
                    probs = head.probabilities(np.stack([feats[sha] for sha in have]))
                    with FieldLabels(self.state.cache_path) as verdicts:
                        verdicts.judge(have, label, probs, head.classes, active.head)
            except EdgexferError as exc:
                log.warning("the field accuracy's verdicts on %d sample(s) were not kept: %s", len(shas), exc)
        return judge

    # ---------------------------------------------------------------------------- retrain
    def retrain(self, *, kind: str | None = None, tolerance: float = DEFAULT_TOLERANCE,
                holdout: float = DEFAULT_HOLDOUT, seed: int = DEFAULT_SEED, C: float = 1.0,
                policy: str = DEFAULT_HEAD_POLICY) -> RetrainReport:
        """Train a candidate head on cached features and activate it if it passes the gate.

        Linear heads follow ``policy`` (:mod:`edgexfer.runtime.fewshot`): ``"fewshot"`` fits a
        class-balanced logistic head on the bundle's exemplars and the local samples, every row free,
        restores the active head's rows of classes without local samples, aligns the weight norms of
        device-only classes and blends their rows half-way with their class-mean direction (weight
        imprinting); ``"frozen"`` is the previous policy (rows of classes without local samples
        keep the active head's values); ``"auto"`` (default) is fewshot while the device-only classes have
        a median of fewer than :data:`~edgexfer.runtime.fewshot.FEWSHOT_MAX_SAMPLES` training samples. Classes with fewer than
        :data:`~edgexfer.runtime.holdout.MIN_SPLIT_SAMPLES` local samples are not split: all their
        samples train, and the gate judges them by leave-one-out. The steps are
        :func:`edgexfer.runtime.retrain.retrain_head`'s.
        """
        from edgexfer.runtime.retrain import RetrainSettings, retrain_head

        settings = RetrainSettings(kind=kind, tolerance=tolerance, holdout=holdout, seed=seed, C=C, policy=policy)
        started = time.perf_counter()
        with self.state.locked():
            return retrain_head(self.state, self.cache, settings, started=started)

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
        with FieldLabels(self.state.cache_path) as verdicts:
            field = verdicts.report()
        with RecentInputs(self.state.cache_path) as recent:
            _, _, confidences = recent.window(active.bundle, DEFAULT_WINDOW)
        last = json.loads(self.state.last_retrain_path.read_text()) if self.state.last_retrain_path.is_file() else None
        try:
            backend = self.choose_backend(bundle)
        except EdgexferError as exc:
            backend = f"none ({exc.what})"
        return {
            "state": str(self.state.root),
            "bundle": {"name": bundle.manifest.name, "backbone_sha256": active.bundle, "arch": bundle.manifest.backbone.arch},
            "head": {"version": active.head, "previous": active.previous_head, "kind": record.kind,
                     "classes": record.classes, "source": record.source, "metrics": record.metrics},
            "backend": backend, "precision": self.precision,
            "cache": {"samples_per_class": counts, "features_for_backbone": n_features},
            "engines": self.engines.entries(),
            "last_retrain": last,
            # labels given on site against the answers of the head active then; the label-free estimate of the
            # latest inputs beside it (an upper bound: runtime/field_accuracy.py)
            "field_accuracy": field,
            "estimated_accuracy": {"window": len(confidences), "mean_confidence": estimated_accuracy(confidences)},
            "warnings": self._warnings(),
        }

    def check_cache(self, *, repair: bool = False) -> dict[str, Any]:
        """Check the whole feature cache file: ``PRAGMA integrity_check`` and each label's member count.

        Opening the cache checks it (``quick_check``) only after an unclean shutdown
        (:mod:`edgexfer.runtime.cache_session`); this is the check on demand (``edgexfer device check-cache``).
        ``repair`` recounts the member counts, the one problem a check can repair.
        """
        started = time.perf_counter()
        repaired = 0
        if not self.state.cache_path.is_file():
            raise InputError("feature cache", got=f"no file {self.state.cache_path}", expected="a device state with a cache",
                             todo="check --state (the cache is made by install and learn)")
        with self.cache() as cache:
            result = cache.integrity_check()
            if repair and result.startswith("label_stats.members"):  # the pages are sound: only counts are off
                repaired = cache.repair_member_counts()
                result = cache.integrity_check()
        path = self.state.cache_path
        if result == "ok":
            todo = ""
        elif result.startswith("label_stats.members"):
            todo = "run edgexfer device check-cache --repair (it recounts each label's members)"
        else:
            todo = (f"move {path} aside with its -wal and -shm files (sqlite3 FILE .recover can salvage its rows); "
                    "a new empty cache is made on the next command, and samples not salvaged must be learned again")
        return {"path": str(path), "ok": result == "ok", "result": result, "todo": todo, "repaired": repaired,
                "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - started, 3)}

    def _warnings(self) -> list[str]:
        exposed = self.state.exposed()
        if not exposed:
            return []
        shown = ", ".join(exposed[:3]) + (f" and {len(exposed) - 3} more" if len(exposed) > 3 else "")
        return [f"device state readable by others | got {shown} | expected a 0700 directory with 0600 files "
                f"(it holds the site's images and heads) | chmod -R go-rwx {self.state.root}"]

    def heads(self) -> list[dict[str, Any]]:
        active = self.state.active()
        out = []
        for v in self.state.head_versions():
            rec = asdict(self.state.head_record(v))
            rec["active"] = v == active.head
            out.append(rec)
        return out

