"""Training from a real (tiny) language model, end to end: a GPT-2 trained here for a few hundred
steps on a small local corpus with structure, then extraction → CLT training → evaluation of the
replacement model (trainer and command line); the seeded shuffle buffer of on-the-fly extraction
(mixing, exact resume); BOS handling, the resid_mid hook and the recorded metadata; token sources
(text, .npy, datasets)."""
import json
import random

import numpy as np
import pytest
import torch

import fastclt
from fastclt.eval import evaluate_replacement, main as eval_main
from fastclt.train import main as train_main
from fastclt.training.data import TokenBuffer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CTX, D = 32, 32
NO_LOG = ["--log.progress", "false", "--log.plot", "false", "--train.device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


def _corpus(n_sentences: int, seed: int = 0) -> str:
    """Sentences of a small grammar: word order, agreement-free templates and counting."""
    rng = random.Random(seed)
    nouns = "cat dog bird fish fox owl bee ant cow pig hen rat".split()
    adjs = "red big old small blue tall fast slow".split()
    verbs = "sees likes chases finds eats hears".split()
    places = "park river house garden forest".split()
    out = []
    for _ in range(n_sentences):
        a, b, k = rng.choice(nouns), rng.choice(nouns), rng.randrange(3)
        if k == 0:
            out.append(f"the {rng.choice(adjs)} {a} {rng.choice(verbs)} the {b} .")
        elif k == 1:
            out.append(f"a {a} in the {rng.choice(places)} {rng.choice(verbs)} a {rng.choice(adjs)} {b} .")
        else:
            out.append(" ".join(["one", "two", "three", "four", "five"][:rng.randrange(1, 5)]) + f" {a} .")
    return " ".join(out)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A word-level tokenizer and a 2-block GPT-2 trained on the corpus, saved as a local model folder."""
    root = tmp_path_factory.mktemp("lm")
    text = _corpus(6000)
    (root / "corpus.txt").write_text(text)
    words = sorted(set(text.split()))
    vocab = {w: i for i, w in enumerate(["<bos>", "<unk>"] + words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>",
                                                unk_token="<unk>")
    ids = torch.tensor(fast(text, add_special_tokens=False)["input_ids"])
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=D, n_head=4, vocab_size=len(vocab), n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    lm = transformers.GPT2LMHeadModel(cfg)
    seqs = ids[:len(ids) // (CTX - 1) * (CTX - 1)].view(-1, CTX - 1)
    seqs = torch.cat([torch.zeros(len(seqs), 1, dtype=torch.long), seqs], 1)  # BOS first, as the runs below
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        batch = seqs[torch.randint(0, len(seqs), (16,), generator=g)]
        loss = lm(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.save_pretrained(root / "lm")
    fast.save_pretrained(root / "lm")
    return root


def _evals(out):
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if "eval/kl" in r]


def test_end_to_end_extract_train_evaluate(lm_dir, tmp_path):
    from fastclt.extract import main as extract
    lm, corpus = lm_dir / "lm", lm_dir / "corpus.txt"
    shards = tmp_path / "shards"
    assert extract(["--model", str(lm), "--out", str(shards), "--tokens", str(corpus), "--ctx_len", str(CTX),
                    "--prepend_bos", "--n_tokens", "12000", "--shard_tokens", "4096"]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["input_hook"] == "mlp_in" and manifest["layers"] == [0, 1] and manifest["prepend_bos"]
    assert manifest["exclude_bos"] and manifest["n_tokens"] == 12000
    out = tmp_path / "run"
    args = ["--data.source", "shards", "--data.path", str(shards), "--model.n_layers", "2", "--model.d_in", str(D),
            "--model.d_out", str(D), "--model.n_features", "128", "--model.activation", "topk", "--model.k", "8",
            "--model.normalization", "mean_std", "--train.steps", "200", "--train.batch_size", "256",
            "--train.lr", "1e-2", "--train.lr_warmup_steps", "20", "--train.init_samples", "2048",
            "--train.eval_every", "100", "--train.eval_batches", "2", "--eval.lm", str(lm),
            "--eval.n_seqs", "24", "--eval.batch_size", "8", "--checkpoint.every", "0", "--out_dir", str(out)]
    # shards know what they hold: a contradicting input hook or block list is refused
    assert train_main(args + NO_LOG + ["--data.input_hook", "resid_mid"]) == 2
    assert train_main(args + NO_LOG + ["--data.layers", "[0, 2]"]) == 2
    assert train_main(args + NO_LOG) == 0
    evals = _evals(out)
    assert [r["step"] for r in evals] == [0, 100, 200]
    first, last = evals[0], evals[-1]
    assert last["eval/ce_recovered"] > 0.9, last
    assert last["eval/kl"] < 0.1 * first["eval/kl"], (first, last)
    assert last["eval/ce_ablated"] > last["eval/ce_clean"] + 1  # the MLPs matter in this LM
    for l in range(2):
        assert last[f"eval/layer{l}/ce_recovered"] > 0.8
    summary = json.loads((out / "summary.json").read_text())
    rep = summary["replacement"]
    assert rep["kl"] == last["eval/kl"] and len(rep["per_layer"]) == 2 and rep["lm_layers"] == [0, 1]
    model = fastclt.CrossLayerTranscoder.from_pretrained(out / "model")
    assert (model.cfg.lm_name, model.cfg.lm_layers, model.cfg.input_hook) == (str(lm.resolve()), [0, 1], "mlp_in")
    # the command line: the LM from the model's config, the same numbers as the library call
    js, png = tmp_path / "eval.json", tmp_path / "eval.png"
    assert eval_main(["--model", str(out / "model"), "--tokens", str(corpus), "--ctx_len", str(CTX), "--n_seqs", "8",
                      "--prepend_bos", "--json", str(js), "--plot", str(png), "--device", "cpu"]) == 0
    cli = json.loads(js.read_text())
    assert png.stat().st_size > 1000 and len(cli["per_layer"]) == 2
    from fastclt.lm import load_lm
    from fastclt.tokens import TokenSource
    lm_model = load_lm(lm)
    ids = TokenSource(str(corpus), CTX, vocab_size=lm_model.config.vocab_size, tokenizer=str(lm), prepend_bos=True,
                      bos_id=0).sequences(0, 8)
    direct = evaluate_replacement(model, lm_model, ids)
    for key in ("kl", "ce_clean", "ce_spliced", "ce_ablated", "ce_recovered", "fvu", "l0"):
        assert cli[key] == pytest.approx(direct[key], rel=1e-6), key


def _hf_args(lm_dir, out, *extra):
    return ["--data.source", "hf", "--data.model", str(lm_dir / "lm"), "--data.tokens", str(lm_dir / "corpus.txt"),
            "--data.ctx_len", "16", "--data.prepend_bos", "true", "--data.input_hook", "resid_mid",
            "--data.seqs_per_forward", "3", "--data.buffer_batches", "4", "--model.n_layers", "2",
            "--model.d_in", str(D), "--model.d_out", str(D), "--model.n_features", "64", "--model.activation",
            "topk", "--model.k", "4", "--model.cross_layer", "false", "--train.steps", "12",
            "--train.batch_size", "40", "--train.init_samples", "80", "--train.lr_warmup_steps", "2",
            "--train.eval_batches", "1", "--eval.n_seqs", "4", "--eval.per_layer", "false", "--log.every", "1",
            "--checkpoint.every", "4", "--out_dir", str(out), *extra] + NO_LOG


def test_on_the_fly_resume_with_shuffle_buffer_is_exact(lm_dir, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert train_main(_hf_args(lm_dir, ref)) == 0
    assert train_main(_hf_args(lm_dir, cut, "--train.max_steps", "6")) == 0  # checkpoints at 4 and 6
    assert train_main(_hf_args(lm_dir, cut)) == 0
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, open(o / "metrics.jsonl")) if "loss" in r]
              for o in (ref, cut)]
    assert len(losses[0]) == 12 and losses[0] == losses[1]
    a = fastclt.CrossLayerTranscoder.from_pretrained(ref / "model")
    b = fastclt.CrossLayerTranscoder.from_pretrained(cut / "model")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert (a.cfg.input_hook, a.cfg.lm_layers, a.cfg.cross_layer) == ("resid_mid", [0, 1], False)
    assert json.loads((ref / "summary.json").read_text())["replacement"]["input_hook"] == "resid_mid"
    # the checkpoint holds the buffer as token ids, not activations
    from fastclt.checkpoint import load_tensors
    from fastclt.training.checkpointing import find_checkpoints
    t = load_tensors(find_checkpoints(cut)[0] / "rank_00000.safetensors")
    assert t["train/data.ids"].dtype == torch.int64 and 0 < t["train/data.ids"].numel() <= 4 * 40 + 3 * 16


# ------------------------------------------------------------------ the shuffle buffer
def _stream(T=10, G=2, drop=()):
    """produce(q): token ids of group q (G sequences of T), x carrying each token's id."""
    def produce(q):
        ids = torch.arange(q * G * T, (q + 1) * G * T)
        ids = ids[~torch.isin(ids % T, torch.tensor(list(drop), dtype=torch.long))] if drop else ids
        x = ids.double()[:, None, None].expand(-1, 1, 3).clone()
        return x, -x, ids
    return produce, (lambda ids: ids // (G * T))


def test_token_buffer_mixes_and_loses_nothing():
    produce, group_of = _stream(drop=(0,))  # position 0 (BOS) excluded
    fifo = TokenBuffer(produce, group_of, 12, 12, False, seed=0)
    buf = TokenBuffer(produce, group_of, 12, 96, True, seed=0)
    seen_fifo = torch.cat([fifo.next()[0][:, 0, 0] for _ in range(20)]).long()
    assert torch.equal(seen_fifo, torch.arange(300)[torch.arange(300) % 10 != 0][:240])  # stream order
    seen, mixed = [], []
    for _ in range(20):
        x, y = buf.next()
        assert torch.equal(y, -x)
        ids = x[:, 0, 0].long()
        seen.append(ids)
        mixed.append(len(set((ids // 10).tolist())))
    seen = torch.cat(seen)
    assert len(set(seen.tolist())) == len(seen)  # no token twice
    assert not (seen % 10 == 0).any()
    # everything produced so far is either delivered or still in the buffer
    produced = torch.cat([produce(q)[2] for q in range(buf.next_group)])
    assert sorted(torch.cat([seen, buf.ids[:buf.n]]).tolist()) == produced.tolist()
    assert min(mixed) >= 6  # a FIFO batch of 12 tokens spans 2 sequences; these span many
    again = TokenBuffer(produce, group_of, 12, 96, True, seed=0)
    assert torch.equal(torch.cat([again.next()[0][:, 0, 0] for _ in range(20)]).long(), seen)
    other = TokenBuffer(produce, group_of, 12, 96, True, seed=1)
    assert not torch.equal(other.next()[0], TokenBuffer(produce, group_of, 12, 96, True,
                                                                             seed=0).next()[0])


def test_token_buffer_resume_is_exact():
    produce, group_of = _stream()
    calls = []

    def counting(q):
        calls.append(q)
        return produce(q)
    a = TokenBuffer(produce, group_of, 8, 40, True, seed=[3, 1], stride=2, offset=1)
    for _ in range(7):
        a.next()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    b = TokenBuffer(counting, group_of, 8, 40, True, seed=[3, 1], stride=2, offset=1)
    b.load_state_dict(state)
    assert all(q % 2 == 1 for q in calls)  # only this rank's groups, recomputed
    for _ in range(10):
        xa, _ = a.next()
        xb, _ = b.next()
        assert torch.equal(xa, xb)


# ------------------------------------------------------------------ extraction details
def test_bos_and_resid_mid_extraction(lm_dir):
    from fastclt.training.extract import HFExtractor
    lm = lm_dir / "lm"
    ex = HFExtractor(lm, [1], tokens=str(lm_dir / "corpus.txt"), ctx_len=CTX, input_hook="resid_mid",
                     prepend_bos=True, exclude_bos=True)
    ids = ex.token_ids(0, 3)
    assert (ids[:, 0] == 0).all() and (ids[:, 1:] != 0).all()
    x, y, index = ex.activations(0, 3)
    assert x.shape == (3 * (CTX - 1), 1, D) and torch.equal(index % CTX, torch.arange(1, CTX).repeat(3))
    with torch.no_grad():
        hs = ex.lm(input_ids=ids, output_hidden_states=True).hidden_states
        block = ex.lm.transformer.h[1]
        resid_mid = hs[1] + block.attn(block.ln_1(hs[1]))[0]
    assert torch.allclose(x[:, 0], resid_mid[:, 1:].flatten(0, 1), atol=1e-5)
    assert torch.allclose(y[:, 0], block.mlp(block.ln_2(resid_mid))[:, 1:].flatten(0, 1), atol=1e-5)
    keep = HFExtractor(lm, [1], tokens=str(lm_dir / "corpus.txt"), ctx_len=CTX, prepend_bos=True, exclude_bos=False)
    assert keep.activations(0, 3)[0].shape[0] == 3 * CTX
    from fastclt.tokens import TokenSource
    with pytest.raises(ValueError, match="prepend_bos"):
        TokenSource("random", CTX, vocab_size=10, prepend_bos=True, bos_id=None)


def test_token_sources(tmp_path, lm_dir):
    from fastclt.tokens import TokenSource
    stream = np.arange(1, 50, dtype=np.int64) % 40
    np.save(tmp_path / "stream.npy", stream)
    s = TokenSource(str(tmp_path / "stream.npy"), 8, vocab_size=40, prepend_bos=True, bos_id=0)
    seqs = s.sequences(0, 8)
    assert s.n_sequences == 7 and (seqs[:, 0] == 0).all()
    assert torch.equal(seqs[0, 1:], torch.from_numpy(stream[:7])) and torch.equal(seqs[7], seqs[0])  # cycles
    np.save(tmp_path / "rows.npy", np.arange(60, dtype=np.int32).reshape(6, 10) % 40)
    rows = TokenSource(str(tmp_path / "rows.npy"), 9, vocab_size=40).sequences(2, 2)
    assert torch.equal(rows, torch.arange(20, 40).view(2, 10)[:, :9])
    with pytest.raises(ValueError, match="fewer"):
        TokenSource(str(tmp_path / "rows.npy"), 11, vocab_size=40)
    with pytest.raises(ValueError, match="vocabulary"):
        TokenSource(str(tmp_path / "stream.npy"), 8, vocab_size=20)
    with pytest.raises(ValueError, match="does not exist"):
        TokenSource(str(tmp_path / "missing.txt"), 8, vocab_size=20)
    np.save(tmp_path / "float.npy", np.zeros(20))
    with pytest.raises(ValueError, match="integer"):
        TokenSource(str(tmp_path / "float.npy"), 8, vocab_size=20)
    r1, r2 = (TokenSource("random", 8, vocab_size=40, seed=s).sequences(3, 2) for s in (0, 0))
    assert torch.equal(r1, r2) and not torch.equal(r1, TokenSource("random", 8, vocab_size=40, seed=1).sequences(3, 2))


def test_dataset_files(tmp_path, lm_dir):
    datasets = pytest.importorskip("datasets")
    from fastclt.tokens import TokenSource
    docs = _corpus(40, seed=1).split(" . ")
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d + " .", "id": i}) + "\n" for i, d in enumerate(docs)))
    tok = transformers.AutoTokenizer.from_pretrained(str(lm_dir / "lm"), local_files_only=True)
    src = TokenSource(str(path), 12, vocab_size=64, tokenizer=tok)
    joined = []
    for d in docs:
        joined += tok(d + " .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert torch.equal(src.sequences(0, 3).flatten(), torch.tensor(joined[:36]))
    datasets.Dataset.from_dict({"text": [d + " ." for d in docs]}).to_parquet(str(tmp_path / "docs.parquet"))
    assert torch.equal(TokenSource(str(tmp_path / "docs.parquet"), 12, vocab_size=64, tokenizer=tok).sequences(0, 3),
                       src.sequences(0, 3))
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]]}).save_to_disk(str(tmp_path / "saved"))
    assert TokenSource(str(tmp_path / "saved"), 5, vocab_size=64).sequences(0, 1).tolist() == [[1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="columns"):
        TokenSource(str(path), 12, vocab_size=64, tokenizer=tok, text_field="body")
