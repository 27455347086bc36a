"""The ``edgexfer`` command line (click). Torch and engines are imported inside commands only.

Conventions: ``--json`` prints one object on stdout; human text and progress bars go to stderr;
exit 0 success, 1 failure, 2 usage error; errors are one line unless ``--debug``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from edgexfer import __version__
from edgexfer.cli_options import (
    device_engine_options,
    emit,
    host_engine_options,
    json_option,
    precision_option,
    quiet_option,
    split_inputs,
    state_option,
    text_option,
)
from edgexfer.runtime.backends.registry import BACKENDS
from edgexfer.runtime.errors import EdgexferError
from edgexfer.runtime.names import DEFAULT_HEAD_POLICY, HEAD_KINDS, HEAD_POLICIES, TRAIN_MODES


class _Group(click.Group):
    """Turns edgexfer's own errors into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgexferError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="edgexfer")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Transfer-learned image and text classifiers for edge devices."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@main.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Run directory to write.")
@click.option("--backbone", default=None,
              help="Default: efficientnet_lite0 for images, minilm_l6 for texts (edgexfer backbones lists them); "
                   "py:MODULE_OR_FILE:FACTORY brings your own (with --input-size, --mean, --std).")
@click.option("--input-size", default=None, help="py: backbones: H,W the model takes.")
@click.option("--mean", default=None, help="py: backbones: per-channel mean R,G,B of [0, 1] pixels.")
@click.option("--std", default=None, help="py: backbones: per-channel std R,G,B of [0, 1] pixels.")
@click.option("--output", "onnx_output", default=None, help="onnx: backbones: the features output, if several.")
@click.option("--resize", type=click.Choice(["letterbox", "crop"]), default="letterbox", show_default=True,
              help="letterbox onto white, or resize the shorter side and centre-crop.")
@click.option("--mode", type=click.Choice(list(TRAIN_MODES)), default="frozen", show_default=True,
              help="frozen: head on fixed features; partial: fine-tune the last blocks; auto: choose by k-fold "
                   "cross-validation (docs/training.md).")
@click.option("--head", type=click.Choice(list(HEAD_KINDS)), default="linear", show_default=True)
@click.option("--unfreeze", default=None, help="Partial mode: last N blocks to fine-tune, or 'all' (slow path). "
              "Default: the measured recipe's (edgexfer.finetune.PartialRecipe).")
@click.option("--epochs", type=int, default=None,
              help="Default: the partial recipe's (15 with --unfreeze all), 200 for a frozen mlp head.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-fraction", type=float, default=0.2, show_default=True)
@click.option("--lr", type=float, default=None, help="Head learning rate (default: the partial recipe's, 1e-3).")
@click.option("--backbone-lr", type=float, default=None,
              help="Learning rate of the unfrozen blocks (default: the partial recipe's; lr/30 with --unfreeze all).")
@click.option("--views", type=int, default=None,
              help="Partial mode: augmented views stored per training image (default: the recipe's).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where partial training runs (auto: cuda if PyTorch sees a GPU). Export is always from a CPU copy.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--C", "C", type=float, default=1.0, show_default=True, help="Inverse L2 strength of the linear head.")
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="Feature cache file (default $EDGEXFER_CACHE or ~/.cache/edgexfer/features.sqlite).")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Your own checkpoint (state dict) of the same architecture.")
@click.option("--folds", type=int, default=5, show_default=True, help="Auto mode: folds of the cross-validation.")
@click.option("--budget", type=float, default=1200.0, show_default=True,
              help="Auto mode: seconds for cross-validating the partial fine-tuning candidate (0: frozen heads only).")
