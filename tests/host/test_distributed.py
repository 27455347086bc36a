"""Partial fine-tuning under torchrun (issue 28, acceptance 4): two gloo processes reproduce the single-process run.

Each process runs the frozen prefix only on the images it holds, steps over its share of every global batch
(the single process's batches), DistributedDataParallel all-reduces the gradients and the tail's BatchNorm uses
the whole batch's statistics; rank 0 alone writes the run. The two runs differ only by the head's dropout masks
(each process draws its own), so the comparison allows that noise and no more.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")

#: the same small partial recipe for both runs: 240 demo images, half of them validation (1 image = 0.83 points)
ARGS = ["--mode", "partial", "--unfreeze", "1", "--epochs", "2", "--views", "1", "--val-fraction", "0.5",
        "--device", "cpu", "--seed", "0"]


def _run(args, tmp_path, processes: int, timeout=600):
    """``python ARGS`` (one process) or ``torchrun --nproc_per_node 2 ARGS``, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # a shared CPU: one thread per process
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 \
        else []
    return subprocess.run([sys.executable, *launcher, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


#: run by two processes: a batch split unevenly (one share empty) through GlobalBatchNorm2d must give the
#: full batch's outputs, input and parameter gradients and running statistics; gather_rows puts rows in order
BATCHNORM_CHECK = textwrap.dedent("""
    import numpy as np, torch
    from torch import nn
    from edgexfer import distributed
    world = distributed.join("cpu")
    torch.manual_seed(0)
    full = nn.BatchNorm2d(3, eps=1e-3, momentum=0.01)
    with torch.no_grad():
        full.weight.uniform_(0.5, 1.5); full.bias.uniform_(-1, 1)
    mine = distributed.sync_batchnorm(nn.Sequential(full.__class__(3, eps=1e-3, momentum=0.01)))
    mine[0].load_state_dict(full.state_dict())
    for step, cut in enumerate([5, 2, 0]):  # rank 0 holds rows [:cut], rank 1 the rest of 5
        x = torch.randn(5, 3, 4, 4) * 3 + 1
        r = torch.randn(5, 3, 4, 4)
        xf = x.clone().requires_grad_(True)
        yf = full(xf)
        (yf * r).sum().backward()
        rows = slice(0, cut) if world.rank == 0 else slice(cut, 5)
        xs = x[rows].clone().requires_grad_(True)
        y = mine(xs)
        (y * r[rows]).sum().backward()
        for p in mine.parameters():
            torch.distributed.all_reduce(p.grad)
        torch.testing.assert_close(y, yf[rows], rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            full.eval(); mine.eval()
            torch.testing.assert_close(mine[0].running_mean, full.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mine[0].running_var, full.running_var, rtol=1e-5, atol=1e-6)
            full.train(); mine.train()
        torch.testing.assert_close(xs.grad, xf.grad[rows], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine[0].weight.grad, full.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine[0].bias.grad, full.bias.grad, rtol=1e-4, atol=1e-5)
        full.zero_grad(); mine.zero_grad()
    owner = np.array([1, 0, 0, 1, 1])
    rows = torch.tensor([[float(i)] for i in np.flatnonzero(owner == world.rank)])
    assert world.gather_rows(rows, owner).flatten().tolist() == [0, 1, 2, 3, 4]
    out = world.gather_rows(rows, owner, to_all=False)
    assert (out is None) == (world.rank != 0)
    distributed.leave()
    print(f"ok{world.rank}", flush=True)  # one write: the two processes share stdout
""")


def test_global_batchnorm_over_two_processes_equals_one_batchnorm_over_the_whole_batch(tmp_path):
    (tmp_path / "check.py").write_text(BATCHNORM_CHECK)
    proc = _run(["check.py"], tmp_path, processes=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ok0" in proc.stdout and "ok1" in proc.stdout


def _head(run_dir):
    from edgexfer.runtime.heads import Head

    return Head.load(run_dir / "head.safetensors")


@pytest.mark.slow
def test_torchrun_two_processes_match_the_single_process_run(demo_data, tmp_path):
    single = _run(["-m", "edgexfer", "train", str(demo_data), "--out", str(tmp_path / "one"), *ARGS, "--json",
                   "--quiet"], tmp_path, processes=1)
    assert single.returncode == 0, single.stderr[-4000:]
    one = json.loads(single.stdout)

    proc = _run(["-m", "edgexfer", "train", str(demo_data), "--out", str(tmp_path / "two"), *ARGS, "--json"],
                tmp_path, processes=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads(proc.stdout)  # one JSON object: only rank 0 reports
    assert two["processes"] == 2 and one["processes"] == 1
    assert "2 processes, gloo" in proc.stderr  # rank 0's log
    assert proc.stderr.count("frozen prefix:") == 1  # the other rank logs nothing

    run_one = json.loads((tmp_path / "one" / "run.json").read_text())
    run_two = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run_one["val"] == run_two["val"] and run_one["train"] == run_two["train"]  # the same split
    assert one["val_count"] == two["val_count"] >= 100
    assert abs(one["val_accuracy"] - two["val_accuracy"]) <= 0.02
    for key in ("train_loss", "train_accuracy"):  # every process's share of every batch is counted
        assert abs(one["history"][0][key] - two["history"][0][key]) < 0.05, (one["history"], two["history"])

    # The heads: the final head is fit_linear on all processes' tuned features. Measured on this data, a second
    # dropout seed alone moves W by ~3% (relative L2); two processes without the gradient all-reduce by ~13%.
    w1, w2 = _head(tmp_path / "one").tensors["W"], _head(tmp_path / "two").tensors["W"]
    print("val accuracy", one["val_accuracy"], two["val_accuracy"], "head W rel diff",
          np.linalg.norm(w1 - w2) / np.linalg.norm(w1), "seconds", one["seconds"], two["seconds"])
    assert np.linalg.norm(w1 - w2) / np.linalg.norm(w1) < 0.08
    for name in ("backbone.onnx", "head.safetensors", "metrics.json", "run.json"):
        assert (tmp_path / "two" / name).is_file()
