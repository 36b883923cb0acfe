"""Checkpoints: kill-and-resume equals an uninterrupted run; a corrupt newest checkpoint falls
back to the previous one; a checkpoint of another configuration is refused; SIGTERM saves."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastclt
from fastclt.train import main
from fastclt.training.checkpointing import find_checkpoints, merge_checkpoint

ARGS = ["--model.n_layers", "2", "--model.d_in", "16", "--model.d_out", "16", "--model.n_features", "32",
        "--model.activation", "topk", "--model.k", "2", "--data.n_true", "16", "--data.true_l0", "2",
        "--train.steps", "20", "--train.batch_size", "64", "--train.lr_warmup_steps", "4",
        "--train.dead_tokens", "128", "--train.init_samples", "128", "--train.eval_batches", "1",
        "--train.device", "cpu", "--train.grad_accum", "2", "--data.prefetch", "2",
        "--log.every", "1", "--log.progress", "false", "--log.plot", "false", "--checkpoint.every", "5"]


def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(out / "metrics.jsonl"))]


def _weights(out):
    return fastclt.CrossLayerTranscoder.from_pretrained(out / "model").state_dict()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert main(ARGS + ["--out_dir", str(out)]) == 0
    return out


def _same_as(reference, out):
    assert _losses(out) == _losses(reference)
    a, b = _weights(reference), _weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stop_and_resume_equals_uninterrupted(reference, tmp_path):
    assert main(ARGS + ["--out_dir", str(tmp_path), "--train.max_steps", "7"]) == 0
    assert not (tmp_path / "model").exists()
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000007", "step_00000005"]
    assert main(ARGS + ["--out_dir", str(tmp_path)]) == 0
    _same_as(reference, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["tokens"] == 20 * 2 * 64
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "config.json").is_file()


def test_corrupt_checkpoint_falls_back(reference, tmp_path, capsys):
    assert main(ARGS + ["--out_dir", str(tmp_path), "--train.max_steps", "12"]) == 0
    newest = find_checkpoints(tmp_path)[0]
    assert newest.name == "step_00000012"
    shard = newest / "rank_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    assert main(ARGS + ["--out_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step_00000012" in out and "unusable" in out and "resumed from" in out and "step 10" in out
    _same_as(reference, tmp_path)
    # the corrupt one is set aside (not counted among the kept ones); the good ones rotate as usual
    assert (tmp_path / "checkpoints" / "step_00000012.corrupt").is_dir()
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000020", "step_00000015"]


def test_mismatched_config_is_refused(reference, tmp_path, capsys):
    assert main(ARGS + ["--out_dir", str(tmp_path), "--train.max_steps", "5"]) == 0
    saved = (tmp_path / "config.json").read_text()
    rc = main(ARGS + ["--out_dir", str(tmp_path), "--model.n_features", "64"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "model.n_features" in err
    merge_checkpoint(find_checkpoints(tmp_path)[0])  # still intact
    assert (tmp_path / "config.json").read_text() == saved


def test_sigterm_checkpoints_and_resumes(reference, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(fastclt.__file__).parent.parent))
    args = [a if a != "20" else "400" for a in ARGS]  # long enough to be interrupted
    args[args.index("--checkpoint.every") + 1] = "0"
    proc = subprocess.Popen([sys.executable, "-m", "fastclt.train", *args, "--out_dir", str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by a signal" in out
    ck = find_checkpoints(tmp_path)
    assert len(ck) == 1
    step = int(ck[0].name.split("_")[1])
    assert 3 <= step < 400
    lines = metrics.read_text().splitlines()
    assert json.loads(lines[-1])["step"] == step


def test_resume_never_refuses_a_folder_with_checkpoints(reference, capsys):
    assert main(ARGS + ["--out_dir", str(reference), "--checkpoint.resume", "never"]) == 2
    assert "checkpoint.resume" in capsys.readouterr().err
    assert len(find_checkpoints(reference)) == 2  # untouched