@click.option("--workers", type=int, default=None,
              help="Threads that read and decode samples while the backbone runs (default: the cores, at most 4).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def train(data_dir, out, backbone, input_size, mean, std, onnx_output, resize, mode, head, unfreeze, epochs, seed,
          val_fraction, lr, backbone_lr, views, device,
          batch_size, C, cache, weights, folds, budget, workers, as_json, quiet):
    """Fine-tune on an ImageFolder tree (one folder per class), or on texts: a folder per class of .txt files
    (one sample per file) or a .csv/.jsonl file of text,label."""
    from edgexfer.train import TrainConfig
    from edgexfer.train import train as run_train

    given = {"unfreeze": unfreeze, "lr": lr}
    cfg = TrainConfig(data_dir=data_dir, out=out, backbone=backbone, mode=mode, head=head, epochs=epochs, seed=seed,
                      val_fraction=val_fraction, backbone_lr=backbone_lr, views=views, device=device,
                      batch_size=batch_size, C=C, cache=cache, weights=weights, folds=folds, budget=budget,
                      workers=workers, progress=not quiet, resize=RESIZE_OPTIONS[resize],
                      input_size=_split(input_size), mean=_split(mean), std=_split(std), output=onnx_output,
                      **{k: v for k, v in given.items() if v is not None})
    result = run_train(cfg)
    if not result.written:  # a torchrun process other than rank 0: rank 0 reports
        return
    chosen = f"; chosen by cross-validation: {result.metrics['selection']['chosen']}" if mode == "auto" else ""
    unit = result.noun
    text = (f"validation accuracy {result.val_accuracy:.3f} ({mode}/{result.metrics['head']}, "
            f"{result.metrics['val_count']} {unit}s{chosen})\n"
            f"backbone ran on {result.metrics['backbone_images_run']} {unit}(s); "
            f"{result.metrics['features_from_cache']} feature vector(s) came from the cache\n"
            f"skipped {len(result.skipped)} file(s)\nrun directory: {out}")
    emit(result.metrics, as_json, text)


#: --resize choices -> the preprocessing's resize policy (edgexfer.runtime.names.RESIZE_POLICIES)
RESIZE_OPTIONS = {"letterbox": "letterbox", "crop": "resize_shorter_then_center_crop"}


def _split(text: str | None) -> tuple[str, ...] | None:
    """'224,224' -> ('224', '224'); the backbone config checks the numbers (one-line errors)."""
    return None if text is None else tuple(part.strip() for part in text.split(","))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--name", default=None, help="Bundle name (default: the data folder's name).")
@json_option
@quiet_option
def export(run_dir, out, name, as_json, quiet):
    """Export a run as a bundle: backbone.onnx, head, golden images, parity report, manifest."""
    from edgexfer.export import export as run_export

    result = run_export(run_dir, out, name=name, progress=not quiet)
    p = result.parity
    text = (f"bundle written to {result.bundle}\n"
            f"ONNX Runtime vs {p.get('reference_title', 'PyTorch')} on {p['count']} validation {p.get('samples', 'images')}: max |diff| {p['max_abs_diff']:.2e}, "
            f"mean cosine {p['mean_cosine']:.6f}, top-1 agreement {p['top1_agreement']:.1%}")
    emit({"bundle": str(result.bundle), "parity": p}, as_json, text)


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--to", "to", required=True, type=click.Choice(list(BACKENDS)), help="Engine to build.")
@precision_option
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="ImageFolder tree, folders named like the head's classes: calibration and held-out "
                   "validation images (the bundle does not keep its training data); for a text bundle, labelled "
                   "texts (a folder of .txt per class, or a CSV/JSONL of text,label). Required for int8.")
@click.option("--calib-size", type=int, default=300, show_default=True,
              help="Images (texts) that calibrate int8; the others are held out for validation.")
@click.option("--val-size", type=int, default=None, help="At most this many held-out images (default: all).")
@click.option("--max-drop", type=float, default=0.01, show_default=True,
              help="Largest accepted int8/bf16 accuracy drop on held-out images (0.01 = 1 point).")
@click.option("--int8-target", type=click.Choice(["any", "native"]), default="any", show_default=True,
              help="CPUs an OpenVINO int8 engine must be exact on: any x86-64 CPU (7-bit weights where no VNNI), "
                   "or only CPUs like this one (native).")
