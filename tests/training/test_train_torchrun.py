"""The real launcher (torchrun is ``python -m torch.distributed.run``, what ``make train`` runs):
--standalone, 2 gloo ranks, tp=2 — the same loss curve as one process; and a chaos run: the same
training killed at random (seeded) points — SIGKILL of the launcher (its workers must die with it),
SIGKILL of one worker, SIGTERM of the launcher (the workers checkpoint and stop) — then resumed,
ends bit-identical to the uninterrupted run."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastclt
from fastclt.train import main
from fastclt.training.checkpointing import find_checkpoints

ARGS = ["--model.dtype", "float64", "--model.n_features", "64", "--model.activation", "topk", "--model.k", "3",
        "--train.steps", "24", "--train.batch_size", "64", "--train.init_samples", "64", "--train.device", "cpu",
        "--train.eval_batches", "1", "--log.progress", "false", "--log.plot", "false", "--checkpoint.every", "1"]
ENV = {"PYTHONPATH": str(Path(fastclt.__file__).parent.parent), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def _launch(out: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "fastclt.train", *ARGS, "--train.tp", "2", "--out_dir", str(out)],
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, env=ENV)


def _records(out: Path) -> list:
    path = out / "metrics.jsonl"
    recs = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            recs.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return recs


def _processes_of(out: Path) -> list:
    """Pids of live processes whose command line names ``out`` (the launcher and its workers)."""
    key = str(out).encode()
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if key in Path(f"/proc/{d}/cmdline").read_bytes():
                    found.append(int(d))
            except OSError:
                pass
    return found


def _children(pid: int) -> list:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d))
    return kids


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun") / "tp2"
    proc = _launch(out, out.parent / "log.txt")
    assert proc.wait(timeout=300) == 0, (out.parent / "log.txt").read_text()[-3000:]
    return out


def test_torchrun_entry_point(uninterrupted, tmp_path):
    """torchrun --standalone, 2 gloo ranks, tp=2: the same loss curve as one process."""
    assert main(ARGS + ["--out_dir", str(tmp_path / "tp1")]) == 0

    def curve(out):
        return [r["loss"] for r in _records(out)]
    a, b = curve(tmp_path / "tp1"), curve(uninterrupted)
    assert len(a) == 24 and all(abs(x - y) <= 1e-9 * abs(x) for x, y in zip(a, b))


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="reads /proc; the workers' parent-death signal is Linux's")
def test_killed_at_random_points_then_resumed_is_bit_identical(uninterrupted, tmp_path):
    rng = random.Random(20261203)
    out, log = tmp_path / "run", tmp_path / "log.txt"
    try:
        for who, sig in (("launcher", signal.SIGKILL), ("worker", signal.SIGKILL), ("launcher", signal.SIGTERM)):
            before = len(_records(out))
            proc = _launch(out, log)
            target = before + rng.randint(2, 5)  # a few steps in (resumed runs first truncate the metrics)
            _wait_for(lambda: len(_records(out)) >= target or proc.poll() is not None, 120, f"step {target}")
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(rng.uniform(0, 0.05))  # somewhere in a step or a checkpoint write
            victim = proc.pid if who == "launcher" else rng.choice(_children(proc.pid))
            os.kill(victim, sig)
            rc = proc.wait(timeout=120)
            # the workers die with their launcher (they run in sessions of their own): none trains on
            _wait_for(lambda: not _processes_of(out), 15, f"the workers to exit after {who} got {sig.name}")
            assert not (out / "model").exists(), log.read_text()[-3000:]
            if sig == signal.SIGTERM:
                # every worker checkpointed at the same step and exited 0; torchrun itself exits 1
                # with its SignalException traceback (documented in docs/TRAINING.md)
                text = log.read_text()
                stopped = text.rsplit("stopped by a signal at step ", 1)[1].split(";")[0]
                assert rc == 1 and find_checkpoints(out)[0].name == f"step_{int(stopped):08d}", text[-3000:]
            else:
                assert rc != 0
        proc = _launch(out, log)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        for pid in _processes_of(out):
            os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert text.count("resumed from") == 3, text[-3000:]
    a, b = _records(uninterrupted), _records(out)
    assert [(r["step"], r["loss"], r["fvu"]) for r in a] == [(r["step"], r["loss"], r["fvu"]) for r in b]
    m1 = fastclt.CrossLayerTranscoder.from_pretrained(uninterrupted / "model").state_dict()
    m2 = fastclt.CrossLayerTranscoder.from_pretrained(out / "model").state_dict()
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
