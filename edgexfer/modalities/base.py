"""The contract of a host modality: what :mod:`edgexfer.train`, :mod:`edgexfer.export`, :mod:`edgexfer.evaluate`
and the fleet ask of the kind of input a backbone reads. No torch here; a modality imports it inside methods.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.modalities import modality_named


@dataclass
class LabelledData:
    """A labelled training set as the trainer reads it, whatever its samples are."""

    classes: Sequence[str]  #: class names; label i is classes[i]
    labels: np.ndarray  #: int64 label of every kept sample
    shas: list[str]  #: every kept sample's identity (the feature cache's key)
    skipped: list[tuple[str, str]]  #: (path or source, reason) of what was left out
    root: Path  #: the data set's folder or file (run.json's data_root)
    spec: Any  #: preprocessing key of the cached features (PreprocessSpec, TextSpec)
    preprocess: dict[str, Any]  #: run.json's "preprocess"
    samples: Any  #: the modality's own view of the samples (decoded images, texts)
    summary: str  #: what the last progress line says was left out
    header: dict[str, Any] = field(default_factory=dict)  #: first keys of run.json and metrics.json
    metrics_extra: dict[str, Any] = field(default_factory=dict)  #: metrics.json keys after the extraction counts
    run_extra: dict[str, Any] = field(default_factory=dict)  #: run.json keys after val_accuracy


@dataclass
class EvaluationSet:
    """A labelled data set as ``edgexfer eval`` reads it."""

    root: str  #: the data set's folder or file
    classes: Sequence[str]  #: its class names
    items: list[tuple[str, str, Any]]  #: (source, class name, what the predictor takes) of every sample
    skipped: list[dict[str, str]] = field(default_factory=list)  #: {"path", "reason"} left out while reading


class HostModality:
    """One kind of input on the host. Subclasses set the class attributes and implement the methods."""

    name = ""  #: the runtime's modality name (backbone config and manifest ``modality``)
    layer_noun = "block"  #: what ``--unfreeze N`` counts ("block", "layer")
    default_backbone = ""  #: what ``train`` uses when no --backbone is given
    catch_all = False  #: a data set no other modality claims is this one's
    #: extraction facts (see edgexfer.train) that metrics.json carries
    metrics_keys: tuple[str, ...] = ("selection",)
    bundle_files: tuple[str, ...] = ()  #: run files a bundle ships besides backbone.onnx and the head
    parity_extra: dict[str, Any] = {}  #: extra keys of the export's parity report
    #: ``bench`` may add the PyTorch eager twin of the backbone as a reference (an ONNX-only backbone has none)
    bench_torch_reference = True
    #: its partial fine-tuning runs under torchrun, several processes sharing the work (edgexfer.distributed)
    distributed_partial = False

    @property
    def noun(self) -> str:
        """One sample in messages ("image"): the runtime modality's word."""
        return modality_named(self.name).noun

    @property
    def plural(self) -> str:
        """Several samples in messages ("images")."""
        return modality_named(self.name).plural

    # --- backbones and data -----------------------------------------------------------------------------
    def describe_backbone(self, bb: Any) -> str:
        """The line ``edgexfer backbones`` prints after a backbone's name."""
        raise NotImplementedError

    def backbone_record(self, bb: Any) -> dict[str, Any]:
        """run.json's backbone facts of this modality (placed before ``feature_dim``)."""
        return {}

    def claims_data(self, path: Path) -> bool:
        """Whether ``path`` is a data set of this modality."""
        return False

    def check_config(self, cfg: Any, bb: Any) -> None:
        """Refuse training options that make no sense for this modality (before any data is read)."""

    def load(self, cfg: Any, bb: Any) -> LabelledData:
        """Read the labelled data set ``cfg.data_dir`` as ``train`` does."""
        raise NotImplementedError

    def run_entry(self, data: LabelledData, i: int) -> dict[str, Any]:
        """Sample ``i``'s row in run.json's ``train`` or ``val`` list (what export reads it back from)."""
        raise NotImplementedError

    def start_run(self, data: LabelledData, out: Path) -> None:
        """Write what the run directory needs besides the model (a tokenizer file)."""

    # --- frozen training: features through the runtime's engine and cache --------------------------------
    def export_pretrained(self, bb: Any, weights: Path | None, path: Path) -> None:
        """Write the pretrained backbone as ONNX at ``path``."""
        raise NotImplementedError

    def sample_records(self, data: LabelledData) -> list[Any]:
        """The feature cache's SampleRecord of every sample."""
        raise NotImplementedError

    def feature_args(self, data: LabelledData) -> dict[str, Any]:
        """The keyword arguments of :func:`edgexfer.runtime.features.cached_features` that feed this data."""
        raise NotImplementedError

    def features(self, backend: Any, cache: Any, backbone_sha256: str, data: LabelledData, *, workers: int,
                 progress: bool) -> tuple[np.ndarray, Any, dict[int, str]]:
        """Features of every sample through the feature cache: ``(features, ExtractionReport, failed)``.

        ``failed`` maps the index of a sample that could not be read to the reason; ``features`` has the
        rows of the other samples, in order. The default feeds :meth:`feature_args` to ``cached_features``.
        """
        from edgexfer.runtime.features import cached_features

        feats, report = cached_features(backend, cache, backbone_sha256, data.spec, data.shas, progress=progress,
                                        **self.feature_args(data))
        return feats, report, {}

    def check_readable(self, data: LabelledData, *, workers: int, progress: bool,
                       only: Sequence[int] | None = None) -> dict[int, str]:
        """Samples a training run without cached features would fail on: ``{index: reason}`` (read, not kept).
        ``only``: check just these indices (a process's share under torchrun)."""
        return {}

    def drop(self, data: LabelledData, failed: dict[int, str]) -> LabelledData:
        """``data`` without the samples ``failed`` (index: reason), which join ``skipped``."""
        if failed:
            raise NotImplementedError(f"{type(self).__name__} cannot drop samples")
        return data

    def counters(self, data: LabelledData) -> dict[str, Any]:
        """metrics.json's counts of the work done on the data (images decoded)."""
        return {}

    # --- partial training ----------------------------------------------------------------------------------
    def tuner(self, cfg: Any, bb: Any, data: LabelledData, train_idx: np.ndarray, head_kind: str | None = None) -> Any:
        """The partial fine-tuner (see :class:`Tuner`); ``head_kind`` is the head of a --mode partial run."""
        raise NotImplementedError

    def train_all_layers(self, cfg: Any, bb: Any, data: LabelledData, train_idx: np.ndarray, val_idx: np.ndarray):
        """``--unfreeze all``: returns ``(head, history, extraction, val_logits)``."""
        raise InputError(f"--unfreeze all with a {self.noun} backbone", got="all",
                         expected="a number of last blocks", todo="pass --unfreeze N")

    # --- export, evaluation, fleet -------------------------------------------------------------------------
    def export_reader(self, run: dict[str, Any], run_dir: Path) -> Any:
        """What export reads samples with (see :class:`ExportReader`)."""
        raise NotImplementedError

    def bundle_name(self, data_root: str) -> str:
        """The default bundle name of a run trained on ``data_root``."""
        return Path(data_root).name

    #: ``eval`` predicts this many times its --batch-size samples per call (texts: the predictor batches again)
    eval_batch_factor = 1
    #: how ``eval``'s error names a data set's classes ("folders named", "labels")
    eval_class_word = "labels"

    def evaluation_set(self, data_dir: Path) -> EvaluationSet:
        """A labelled data set for ``edgexfer eval``."""
        raise NotImplementedError

    def predict(self, predictor: Any, items: list[tuple[str, str, Any]]) -> list[Any]:
        """Top-1 results of a batch of evaluation items (a Prediction, or an error result per item)."""
        raise NotImplementedError

    def evaluation_extra(self, predictor: Any, items: list[tuple[str, str, Any]]) -> dict[str, Any]:
        """Keys the modality adds to ``eval``'s report."""
        return {}

    def bench_samples(self, bundle: Any, images: Any) -> Any:
        """The samples ``edgexfer bench`` measures a bundle on (``images``: the --images option, or None)."""
        raise NotImplementedError

    def validation_features(self, bundle: Any, engine: Any, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
        """Features (through ``engine``) and class names of a labelled data set."""
        raise NotImplementedError


class Tuner:
    """Partial fine-tuning of one modality: the frozen prefix computed once, then fits of the tail.

    Attributes: ``recipe`` (a PartialRecipe), ``report`` (the recipe as the run's reports write it),
    ``device``, ``seconds`` (of :meth:`prepare`).
    """

    def prepare(self) -> None:
        """Run the frozen prefix once (call inside :class:`edgexfer.run_record.torch_threads`)."""
        raise NotImplementedError

    def fit(self, idx, *, eval_idx=None, budget_s: float | None = None, progress: bool = False,
            head_kind: str = "linear") -> Any:
        """Fine-tune from the pretrained tail on samples ``idx``; None when ``budget_s`` ran out.

        The fit has ``history``, ``seconds`` and ``logits(idx)``."""
        raise NotImplementedError

    def export(self, fit: Any, out: Path) -> Any:
        """Write ``backbone.onnx`` and ``backbone.safetensors`` of the fit into ``out``; returns the numpy head."""
        raise NotImplementedError

    def keep_last_epoch(self, history: list[dict[str, Any]]) -> None:
        """Note in a --mode partial history which epoch's weights are kept (the last), where the report does."""


class ExportReader:
    """How export reads a run's samples: batch by batch, so that memory holds one batch whatever the data set.

    A batch is whatever the modality's engines take (uint8 pixels, a list of texts) of at most
    :attr:`batch_size` samples; the runners turn one batch into features, and only features are kept.
    """

    #: samples read, and run through each engine, at a time
    batch_size = 16
    #: what :meth:`torch_runner` runs, as the export report and its line name it
    reference = "pytorch fp32"
    reference_title = "PyTorch"

    def read(self, entries: list[dict[str, Any]]) -> Any:
        """One batch: the samples of ``entries`` (run.json entries, at most a batch of them) as engines take them."""
        raise NotImplementedError

    def batches(self, entries: list[dict[str, Any]]) -> Iterator[Any]:
        """The samples of ``entries`` in order, :attr:`batch_size` at a time; each batch is read when it is asked for."""
        for start in range(0, len(entries), self.batch_size):
            yield self.read(entries[start:start + self.batch_size])

    def usable(self, entry: dict[str, Any]) -> bool:
        """Whether a training entry can still be read (an exemplar candidate)."""
        return True

    def torch_runner(self) -> AbstractContextManager[Callable[[Any], np.ndarray]]:
        """The run's PyTorch backbone (the parity check's reference) as a function of one batch."""
        raise NotImplementedError

    def onnx_runner(self, path: Path) -> AbstractContextManager[Callable[[Any], np.ndarray]]:
        """``path`` (a backbone.onnx) on the reference engine, as a function of one batch."""
        raise NotImplementedError

    def golden(self, entries: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """golden.npz's input arrays of ``entries`` (the few golden samples, in order)."""
        raise NotImplementedError

    def manifest_input(self) -> Any:
        """The manifest's ``backbone.input``."""
        raise NotImplementedError


def stream_features(reader: ExportReader, entries: list[dict[str, Any]],
                    runner: AbstractContextManager[Callable[[Any], np.ndarray]]) -> np.ndarray:
    """The features of ``entries`` from ``runner``, in order, reading one batch of samples at a time.

    One engine per pass: holding PyTorch's and ONNX Runtime's working memory at once cost more than reading
    the samples twice (export of 384 images: 834 MB peak RSS feeding both per batch, 550 MB one after the other).
    """
    with runner as run:
        return np.concatenate([run(batch) for batch in reader.batches(entries)])


def run_backbone(run: dict[str, Any], run_dir: Path):
    """The PyTorch backbone of a run: the packaged (or the run's own) weights, fine-tuned ones when the run tuned."""
    from safetensors.torch import load_file

    from edgexfer.backbones import build_backbone, run_config

    net = build_backbone(run_config(run), weights=run["config"].get("weights"))
    if run["backbone"]["fine_tuned"]:
        net.load_state_dict(load_file(str(run_dir / "backbone.safetensors")), strict=True)
    return net


def save_state(module: Any, path: Path) -> None:
    """A module's state dict as safetensors (``backbone.safetensors`` of a fine-tuned run)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
