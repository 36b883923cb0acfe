"""Activation sources: shards written by `python -m fastclt.extract` train exactly like on-the-fly
extraction from the same (tiny, random, local) GPT-2; llama-style blocks are found too; shards
shuffle deterministically."""
import json

import pytest
import torch

from fastclt.train import main

transformers = pytest.importorskip("transformers")

D, LAYERS, CTX = 16, 2, 8
COMMON = ["--model.n_layers", str(LAYERS), "--model.d_in", str(D), "--model.d_out", str(D),
          "--model.n_features", "32", "--model.activation", "batchtopk", "--model.k", "2",
          "--train.steps", "6", "--train.batch_size", "32", "--train.init_samples", "32",
          "--train.lr_warmup_steps", "2", "--train.eval_batches", "1", "--train.device", "cpu",
          "--data.ctx_len", str(CTX), "--log.every", "1", "--log.progress", "false", "--log.plot", "false",
          "--checkpoint.every", "0", "--eval.n_seqs", "0"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_embd=D, n_head=2, vocab_size=97, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def _losses(out):
    return [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


def test_extracted_shards_train_like_on_the_fly(gpt2, tmp_path):
    from fastclt.extract import main as extract
    shards = tmp_path / "shards"
    # 7 batches of 32 tokens (6 steps + 1 eval); several small shards
    assert extract(["--model", str(gpt2), "--out", str(shards), "--layers", "0,1", "--n_tokens", str(7 * 32),
                    "--ctx_len", str(CTX), "--shard_tokens", "48", "--seqs_per_forward", "3"]) == 0
    m = json.loads((shards / "manifest.json").read_text())
    assert m["n_tokens"] == 7 * 32 and m["n_layers"] == LAYERS and m["d_in"] == D and len(m["shards"]) == 5
    assert main(COMMON + ["--data.source", "hf", "--data.model", str(gpt2), "--data.shuffle", "false",
                          "--out_dir", str(tmp_path / "hf")]) == 0
    assert main(COMMON + ["--data.source", "shards", "--data.path", str(shards), "--data.shuffle", "false",
                          "--out_dir", str(tmp_path / "sh")]) == 0
    a, b = _losses(tmp_path / "hf"), _losses(tmp_path / "sh")
    assert len(a) == 6 and a == pytest.approx(b, rel=1e-6, abs=1e-7)
    # shuffled: a different order of the same tokens, and deterministic
    for name in ("s1", "s2"):
        assert main(COMMON + ["--data.source", "shards", "--data.path", str(shards), "--out_dir",
                              str(tmp_path / name)]) == 0
    assert _losses(tmp_path / "s1") == _losses(tmp_path / "s2") != b


def test_hf_blocks_gpt2_and_llama(gpt2, tmp_path):
    from fastclt.training.extract import HFExtractor
    ex = HFExtractor(gpt2, [0, 2], ctx_len=CTX)
    x, y, _ = ex.activations(0, 2)
    assert x.shape == y.shape == (2 * CTX, 2, D)
    # the hooks capture exactly the MLP's input and output
    ids = ex.token_ids(0, 2)
    with torch.no_grad():
        hs = ex.lm(input_ids=ids, output_hidden_states=True).hidden_states
        block = ex.lm.transformer.h[2]
        mlp_in = block.ln_2(hs[2] + block.attn(block.ln_1(hs[2]))[0])
    assert torch.allclose(x[:, 1].view(2, CTX, D), mlp_in, atol=1e-5)
    assert torch.allclose(y[:, 1], block.mlp(mlp_in).flatten(0, 1), atol=1e-5)
    lcfg = transformers.LlamaConfig(hidden_size=D, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    transformers.LlamaForCausalLM(lcfg).save_pretrained(tmp_path / "llama")
    x, y, _ = HFExtractor(tmp_path / "llama", [0, 1], ctx_len=CTX).activations(3, 1)
    assert x.shape == y.shape == (CTX, 2, D) and torch.isfinite(y).all()
