"""The commands of docs/TRAINING_THROUGH_LM.md run as written, at tiny size: each ``python -m
fastclt.…`` line of its bash blocks, with $LM / $BASE / $REF / $TOKENS set to tiny local models and
'random', and size options appended (later options win), in a scratch folder."""
import copy
import os
import pathlib
import re
import shlex

import pytest
import torch

transformers = pytest.importorskip("transformers")

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "TRAINING_THROUGH_LM.md"
TINY = {
    "fastclt.train": ["--model.d_in", "32", "--model.n_features", "32", "--train.steps", "3", "--train.batch_size",
                      "32", "--data.ctx_len", "16", "--train.init_samples", "64", "--train.lr_warmup_steps", "1",
                      "--train.eval_batches", "1", "--eval.n_seqs", "2", "--eval.per_layer", "false",
                      "--log.progress", "false", "--log.plot", "false", "--train.device", "cpu"],
    "fastclt.eval": ["--n_seqs", "2", "--ctx_len", "8", "--device", "cpu"],
    "fastclt.adapters": ["--n_features", "16", "--steps", "2", "--batch_size", "2", "--ctx_len", "8",
                         "--eval_every", "0", "--eval_seqs", "2", "--no_progress", "--device", "cpu"],
}


def _commands() -> list:
    text = DOC.read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            if cmd.strip().startswith("python -m fastclt."):
                cmds.append(cmd.strip())
    return cmds


def test_the_documented_commands_run(tmp_path, monkeypatch):
    from fastclt.adapters import main as adapters_main
    from fastclt.eval import main as eval_main
    from fastclt.train import main as train_main
    mains = {"fastclt.train": train_main, "fastclt.eval": eval_main, "fastclt.adapters": adapters_main}
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0,
                                  eos_token_id=0)
    lm = transformers.GPT2LMHeadModel(cfg)
    lm.save_pretrained(tmp_path / "lm")
    ref = copy.deepcopy(lm)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".mlp." in name:
                p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "ref")
    env = {"LM": str(tmp_path / "lm"), "BASE": str(tmp_path / "lm"), "REF": str(tmp_path / "ref"), "TOKENS": "random"}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "environ", {**os.environ, **env})
    cmds = _commands()
    assert [c.split()[2] for c in cmds] == ["fastclt.train", "fastclt.train", "fastclt.eval", "fastclt.adapters"]
    for cmd in cmds:
        argv = shlex.split(os.path.expandvars(cmd))
        module = argv[2]
        assert mains[module](argv[3:] + TINY[module]) == 0, cmd
    assert (tmp_path / "runs" / "kl" / "eval.json").is_file()
    from fastclt.adapters import AdaptedModel
    assert AdaptedModel.from_pretrained(tmp_path / "runs" / "adapters" / "model").adapters.n_layers == 2
