"""Transcoder adapters (fastclt.adapters): a reference model = the base model with perturbed MLP
weights (tiny GPT-2 and Qwen2 built from configs); zero-initialised adapters start exactly at the
base model; a short run cuts KL(reference ‖ adapted) at least in half; adapters off give the base
model's logits exactly; save → load gives the same logits and a working ``generate``; the command
line trains, checkpoints and resumes exactly; bad options are refused with clear errors."""
import copy
import json

import pytest
import torch

from _lm import tiny_lm
from fastclt.adapters import AdaptedModel, AdapterObjective, evaluate_adapters, main, new_adapters

transformers = pytest.importorskip("transformers")

D, V = 32, 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


def _base(arch: str):
    return tiny_lm(arch, seed=0, d=D, vocab=V)


def _reference(base):
    """The base model with every MLP weight perturbed (the 'fine-tuned sibling')."""
    ref = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".mlp." in name:
                p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    return ref


def _ids(n=8, t=16, seed=0):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch,activation", [("gpt2", "relu"), ("gpt2", "jumprelu"), ("qwen2", "relu")])
def test_short_run_halves_the_kl_and_adapters_off_is_the_base(arch, activation):
    base = _base(arch)
    clean = _logits(base, _ids())
    ref = _reference(base)
    ad = AdaptedModel(base, new_adapters(base, 64, activation, threshold_init=0.01, seed=0))
    assert torch.equal(_logits(ad, _ids()), clean)  # zero-initialised decoder: exactly the base model
    obj = AdapterObjective(ad, ref, n_cutoffs=1, lm_checkpoint=arch == "qwen2")
    held = _ids(16, 16, seed=5)
    start = evaluate_adapters(ad, ref, held)
    assert start["kl_to_reference"] == start["kl_base_to_reference"] > 1e-3
    opt = torch.optim.Adam(ad.adapters.parameters(), lr=1e-2)
    # (Qwen2's MLPs have no biases: what the perturbation changes takes the adapters longer to learn)
    for step in range(40 if arch == "gpt2" else 150):
        r = obj.loss(_ids(8, 16, seed=100 + step), 1e-4, obj.cutoffs(step, 0))
        r["loss"].backward()
        opt.step()
        opt.zero_grad()
        ad.adapters.post_step()  # (JumpReLU: θ >= 0)
    assert all(p.grad is None and not p.requires_grad for m in (base, ref) for p in m.parameters())
    end = evaluate_adapters(ad, ref, held)
    assert end["kl_to_reference"] < 0.5 * start["kl_to_reference"], (start, end)
    assert len(end["l0_per_layer"]) == 2 and all(v > 0 for v in end["l0_per_layer"])
    assert not torch.equal(_logits(ad, _ids()), clean)
    with ad.disabled():
        assert torch.equal(_logits(ad, _ids()), clean)
    ad.disable()
    assert torch.equal(_logits(base, _ids()), clean) and not ad.enabled
    ad.enable()
    assert not torch.equal(_logits(base, _ids()), clean)


def test_bridging_and_nmse_terms():
    """Bridging at a cutoff k: a2r = the adapted blocks 0 … k−1 continued through the reference; with
    zero adapters it is the base model's hidden state continued through the reference."""
    base = _base("gpt2")
    ref = _reference(base)
    ad = AdaptedModel(base, new_adapters(base, 32))
    ids = _ids(2, 8)
    for k, direction in ((1, "a2r"), (0, "r2a"), (2, "a2r")):
        obj = AdapterObjective(ad, ref, n_cutoffs=1, directions=direction, nmse_coef=1.0, kl_coef=0.0, bridge_coef=1.0)
        with torch.no_grad():
            r = obj.loss(ids, 0.0, [k])
        # independently: swap the blocks by hand
        mixed = copy.deepcopy(ref)
        first, second = (base, ref) if direction == "a2r" else (ref, base)
        mixed.transformer.wte, mixed.transformer.wpe = first.transformer.wte, first.transformer.wpe
        for i in range(2):
            mixed.transformer.h[i] = (first if i < k else second).transformer.h[i]
        if direction == "r2a":
            mixed.transformer.ln_f, mixed.lm_head = base.transformer.ln_f, base.lm_head
        lp_ref = _logits(ref, ids).log_softmax(-1)
        with ad.disabled():  # (the mixed model shares the base model's hooked blocks)
            lq = _logits(mixed, ids).log_softmax(-1)
        want = torch.nn.functional.kl_div(lq, lp_ref, log_target=True, reduction="sum") / ids.numel()
        assert float(r["bridge"]) == pytest.approx(float(want), rel=1e-5, abs=1e-9), (k, direction)
        assert float(r["loss"]) == pytest.approx(float(want + r["nmse"]), rel=1e-5)
        assert float(r["nmse"]) > 0