@click.option("--force", is_flag=True, help="Convert again even if an engine from the same inputs is recorded.")
@json_option
@quiet_option
def convert(bundle_dir, to, precision, calib, calib_size, val_size, max_drop, int8_target, force, as_json, quiet):
    """Build an engine into the bundle, validate it against the fp32 reference, record it."""
    from edgexfer.converters import convert as run_convert
    from edgexfer.converters import engine_table, format_engine_table

    result = run_convert(bundle_dir, to, precision, calib=calib, calib_size=calib_size, val_size=val_size,
                         max_drop=max_drop, force=force, progress=not quiet, int8_target=int8_target)
    table = engine_table(bundle_dir)
    emit({"backend": to, "precision": precision, "reused": result.reused, "registered": result.registered,
           "files": list(result.files), "report": result.report, "engines": table},
          as_json, result.summary() + "\n\n" + format_engine_table(table))


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.argument("files", nargs=-1)
@text_option
@host_engine_options
@click.option("--top-k", type=int, default=3, show_default=True)
@json_option
def predict(bundle_dir, files, texts, backend, precision, top_k, as_json):
    """Label images (image bundle) or text files (text bundle, one sample per file; or --text, or - for stdin
    lines). Unreadable inputs are reported; the others still get labels."""
    from edgexfer.runtime.predictor import Prediction, Predictor

    paths, literal, sources = split_inputs(files, texts)
    with Predictor.from_bundle(bundle_dir, backend=backend, precision=precision) as predictor:
        results = predictor.predict(paths, top_k=top_k) if paths else []
        if literal:
            results += predictor.predict_texts(literal, top_k=top_k, sources=sources)
        execution = predictor.details["execution"]
    lines = []
    for r in results:
        if isinstance(r, Prediction):
            alts = ", ".join(f"{lbl} {p:.2f}" for lbl, p in r.top_k[1:])
            lines.append(f"{r.source}: {r.label} ({r.probability:.2f})" + (f"  [then {alts}]" if alts else ""))
        else:
            lines.append(f"{r.source}: ERROR {r.error}")
    emit({"execution": execution, "results": [r.to_dict() for r in results]}, as_json, "\n".join(lines))
    if any(not isinstance(r, Prediction) for r in results):
        sys.exit(1)


@main.command(name="eval")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.argument("data_dir", type=click.Path(path_type=Path))
@host_engine_options
@json_option
@quiet_option
def eval_cmd(bundle_dir, data_dir, backend, precision, as_json, quiet):
    """Accuracy, per-class table and confusion matrix of a bundle on an ImageFolder tree."""
    from edgexfer.evaluate import evaluate
    from edgexfer.metrics import format_report

    report = evaluate(bundle_dir, data_dir, backend=backend, precision=precision, progress=not quiet)
    text = format_report(report)
    if report["skipped"]:
        text += f"\n\nskipped {len(report['skipped'])} unreadable file(s)"
    if report["ignored_classes"]:
        text += f"\nignored folders unknown to the head: {', '.join(report['ignored_classes'])}"
    if report.get("truncated"):
        text += f"\n{report['truncated']} text(s) longer than the bundle's max_length were truncated"
    emit(report, as_json, text)


# --------------------------------------------------------------------------------------------- device
@main.group()
def device():
    """The device side: install, predict, learn, retrain, status, heads, rollback, update, federate, serve, watch,
    listen (no torch needed)."""
    import os

    # What a device command creates is its owner's alone: state folders 0700, files 0600, also the
    # files other libraries write there (TUF metadata, OpenVINO's compiled model cache).
    os.umask(os.umask(0o077) | 0o077)


@device.command(name="install")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@state_option
@device_engine_options
@json_option
def device_install(bundle_dir, state, backend, precision, as_json):
    """Verify and copy a bundle, build or pick its engine, check the golden outputs, then activate it.

    With TensorRT and a GPU the plan is built here from the bundle's TensorRT kit and kept under
    STATE/engines/<key>/; it is rebuilt only when TensorRT, the GPU, the precision or the backbone changed.
    """
    from edgexfer.runtime.device import Device

    with Device(state, backend=backend, precision=precision, engine_builders=_engine_builders()) as dev:
        result = dev.install(bundle_dir)
    from edgexfer.runtime.modalities import modality_named

    e, g = result["engine"], result["golden"]
    how = "built" if e["built"] else "reused" if e["key"] else "picked"
    emit(result, as_json,
          f"installed bundle {result['name']} ({result['bundle'][:12]}…), active head {result['head']}\n"
          f"engine   {e['backend']}/{e['precision']} {how}: {e['source']} ({e['seconds']:.2f} s)\n"
          f"golden   {g['images']} {modality_named(g['modality']).plural}, max feature diff {g['max_abs_feature_diff']:.2g}, "
          f"top-1 agreement {g['top1_agreement']:.3f}\n"
          f"cache    recomputed {result['recomputed_features']} feature(s)")


def _engine_builders() -> dict:
    """Engine builders the runtime may call on this device (the runtime never imports the converters)."""
    from edgexfer.converters.conversion import device_builders

    return device_builders()


