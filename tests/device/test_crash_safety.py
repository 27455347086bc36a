"""Crash safety of the device state directory (ARCHITECTURE.md, "Device state directory").

Real processes are SIGKILLed: at every named step of install, retrain, rollback and learn (the
``EDGEXFER_CRASH_AT`` hook of ``edgexfer.runtime.state``), at seeded random moments during retrain,
rollback and install, and in the middle of a stream of ``learn`` calls. After every kill:

- exactly one complete (bundle, head) pair is active, the one from before the operation or the one
  after it: the bundle verifies, every visible head's file matches the sha256 in its head.json, the
  active head is bound to the active bundle and a real prediction goes through it;
- every ``learn`` that returned is in the cache with its features, no sample is there without them,
  and SQLite's ``integrity_check`` is ok;
- the next operation completes and sweeps what the dead process left behind.

Real bundle, real ONNX Runtime, real SQLite. A fresh interpreter spends about a second on imports
(numpy, scipy, onnxruntime), so the named steps run the real CLI, several at once, and the random-kill
loop forks each run from a small server process that imported everything once.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.cache import FeatureCache
from edgexfer.runtime.device import Device
from edgexfer.runtime.fsutil import file_sha256
from edgexfer.runtime.heads import Head
from edgexfer.runtime.predictor import Prediction, Predictor
from edgexfer.runtime.state import CRASH_ENV, ActiveState, DeviceState, StateError

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")

DEMO = Path(__file__).resolve().parents[2] / "data" / "clipart8-demo"
KILLED = -signal.SIGKILL
#: processes of retrain / rollback / install killed at random moments (acceptance: at least 50)
RANDOM_KILLS = 60


def _images(cls: str, n: int, skip: int = 0) -> list[Path]:
    return sorted((DEMO / cls).iterdir())[skip:skip + n]


def _png_square(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), rgb).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ processes
def _env(crash_at: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    return env


def _cli(*args: str, crash_at: str | None = None) -> subprocess.Popen:
    """``edgexfer device ARGS`` in its own process, optionally told to SIGKILL itself at a step."""
    return subprocess.Popen([sys.executable, "-m", "edgexfer.cli", "device", *args], env=_env(crash_at),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# A small fork server: imports once, then forks one child per operation it is sent and SIGKILLs that
# child after the given delay ("none": let it finish). A forked child is a process like any other: it
# takes the flock, opens SQLite and writes files itself, so a kill there is a real crash. It only
# saves the second of imports a fresh interpreter would spend before every one of the many runs.
# BLAS runs single-threaded, so no thread pool exists when the server forks.
FORK_SERVER = textwrap.dedent("""
    import json, os, signal, sys, time, traceback
    from edgexfer.runtime.device import Device

    def operate(op, state, bundle, result):
        with Device(state) as dev:
            if op == "retrain":
                out = dev.retrain().to_dict()
            elif op == "rollback":
                active = dev.rollback()
                out = {"head": active.head, "previous_head": active.previous_head}
            else:
                out = dev.install(bundle)
        with open(result, "w") as fh:
            json.dump(out, fh)

    print("ready", flush=True)
    for line in sys.stdin:
        op, state, bundle, result, delay = line.split()
        wall, started = time.time(), time.perf_counter()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                operate(op, state, bundle, result)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stderr.flush()
            os._exit(code)  # no interpreter teardown: the run ends where the operation ends
        deadline = None if delay == "none" else started + float(delay)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.perf_counter() >= deadline:
                # the child is not reaped yet, so its pid cannot belong to anyone else
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.0005)
        print(os.waitstatus_to_exitcode(status), time.perf_counter() - started, wall, flush=True)
