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


def test_sigterm_checkpoints_and_resumes(reference, tmp_path, capsys):
    """SIGTERM: the step finishes, a checkpoint is written, status 0. While that run is writing, a
    second run on the same out_dir is refused (its lock) and changes nothing."""
    env = dict(os.environ, PYTHONPATH=str(Path(fastclt.__file__).parent.parent))
    args = [a if a != "20" else "400" for a in ARGS]  # long enough to be interrupted
    args[args.index("--checkpoint.every") + 1] = "0"
    proc = subprocess.Popen([sys.executable, "-m", "fastclt.train", *args, "--out_dir", str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    lines = metrics.read_text().splitlines()
    assert main(args + ["--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "out_dir" in err and "in use by another training run" in err and f"pid {proc.pid}" in err, err
    assert metrics.read_text().splitlines()[:len(lines)] == lines  # not restarted, nothing truncated
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


def _snapshot(out):
    """{relative path: bytes} of every file under ``out`` but the lock (which records its last holder):
    what a refused run must leave as it was."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_unusable_checkpoints_are_never_trained_over(reference, tmp_path, capsys):
    """An edited rank JSON (state.step, state.tokens) makes its checkpoint unusable (the state is kept
    with the tensors, under their hash); an explicit --checkpoint.resume to it is an error that changes
    nothing; when every checkpoint is unusable the run refuses to start over (again on a rerun) until
    --checkpoint.start_over, which sets them aside under fresh names (an older step_X.corrupt is kept)
    and trains from step 0 — to the uninterrupted run's result."""
    assert main(ARGS + ["--out_dir", str(tmp_path), "--train.max_steps", "12"]) == 0
    ck = find_checkpoints(tmp_path)
    assert [p.name for p in ck] == ["step_00000012", "step_00000010"]
    for folder, key, value in ((ck[0], "step", 400), (ck[1], "tokens", 7)):
        f = folder / "rank_00000.json"
        info = json.loads(f.read_text())
        info["state"][key] = value
        f.write_text(json.dumps(info))
    (tmp_path / "checkpoints" / "step_00000012.corrupt").mkdir()  # an earlier corruption of the same step
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main(ARGS + ["--out_dir", str(tmp_path), "--checkpoint.resume", str(ck[1])]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.resume" in err and "step_00000010" in err and "nothing was changed" in err, err
    for _ in range(2):  # the refusal repeats: nothing was set aside
        assert main(ARGS + ["--out_dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "every checkpoint" in err and "checkpoint.start_over" in err, err
        assert "step_00000012" in err and "step_00000010" in err and "state" in err, err
        assert _snapshot(tmp_path) == before
    assert main(ARGS + ["--out_dir", str(tmp_path), "--checkpoint.start_over", "true"]) == 0
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000010.corrupt", "step_00000012.corrupt", "step_00000012.corrupt.1", "step_00000015",
                     "step_00000020"], names
    _same_as(reference, tmp_path)


def test_explicit_defaults_resume_and_files_follow_the_umask(reference, tmp_path, capsys):
    """A resumed run that spells out defaults (--model.normalization none, --model.decoder_tying none)
    is the same configuration; temporary files of an interrupted write are removed; every file is
    created with the process's umask (0644 under 022), not 0600."""
    old = os.umask(0o022)
    try:
        assert main(ARGS + ["--out_dir", str(tmp_path), "--train.max_steps", "7"]) == 0
        stale = [tmp_path / ".config.json.0badc0de.tmp",
                 find_checkpoints(tmp_path)[0] / ".rank_00000.json.1a2b3c4d.tmp"]
        for p in stale:
            p.write_text("half a write")
        assert main(ARGS + ["--out_dir", str(tmp_path), "--model.normalization", "none",
                            "--model.decoder_tying", "none", "--model.skip_connection", "false"]) == 0
    finally:
        os.umask(old)
    assert "resumed from" in capsys.readouterr().out
    _same_as(reference, tmp_path)
    assert not any(p.exists() for p in stale)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert modes and all(m == 0o644 for m in modes.values()), modes


def test_rerunning_a_finished_run_changes_nothing(reference, capsys):
    summary = (reference / "summary.json").read_bytes()
    assert json.loads(summary)["tokens_per_s"] > 0
    model = (reference / "model" / "model.safetensors").read_bytes()
    assert main(ARGS + ["--out_dir", str(reference)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert (reference / "summary.json").read_bytes() == summary
    assert (reference / "model" / "model.safetensors").read_bytes() == model


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    """A write that fails (ENOSPC) while saving step 10: a clear error (status 2), the incomplete
    folder and its temporary files removed, the checkpoint of step 5 intact."""
    import errno

    import safetensors.torch
    real = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        if "step_00000010" in str(Path(filename).parent):
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert main(ARGS + ["--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step_00000010" in err and "step_00000005 is kept" in err, err
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000005"]
    assert not list(tmp_path.rglob("*.tmp"))
    merge_checkpoint(find_checkpoints(tmp_path)[0])  # intact


def test_resume_state_is_cross_checked_with_the_folder_and_meta(reference, tmp_path):
    """The state kept with the tensors must agree with the folder's name, meta.json and the rank JSON's
    config fingerprint: a renamed folder (with or without meta.json edited to match), a rank's files
    copied from another step, a rank JSON relabelled to another configuration — each refused."""
    import shutil

    from fastclt.checkpoint import CheckpointError
    from fastclt.training.checkpointing import load_checkpoint
    from fastclt.training.config import load_config
    from fastclt.training.parallel import Layout
    fp = load_config(ARGS + ["--out_dir", str(tmp_path)]).fingerprint()
    shutil.copytree(reference / "checkpoints", tmp_path / "ck")
    new, old = tmp_path / "ck" / "step_00000020", tmp_path / "ck" / "step_00000015"
    assert load_checkpoint(new, Layout(), fp, "cpu")[1] == {"step": 20, "micro": 40, "tokens": 20 * 2 * 64}

    def refused(folder, pattern, fingerprint=fp):
        with pytest.raises(CheckpointError, match=pattern):
            load_checkpoint(folder, Layout(), fingerprint, "cpu")
    renamed = tmp_path / "ck" / "step_00000021"
    shutil.copytree(new, renamed)
    refused(renamed, "meta.json records step 20, not the step of the folder's name")
    meta = json.loads((renamed / "meta.json").read_text())
    (renamed / "meta.json").write_text(json.dumps({**meta, "step": 21}))
    refused(renamed, r"does not agree .*meta.json step 21")
    for suffix in ("json", "safetensors"):  # both files of step 15's rank 0, consistent with each other
        shutil.copy(old / f"rank_00000.{suffix}", new / f"rank_00000.{suffix}")
    refused(new, r"does not agree \(step or rank; meta.json step 20\)")
    info = json.loads((old / "rank_00000.json").read_text())
    info["fingerprint"]["train.lr"] *= 2
    (old / "rank_00000.json").write_text(json.dumps(info))
    refused(old, r"does not agree \(fingerprint_sha256", fingerprint={**fp, "train.lr": fp["train.lr"] * 2})