@device.command(name="predict")
@click.argument("files", nargs=-1)
@text_option
@state_option
@device_engine_options
@click.option("--top-k", type=int, default=3, show_default=True)
@json_option
def device_predict(files, texts, state, backend, precision, top_k, as_json):
    """Label images or text files (as the active bundle reads), --text texts, or - (one text per stdin line)."""
    from edgexfer.runtime.device import Device
    from edgexfer.runtime.predictor import Prediction

    paths, literal, sources = split_inputs(files, texts)
    with Device(state, backend=backend, precision=precision) as dev:
        results = dev.predict(paths, top_k=top_k) if paths else []
        if literal:
            results += dev.predict_texts(literal, top_k=top_k, sources=sources)
        head = dev.state.active().head
        execution = dev.engine().execution  # what really ran: arithmetic and ISA
    lines = [f"{r.source}: {r.label} ({r.probability:.2f}) [head {head}, {r.backend}/{r.precision}]"
             if isinstance(r, Prediction) else f"{r.source}: ERROR {r.error}" for r in results]
    emit({"head": head, "execution": execution, "results": [r.to_dict() for r in results]}, as_json,
          "\n".join(lines))
    if any(not isinstance(r, Prediction) for r in results):
        sys.exit(1)


@device.command(name="learn")
@click.argument("files", nargs=-1)
@text_option
@click.option("--from-list", "from_list", default=None, metavar="FILE",
              help="Also learn the paths in FILE, one per line ('#' comments and blank lines skipped; relative to "
                   "the current directory; - reads stdin): for more files than a command line holds.")
@click.option("--label", required=True, help="Class name of these samples (a new name adds a class).")
@click.option("--augment", type=click.IntRange(0, 16), default=0, show_default=True,
              help="Also store this many augmented views (mild crops, flips) of each image; one backbone pass each.")
@state_option
@device_engine_options
@json_option
def device_learn(files, texts, from_list, label, augment, state, backend, precision, as_json):
    """Store labelled samples (image or text files, directories of them, --text texts, - for stdin lines) and their
    features in the cache, one committed batch at a time (the backbone runs only for new samples the per-class
    capacity keeps; an interrupted call keeps its finished batches and a rerun skips them)."""
    from itertools import chain

    from tqdm import tqdm

    from edgexfer.runtime.device import Device
    from edgexfer.runtime.learning import paths_from_list

    if from_list is not None and "-" in files and from_list == "-":
        raise click.UsageError("stdin is either texts (FILE -) or a list of paths (--from-list -), not both")
    paths, literal, sources = split_inputs(files, texts) if files or texts or from_list is None else ([], [], [])
    items = chain(paths, paths_from_list(from_list)) if from_list is not None else paths
    done: list = []  # the report after the last committed batch, for an interruption
    with tqdm(desc=f"learning '{label}'", unit="batch", disable=None, leave=False) as bar:
        def committed(report) -> None:
            done[:] = [report]
            bar.set_postfix(added=report.added, known=report.already_known, dropped=report.dropped, refresh=False)
            bar.update(1)

        try:
            with Device(state, backend=backend, precision=precision) as dev:
                report = dev.learn(items, label, augment=augment, texts=literal, text_sources=sources,
                                   on_batch=committed)
        except KeyboardInterrupt:
            bar.close()
            kept = done[0] if done else None
            summary = _learn_summary(kept, label, augment) if kept else "nothing committed"
            click.echo(f"interrupted: {summary}; the same command again skips what is committed", err=True)
            if as_json:
                emit({**(kept.to_dict() if kept else {"label": label, "batches": 0}), "interrupted": True}, True, "")
            sys.exit(130)
    text = _learn_summary(report, label, augment)
    for e in report.errors:
        text += f"\n{e['source']}: ERROR {e['error']}"
    emit(report.to_dict(), as_json, text)
    if report.errors:
        sys.exit(1)


def _learn_summary(report, label: str, augment: int) -> str:
    text = f"learned {report.added} new sample(s) of '{label}' ({report.already_known} already cached"
    if report.dropped or report.evicted:
        text += (f"; {report.dropped} dropped by the per-class capacity of {report.capacity}, "
                 f"{report.evicted} stored before replaced")
    text += f"; backbone ran {report.backbone_runs} time(s); {report.batches} batch(es) committed)"
    if augment:
        text += f"; {report.views_added} augmented view(s) stored ({augment} per image)"
    return text