def test_save_load_same_logits_and_generate(tmp_path):
    base = _base("qwen2")
    adapters = new_adapters(base, 48, activation="jumprelu", threshold_init=0.01)
    with torch.no_grad():
        adapters.W_dec.normal_(0, 0.3)
    ad = AdaptedModel(base, adapters)
    ids = _ids(3, 10)
    want = _logits(ad, ids)
    with ad.disabled():
        want_base = _logits(ad, ids)
    ad.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "adapters" / "model.safetensors").is_file()
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # a standard transformers folder
    assert torch.equal(_logits(plain.eval(), ids), want_base)
    back = AdaptedModel.from_pretrained(tmp_path / "m")
    assert torch.equal(_logits(back, ids), want)
    with back.disabled():
        assert torch.equal(_logits(back, ids), want_base)
    prompt = ids[:1, :4]
    on = back.generate(prompt, max_new_tokens=6, do_sample=False)
    with back.disabled():
        off = back.generate(prompt, max_new_tokens=6, do_sample=False)
    assert on.shape == off.shape == (1, 10) and torch.equal(on[:, :4], prompt)
    # greedy generation with the cache equals the argmax of full forward passes, adapters on
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, _logits(back, seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(on, seq)


def _cli(base_dir, ref_dir, out, *extra):
    return ["--base", str(base_dir), "--reference", str(ref_dir), "--data", "random", "--out_dir", str(out),
            "--n_features", "32", "--steps", "6", "--batch_size", "4", "--ctx_len", "12", "--lr", "3e-3",
            "--checkpoint_every", "2", "--eval_every", "3", "--eval_seqs", "4", "--no_progress", "--device", "cpu",
            *extra]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    base = _base("gpt2")
    base.save_pretrained(root / "base")
    _reference(base).save_pretrained(root / "ref")
    return root


def test_command_line_trains_checkpoints_and_resumes_exactly(folders, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_cli(folders / "base", folders / "ref", full, "--nmse_coef", "0.5", "--n_cutoffs", "2")) == 0
    assert main(_cli(folders / "base", folders / "ref", cut, "--nmse_coef", "0.5", "--n_cutoffs", "2",
                     "--max_steps", "3")) == 0
    assert not (cut / "model").exists()
    assert main(_cli(folders / "base", folders / "ref", cut, "--nmse_coef", "0.5", "--n_cutoffs", "2")) == 0
    recs = [[json.loads(line) for line in open(o / "metrics.jsonl")] for o in (full, cut)]
    steps = [[(r["step"], r["loss"], r["bridge"], r["nmse"]) for r in rs if "loss" in r] for rs in recs]
    assert len(steps[0]) == 6 and steps[0] == steps[1]
    evals = [r for r in recs[0] if "eval/kl_to_reference" in r]
    assert [r["step"] for r in evals] == [0, 3, 6] and "eval/layer1/l0" in evals[-1]
    a, b = AdaptedModel.from_pretrained(full / "model"), AdaptedModel.from_pretrained(cut / "model")
    assert all(torch.equal(v, b.adapters.state_dict()[k]) for k, v in a.adapters.state_dict().items())
    summary = json.loads((full / "summary.json").read_text())
    assert summary["kl_to_reference"] < summary["kl_base_to_reference"]
    # another configuration in the same folder is refused, not silently mixed
    assert main(_cli(folders / "base", folders / "ref", cut, "--n_features", "16", "--steps", "8")) == 2


@pytest.mark.parametrize("extra,message", [
    (("--n_features", "0"), "--n_features"),
    (("--ctx_len", "1"), "--ctx_len"),
    (("--lr", "-1"), "--lr"),
    (("--data", "/nonexistent.txt"), "--data"),
    (("--resume", "/nonexistent"), "--resume"),
    (("--n_cutoffs", "5"), "n_cutoffs"),
])
def test_bad_options(folders, tmp_path, capsys, extra, message):
    assert main(_cli(folders / "base", folders / "ref", tmp_path / "x", *extra)) == 2
    assert message in capsys.readouterr().err


def test_mismatched_reference_is_refused(folders, tmp_path, capsys):
    _base("qwen2").save_pretrained(tmp_path / "qwen")
    assert main(_cli(folders / "base", tmp_path / "qwen", tmp_path / "x")) == 2
    assert "reference" in capsys.readouterr().err
    with pytest.raises(ValueError, match="activation"):
        new_adapters(_base("gpt2"), 8, activation="topk")
    with pytest.raises(ValueError, match="directions"):
        base = _base("gpt2")
        AdapterObjective(AdaptedModel(base, new_adapters(base, 8)), _reference(base), directions="sideways")