""")


class ForkServer:
    """Runs retrain / rollback / install in forked children and kills them at a chosen moment."""

    def __init__(self, log: Path) -> None:
        env = {**_env(), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.log = log
        self._stderr = open(log, "w")  # closed in close()
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"fork server did not start: {line!r} {log.read_text()[-2000:]}"

    def run(self, op: str, state: Path, bundle: Path, result: Path,
            kill_after: float | None) -> tuple[int, float, float]:
        """Exit code of the operation's process (-9 if killed), its duration and its start (time.time())."""
        delay = "none" if kill_after is None else repr(kill_after)
        self.proc.stdin.write(f"{op} {state} {bundle} {result} {delay}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"fork server died: {self.log.read_text()[-2000:]}"
        code, seconds, wall = line.split()
        return int(code), float(seconds), float(wall)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self._stderr.close()


# Learns one image per call and prints its sha256 only after learn() has returned.
LEARNER = textwrap.dedent("""
    import hashlib, sys
    from edgexfer.runtime.device import Device
    state, label, *paths = sys.argv[1:]
    with Device(state) as dev:
        dev.engine()  # the session is built before "ready", so kills land in learn() calls
        print("ready", flush=True)
        for path in paths:
            data = open(path, "rb").read()
            report = dev.learn([data], label)
            if report.errors:
                raise SystemExit(str(report.errors))
            print(hashlib.sha256(data).hexdigest(), flush=True)
    print("finished", flush=True)
""")


# ------------------------------------------------------------------------------------------ state checks
def _clone(seed: Path, dest: Path) -> Path:
    """A copy of a state directory. Installed bundles are immutable, so they are hard links."""
    def copy(src: str, dst: str) -> None:
        if f"{os.sep}bundles{os.sep}" in src:
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(seed, dest, copy_function=copy, symlinks=True)
    return dest


def _leftovers(root: Path) -> list[str]:
    """Hidden names in the state directory: temporaries of a writer (nothing else is hidden there)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            if name.startswith("."):
                found.append(str((Path(dirpath) / name).relative_to(root)))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found)


class StateChecker:
    """Checks the crash invariant on a state directory, with one ONNX Runtime session for all checks."""

    def __init__(self, predictor: Predictor, image: Path):
        self.predictor = predictor  # opened on the test bundle: the same backbone as every state here
        self.image = image
        self.backbone = predictor.bundle.manifest.backbone.sha256

    def __call__(self, root: Path) -> ActiveState:
        state = DeviceState(root)
        active = state.active()  # active.json parses: one pair, complete JSON
        assert active.bundle == self.backbone, f"active bundle {active.bundle[:12]}… is not the installed one"
        bundle = Bundle.open(state.bundles_dir / active.bundle, verify=True)  # every file's sha256
        assert bundle.manifest.backbone.sha256 == active.bundle
        dim = bundle.manifest.backbone.feature_dim

        # every head a user can list, roll back to or activate is complete: no half-written head is visible
        versions = state.head_versions()
        heads = {}
        for v in versions:
            record = state.head_record(v)
            path = state.heads_dir / str(v) / "head.safetensors"
            assert record.version == v
            assert file_sha256(path) == record.sha256, f"head {v}: head.safetensors does not match head.json"
            heads[v] = Head.load(path, feature_dim=dim)
            assert list(heads[v].classes) == record.classes and heads[v].kind == record.kind

        assert active.head in heads, f"active head {active.head} is not a complete head (have {versions})"
        assert state.head_record(active.head).backbone_sha256 == active.bundle, "active head bound to another backbone"
        if active.previous_head is not None:
            assert active.previous_head != active.head, f"previous_head equals the active head {active.head}"
            assert active.previous_head in heads, f"rollback target {active.previous_head} is not a complete head"
            assert state.head_record(active.previous_head).backbone_sha256 == active.bundle

        head = heads[active.head]
        result = Predictor(bundle, self.predictor.engine, head, "onnxruntime", "fp32").predict([self.image])[0]
        assert isinstance(result, Prediction), result
        assert result.label in head.classes and 0.0 < result.probability <= 1.0

        with FeatureCache(state.cache_path) as cache:
            assert cache.integrity_check() == "ok"
            # a sample is confirmed together with its features, or not at all
            assert cache.samples_without_features(active.bundle, bundle.preprocess.key()) == []
        return active


@pytest.fixture(scope="module")
def check(device_bundle) -> StateChecker:
    with Predictor.from_bundle(device_bundle) as predictor:
        yield StateChecker(predictor, _images("fruit", 1)[0])


@pytest.fixture(scope="module")
def seed_state(tmp_path_factory, device_bundle, check) -> Path:
    """Installed bundle, a small cache (two known classes and a new one), one retrain: heads 1 and 2."""
    root = tmp_path_factory.mktemp("seed") / "state"
    with Device(root) as dev:
        dev.install(device_bundle)
        dev.learn(_images("music", 8), "music")
        dev.learn(_images("tools", 8), "tools")
        rng = np.random.default_rng(0)
        dev.learn([_png_square(tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(6)], "squares")
        report = dev.retrain()
    assert report.accepted and report.version == 2
    assert check(root) == ActiveState(bundle=check.backbone, head=2, previous_head=1)
    return root


def _learned(root: Path, shas: list[str]) -> dict[str, str]:
    """Which of ``shas`` the cache holds with features for the active bundle, and their labels."""
    state = DeviceState(root)
    bundle = state.bundle()
    key = bundle.preprocess.key()
    with FeatureCache(state.cache_path) as cache:
        feats = cache.get_features(bundle.manifest.backbone.sha256, key, shas)
        labelled, _, labels = cache.labelled(bundle.manifest.backbone.sha256, key)
    for sha, vec in feats.items():
        assert vec.shape == (bundle.manifest.backbone.feature_dim,) and np.isfinite(vec).all(), sha
    by_sha = dict(zip(labelled, labels))
    return {sha: by_sha[sha] for sha in feats}


def _run_steps(steps: dict[str, object], make_state, args) -> dict[str, tuple[Path, subprocess.Popen]]:
    """Start one CLI process per step at once (each on its own state), each told to die at its step."""
    runs = {}
    for step in steps:
        root = make_state(step)
        runs[step] = (root, _cli(*args(root), crash_at=step))
    for step, (_, proc) in runs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == KILLED, (f"step {step!r} was never reached: exit {proc.returncode}\n"
                                           f"{out[-500:]}{err[-2000:]}")
    return runs


# ------------------------------------------------------------------------------------------ named steps
def test_retrain_killed_at_each_named_step(seed_state, tmp_path, check):
    before = DeviceState(seed_state).active()
    new = ActiveState(bundle=before.bundle, head=max(DeviceState(seed_state).head_versions()) + 1,
                      previous_head=before.head)
    expected = {"head-written": before, "head-renamed": before, "before-switch": before,
                "after-switch": new, "retrain-done": new}
    runs = _run_steps(expected, lambda step: _clone(seed_state, tmp_path / step),
                      lambda root: ("retrain", "--state", str(root), "--json"))
    for step, (root, _) in runs.items():
        assert check(root) == expected[step], step
        if step == "head-written":
            assert [p.name[:5] for p in (root / "heads").iterdir() if p.name.startswith(".")] == [".tmp-"]
        # the next retrain (another process) completes and sweeps what the dead one left
        with Device(root) as dev:
            report = dev.retrain()
        assert check(root).head == (report.version if report.accepted else expected[step].head), step
        assert _leftovers(root) == [], step


def test_rollback_killed_at_each_named_step(seed_state, tmp_path, check):
    before = DeviceState(seed_state).active()
    after = ActiveState(bundle=before.bundle, head=before.previous_head, previous_head=before.head)
    expected = {"before-switch": before, "after-switch": after}
    runs = _run_steps(expected, lambda step: _clone(seed_state, tmp_path / step),
                      lambda root: ("rollback", "--state", str(root), "--json"))
    for step, (root, _) in runs.items():
        assert check(root) == expected[step], step
        with Device(root) as dev:
            again = dev.rollback()
        assert again == ActiveState(before.bundle, expected[step].previous_head, expected[step].head), step
        assert check(root) == again and _leftovers(root) == [], step


def test_first_install_killed_at_each_named_step(tmp_path, device_bundle, check):
    """On an empty device a crash leaves nothing active (the old state) or the complete new pair."""
    first = ActiveState(bundle=check.backbone, head=1, previous_head=None)
    expected = {"bundle-copied": None, "bundle-renamed": None, "head-written": None, "head-renamed": None,
                "bundle-linked": None, "before-switch": None, "after-switch": first}
    runs = _run_steps(expected, lambda step: tmp_path / step,
                      lambda root: ("install", str(device_bundle), "--state", str(root), "--json"))
    for step, (root, _) in runs.items():
        if expected[step] is None:
            assert not (root / "active.json").exists(), step
            with pytest.raises(StateError, match="no model is installed"):
                Device(root).status()
        else:
            assert check(root) == expected[step], step
        if step in ("bundle-copied", "head-written"):
            assert any(name.startswith((".tmp-", "bundles/.tmp-", "heads/.tmp-")) for name in _leftovers(root)), step
        with Device(root) as dev:
            result = dev.install(device_bundle)
        # a head renamed into place before the crash is reused, not duplicated
        assert result["head"] == 1 and DeviceState(root).head_versions() == [1], step
        assert check(root) == first and _leftovers(root) == [], step
        # one content directory, and the backbone's link pointing at it
        link = root / "bundles" / check.backbone
        assert sorted(p.name for p in (root / "bundles").iterdir()) == [check.backbone, os.readlink(link)], step
        assert os.readlink(link).startswith(f"{check.backbone}."), step


def test_reinstall_over_a_retrained_device_killed_at_each_switch_step(seed_state, tmp_path, device_bundle, check):
    before = DeviceState(seed_state).active()
    after = ActiveState(bundle=before.bundle, head=1, previous_head=before.head)
    expected = {"before-switch": before, "after-switch": after}
    runs = _run_steps(expected, lambda step: _clone(seed_state, tmp_path / step),
                      lambda root: ("install", str(device_bundle), "--state", str(root), "--json"))
    for step, (root, _) in runs.items():
        assert check(root) == expected[step], step
        with Device(root) as dev:
            dev.install(device_bundle)
        # installing the pair that is already active changes nothing, so rollback still has its target
        assert check(root) == after and _leftovers(root) == [], step


def test_learn_killed_before_and_after_its_commit(seed_state, tmp_path, check):
    """20 images: a first batch of 16, then 4. A kill before the first batch's commit keeps nothing; a kill
    right after it keeps exactly that batch, each sample with its features."""
    images = _images("sports", 20)
    shas = [hashlib.sha256(p.read_bytes()).hexdigest() for p in images]
    expected = {"learn-before-commit": {}, "learn-committed": {sha: "sports" for sha in shas[:16]}}
    runs = _run_steps(expected, lambda step: _clone(seed_state, tmp_path / step),
                      lambda root: ("learn", *map(str, images), "--label", "sports", "--state", str(root)))
    for step, (root, _) in runs.items():
        assert _learned(root, shas) == expected[step], step
        check(root)
        with Device(root) as dev:
            report = dev.learn(images, "sports")
        assert (report.added, report.already_known) == (len(shas) - len(expected[step]), len(expected[step])), step
        assert report.backbone_runs == report.added, step  # the committed batch is not run again
        assert _learned(root, shas) == {sha: "sports" for sha in shas}, step


# ------------------------------------------------------------------------------------------ random kills
def test_random_sigkills_of_retrain_rollback_and_install(seed_state, tmp_path, device_bundle, check):
    """Retrain, rollback and install processes SIGKILLed at seeded random moments, RANDOM_KILLS times."""
    rng = random.Random(20261125)
    root = _clone(seed_state, tmp_path / "state")
    ops, weights = ("retrain", "rollback", "install"), (5, 3, 2)
    durations: dict[str, list[float]] = {op: [] for op in ops}  # of runs that completed, fork to exit
    written_at: dict[str, float] = {}  # when a completed run wrote its new active.json (the file's mtime)
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    left_behind: set[str] = set()  # temporaries killed runs left

    def expected_after(op: str, before: ActiveState) -> ActiveState:
        if op == "retrain":  # the gate may also reject the candidate: then nothing changes
            return ActiveState(before.bundle, max(DeviceState(root).head_versions()) + 1, before.head)
        if op == "rollback":
            return ActiveState(before.bundle, before.previous_head, before.head)
        return before if before.head == 1 else ActiveState(before.bundle, 1, before.head)

    server = ForkServer(tmp_path / "fork-server.log")
    try:
        run = 0
        while outcomes["killed, old pair active"] + outcomes["killed, new pair active"] < RANDOM_KILLS:
            assert run < 3 * RANDOM_KILLS, f"too few runs were killed: {dict(outcomes)}"
            # one uncut run of each operation first; then half of the kills land anywhere in a run and
            # half between the write of the new active.json (its temp file's mtime) and the end
            op = ops[run] if run < len(ops) else rng.choices(ops, weights)[0]
            delay = None
            if durations[op]:
                duration = float(np.median(durations[op]))
                delay = rng.uniform(0.0 if rng.random() < 0.5 else written_at.get(op, 0.0), duration)
            before = check(root)
            allowed = {before, expected_after(op, before)}
            result = tmp_path / f"result-{run}.json"
            mtime = (root / "active.json").stat().st_mtime
            code, seconds, wall = server.run(op, root, device_bundle, result, delay)
            if code == 0:
                durations[op].append(seconds)
                if (root / "active.json").stat().st_mtime != mtime:
                    written_at[op] = (root / "active.json").stat().st_mtime - wall
            run += 1
            if code not in (0, KILLED):
                failures.append(f"run {run} ({op}): exit {code}; see {server.log}")
                continue
            left_behind.update(_leftovers(root))
            try:
                after = check(root)
            except Exception as exc:  # name the run; the state may be broken for the runs after it
                failures.append(f"run {run} ({op}, kill after {delay} s): {type(exc).__name__}: {exc}")
                break
            if after not in allowed:
                failures.append(f"run {run} ({op}): active {after} is neither the old pair nor the new one {allowed}")
            if code == 0:
                outcomes["completed"] += 1
                if op == "retrain":
                    assert after.head == json.loads(result.read_text())["active_head"]
            else:
                outcomes["killed, old pair active" if after == before else "killed, new pair active"] += 1
    finally:
        server.close()
    kinds = Counter(re.sub(r"(\.tmp-|\.json\.)\w+$", r"\1*", name) for name in left_behind)
    print(f"\nrandom kills: {run} runs, outcomes {dict(outcomes)}, temporaries left by killed runs {dict(kinds)}; "
          f"median durations {({op: round(float(np.median(d)), 3) for op, d in durations.items()})} s, "
          f"new active.json written at {({op: round(t, 3) for op, t in written_at.items()})} s")
    assert not failures, "\n".join(failures)

    # after all those crashes a plain CLI retrain completes and nothing is left behind
    proc = _cli("retrain", "--state", str(root), "--json")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert check(root).head == json.loads(out)["active_head"]
    assert _leftovers(root) == []


def test_every_returned_learn_survives_a_sigkill_of_the_learner(seed_state, tmp_path, check):
    rng = random.Random(7)
    root = _clone(seed_state, tmp_path / "state")
    classes = ["desserts", "hardware", "vehicles", "beverages", "fruit"]
    all_shas: dict[str, str] = {}
    summary = []
    for run, cls in enumerate(classes):
        images = _images(cls, 12, skip=10)
        shas = [hashlib.sha256(p.read_bytes()).hexdigest() for p in images]
        learner = subprocess.Popen([sys.executable, "-c", LEARNER, str(root), cls, *map(str, images)], env=_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert learner.stdout.readline().strip() == "ready", learner.stderr.read()
        confirmed = []
        wanted = rng.randint(1, 10)
        while len(confirmed) < wanted:
            line = learner.stdout.readline()
            assert line.endswith("\n"), f"learner stopped early: {line!r} {learner.stderr.read()[-2000:]}"
            confirmed.append(line.strip())
        time.sleep(rng.uniform(0.0, 0.15))  # about one learn() call: the kill lands anywhere in the next ones
        learner.send_signal(signal.SIGKILL)
        rest, err = learner.communicate(timeout=60)
        # lines printed before the kill but not read yet were confirmed too (a line without its newline was not)
        confirmed += [ln.strip() for ln in rest.splitlines(keepends=True) if ln.endswith("\n")]
        # on a quiet machine the learner can get through all its images before the kill lands: then it
        # says "finished" and may exit normally; every sample it printed must still be in the cache
        finished = "finished" in confirmed
        confirmed = [c for c in confirmed if c != "finished"]
        assert learner.returncode == KILLED or (finished and learner.returncode == 0), err
        assert confirmed == shas[:len(confirmed)], f"run {run}: unexpected output {confirmed}"

        present = _learned(root, shas)
        assert set(confirmed) <= set(present), f"run {run}: a learn that returned is not in the cache"
        assert all(present[sha] == cls for sha in confirmed), f"run {run}: wrong label"
        assert len(present) <= len(confirmed) + 1, f"run {run}: more committed than were learned"
        check(root)  # integrity_check ok, no sample without features, the active pair still complete
        all_shas.update(dict.fromkeys(shas, cls))
        summary.append(f"{len(confirmed)} returned/{len(present)} in the cache")
    print(f"\nlearner kills: {'; '.join(summary)}")

    # afterwards the cache takes the whole lot again, in a run that is not killed
    with Device(root) as dev:
        for cls in classes:
            dev.learn(_images(cls, 12, skip=10), cls)
    assert _learned(root, list(all_shas)) == all_shas
    check(root)