@device.command(name="check-cache")
@state_option
@click.option("--repair", is_flag=True, help="Recount each label's members if only those counts are off.")
@json_option
def device_check_cache(state, repair, as_json):
    """Check the whole feature cache file (SQLite integrity_check; opening checks it only after an unclean
    shutdown). Exit 1 if it is damaged."""
    from edgexfer.runtime.device import Device

    with Device(state) as dev:
        result = dev.check_cache(repair=repair)
    verdict = "ok" if result["ok"] else f"DAMAGED: {result['result']}"
    emit(result, as_json, f"{result['path']}: {verdict} ({result['bytes'] / 1e6:.1f} MB checked in "
                          f"{result['seconds']:.2f} s)" + (f"; repaired: {result['repaired']}" if result["repaired"] else ""))
    if not result["ok"]:
        click.echo(f"error: {result['todo']}", err=True)
        sys.exit(1)


@device.command(name="retrain")
@state_option
@click.option("--head", "kind", type=click.Choice(list(HEAD_KINDS)), default=None,
              help="Head kind (default: the active head's).")
@click.option("--tolerance", type=float, default=0.01, show_default=True,
              help="Accept the new head if its holdout accuracy >= the active head's minus this.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--policy", type=click.Choice(list(HEAD_POLICIES)), default=DEFAULT_HEAD_POLICY, show_default=True,
              help="Linear head policy: fewshot (balanced, old rows kept, new rows weight-aligned), frozen, or auto "
                   "(fewshot while the new classes have < 15 training samples each, median).")
@json_option
def device_retrain(state, kind, tolerance, seed, policy, as_json):
    """Retrain the head on cached features; activate it only if it passes the holdout gate."""
    from edgexfer.runtime.device import Device

    with Device(state) as dev:
        r = dev.retrain(kind=kind, tolerance=tolerance, seed=seed, policy=policy)
    verdict = "activated" if r.accepted else "REJECTED (kept as a candidate; the active head is unchanged)"
    few = (f"; few-shot classes (< {r.min_split_samples} samples, not split, judged by leave-one-out): "
           f"{', '.join(r.few_shot_classes)}" if r.few_shot_classes else "")
    emit(r.to_dict(), as_json, f"head {r.version} {verdict}: {r.reason}; gate: {r.gate}{few}; {len(r.classes)} "
                               f"classes, {r.policy} policy, trained on {r.train_count} samples ({r.exemplar_count} "
                               f"bundle exemplars, {r.view_count} augmented views) in {r.seconds:.2f} s")


@device.command(name="status")
@state_option
@device_engine_options
@json_option
def device_status(state, backend, precision, as_json):
    """Bundle, active head, backend, cache size per class, last retrain figures."""
    from edgexfer.runtime.device import Device

    with Device(state, backend=backend, precision=precision) as dev:
        st = dev.status()
    counts = ", ".join(f"{k} {v}" for k, v in st["cache"]["samples_per_class"].items()) or "empty"
    last = st["last_retrain"]
    text = (f"bundle   {st['bundle']['name']} ({st['bundle']['arch']}, backbone {st['bundle']['backbone_sha256'][:12]}…)\n"
            f"head     version {st['head']['version']} ({st['head']['kind']}, {len(st['head']['classes'])} classes: "
            f"{', '.join(st['head']['classes'])}; previous {st['head']['previous']})\n"
            f"backend  {st['backend']} {st['precision']}\n"
            f"cache    {counts}\n"
            f"engines  " + ("; ".join(f"{e['key']} ({e['bytes'] / 1e6:.1f} MB)" for e in st["engines"]) or "none built here")
            + "\nretrain  " + (f"head {last['version']} {'accepted' if last['accepted'] else 'rejected'}: {last['reason']}"
                            if last else "never"))
    field, est = st["field_accuracy"], st["estimated_accuracy"]
    if field["n"]:
        lo, hi = field["ci95"]
        text += (f"\nfield    {field['accuracy']:.0%} of {field['n']} samples labelled here were answered right before "
                 f"learning (95 % CI {lo:.0%}-{hi:.0%})")
    if est["mean_confidence"] is not None:
        text += (f"\nlatest   mean confidence {est['mean_confidence']:.0%} over the last {est['window']} inputs "
                 "(an upper bound of their accuracy)")
    for warning in st["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    emit(st, as_json, text)


@device.command(name="drift")
@state_option
@click.option("--window", type=click.IntRange(min=2), default=30, show_default=True,
              help="Test the latest N inputs that predict, serve and watch classified.")
@click.option("--alpha", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=0.01,
              show_default=True, help="Significance level: drift when the p-value is below it.")
@click.option("--permutations", type=click.IntRange(min=19, max=100_000), default=500, show_default=True,
              help="Permutations of the test's p-value (the least p-value is 1/(N+1)).")
@json_option
def device_drift(state, window, alpha, permutations, as_json):
    """Has the input changed since training? The latest inputs' features against the bundle's (MMD test)."""
    from edgexfer.runtime.device import Device

    with Device(state) as dev:
        report = dev.drift(window=window, alpha=alpha, permutations=permutations)
    d = report.to_dict()
    if report.drift is None:
        text = f"no verdict: {report.note}"
    else:
        moved = sorted(d["class_mix"].items(), key=lambda kv: -abs(kv[1]["window"] - kv[1]["reference"]))[:3]
        text = (f"{'DRIFT' if report.drift else 'no drift'}: p = {report.p_value:.4f} (alpha {alpha}), MMD² "
                f"{report.statistic:.4g}, the latest {report.window} inputs against {report.reference} training "
                f"samples\nanswers  " + ", ".join(f"{c} {v['window']:.0%} (training {v['reference']:.0%})"
                                                    for c, v in moved)
                + f"; label shift {report.label_shift:.2f}\nconfidence  {d['confidence']['window']:.2f} "
                f"(training {d['confidence']['reference']:.2f})")
    emit(d, as_json, text)


@device.command(name="suggest")
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@state_option
@click.option("--k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="How many to suggest.")
@click.option("--method", type=click.Choice(["suggested", "margin", "coverage", "random"]), default="suggested",
              show_default=True, help="Uncertainty and coverage (default), one of them alone, or random.")
@json_option
def device_suggest(files, state, k, method, as_json):
    """Which samples to label first: FILES, or the review queue's entries without FILES."""
    from edgexfer.runtime.device import Device

    with Device(state) as dev:
        ranked = dev.suggest(list(files), k=k, method=method)
    lines = [f"{r['rank']:>3}. {r['source'] if r['review_id'] is None else 'review ' + str(r['review_id'])}  "
             f"(answered {r['label']} {r['probability']:.0%}, uncertainty {r['uncertainty']:.2f})" for r in ranked]
    emit({"suggestions": ranked}, as_json, "\n".join(lines) or "nothing to suggest: no readable candidate")


@device.command(name="heads")
@state_option
@json_option
def device_heads(state, as_json):
    """Every head version on the device, with its status and figures."""
    from edgexfer.runtime.device import Device

    with Device(state) as dev:
        heads = dev.heads()
    lines = [f"{'*' if h['active'] else ' '} {h['version']:>3}  {h['status']:<9} {h['source']:<8} {h['kind']:<9} "
             f"{len(h['classes'])} classes  parent {h['parent']}  {h['created_utc']}  "
             # scalar figures only: the signed golden logits of an update stay in --json
             + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in h["metrics"].items()
                        if not isinstance(v, (dict, list)))
             for h in heads]
    emit({"heads": heads}, as_json, "\n".join(lines))


@device.command(name="rollback")
@state_option
@json_option
def device_rollback(state, as_json):
    """Return to the previous head."""
    from edgexfer.runtime.device import Device

    with Device(state) as dev:
        active = dev.rollback()
    emit({"head": active.head, "previous_head": active.previous_head}, as_json,
          f"active head is now {active.head} (previous {active.previous_head})")


@main.command(name="backbones")
def backbones_cmd():
    """List the registered backbones and how to bring your own."""
    from edgexfer.backbones import get_config, list_backbones
    from edgexfer.backbones.foreign import HOW_TO
    from edgexfer.modalities import host_modality

    for name in list_backbones():
        cfg = get_config(name)
        click.echo(f"{name}: {host_modality(cfg.modality).describe_backbone(cfg)}")
    click.echo("\n" + HOW_TO)


# Commands that live in their own modules (each imports its heavy dependencies inside the command).
from edgexfer.cli_bench import bench  # noqa: E402
from edgexfer.cli_fleet import device_federate, device_update, flash, fleet, heads  # noqa: E402
from edgexfer.cli_serve import device_listen, device_serve, device_watch  # noqa: E402

main.add_command(bench)
main.add_command(flash)
main.add_command(heads)
main.add_command(fleet)
device.add_command(device_update)
device.add_command(device_federate)
device.add_command(device_serve)
device.add_command(device_watch)
device.add_command(device_listen)

if __name__ == "__main__":  # pragma: no cover
    main()
