"""The replacement model (fastclt.replacement) and its evaluation (fastclt.eval) against an independent
computation: the test's own hooks on tiny float64 LMs (GPT-2, Llama, Qwen2, Gemma-2 built from configs)
and dense float64 dictionary math, for every decoder tying, a per-layer transcoder set and SAEs,
both input hooks and a non-trivial layer map; per-layer entries; gradients through the splice;
a zero dictionary; bad arguments; hooks and models left exactly as they were."""
import math

import pytest
import torch

import fastclt
from fastclt.eval import evaluate_replacement
from fastclt.replacement import splice

transformers = pytest.importorskip("transformers")

D, V, BLOCKS, T = 16, 48, 4, 7
LAYERS = [0, 2, 3]  # dictionary layer l at LM block LAYERS[l]


def _lm(family: str):
    torch.manual_seed(1)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=BLOCKS, n_embd=D, n_head=2, vocab_size=V, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)
        lm = transformers.GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=D, intermediate_size=32, num_hidden_layers=BLOCKS,
                                       num_attention_heads=2, num_key_value_heads=1, vocab_size=V,
                                       max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
        lm = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=D, intermediate_size=32, num_hidden_layers=BLOCKS,
                                       num_attention_heads=2, num_key_value_heads=1, vocab_size=V,
                                       max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
        lm = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.Gemma2Config(hidden_size=D, intermediate_size=32, num_hidden_layers=BLOCKS,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=V,
                                        max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        lm = transformers.Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # a bigger MLP contribution than the init's, so that splicing matters
        for name, p in lm.named_parameters():
            if "mlp" in name and p.dim() == 2:
                p.mul_(4.0)
    return lm.double().eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


@pytest.fixture(scope="module")
def lms():
    return {f: _lm(f) for f in ("gpt2", "llama", "qwen2", "gemma2")}


def _block(lm, i):
    return lm.transformer.h[i] if hasattr(lm, "transformer") else lm.model.layers[i]


def _modules(lm, i):
    """(mlp, pre-MLP norm, post-MLP norm or None) by the test's own reading of each family."""
    b = _block(lm, i)
    if hasattr(b, "ln_2"):
        return b.mlp, b.ln_2, None
    if hasattr(b, "pre_feedforward_layernorm"):
        return b.mlp, b.pre_feedforward_layernorm, b.post_feedforward_layernorm
    return b.mlp, b.post_attention_layernorm, None


# ------------------------------------------------------------------ dictionaries
def _randomize(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("W_dec"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.4)
            elif name in ("b_dec", "b_enc", "W_skip", "feature_offset"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
            elif name == "feature_scale":
                p.copy_(1 + torch.rand(p.shape, generator=gen, dtype=p.dtype))
            elif name == "threshold":
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) * 0.3)


CLT_CASES = {
    "none-relu": dict(decoder_tying="none", activation="relu"),
    "per_source-jumprelu-affine-skip": dict(decoder_tying="per_source", activation="jumprelu", feature_affine=True,
                                            skip_connection=True),
    "per_target-topk-affine-norm": dict(decoder_tying="per_target", activation="topk", k=4, feature_affine=True,
                                        normalization="mean_std"),
    "set-batchtopk-skip": dict(cross_layer=False, activation="batchtopk", k=4, skip_connection=True),
}


def _clt(case, gen, lm, hook="mlp_in", layers=LAYERS, dtype="float64"):
    cfg = fastclt.CLTConfig(n_layers=len(layers), d_in=D, d_out=D, n_features=24, dtype=dtype,
                            lm_layers=list(layers), input_hook=hook, **CLT_CASES[case])
    model = fastclt.CrossLayerTranscoder(cfg)
    _randomize(model, gen)
    _fit(model, lm, gen)
    return model


def _activations(lm, hook, layers, gen):
    """(x, y): the LM's hooked inputs and MLP outputs [N, L, D] on random tokens (the test's own hooks)."""
    xs, ys, handles = {}, {}, []
    for l, block in enumerate(layers):
        mlp, norm, _ = _modules(lm, block)
        handles.append((norm if hook == "resid_mid" else mlp).register_forward_pre_hook(
            lambda mod, args, l=l: xs.__setitem__(l, args[0].flatten(0, 1))))
        handles.append(mlp.register_forward_hook(lambda mod, args, out, l=l: ys.__setitem__(l, out.flatten(0, 1))))
    with torch.no_grad():
        lm(input_ids=torch.randint(1, V, (16, T), generator=gen))
    for h in handles:
        h.remove()
    return torch.stack([xs[l] for l in range(len(layers))], 1), torch.stack([ys[l] for l in range(len(layers))], 1)


def _fit(model, lm, gen):
    """Normalisation and BatchTopK → JumpReLU statistics from the LM's own activations."""
    x, y = _activations(lm, model.cfg.input_hook, model.cfg.lm_layers, gen)
    x, y = x.to(model.param_dtype), y.to(model.param_dtype)
    sae = isinstance(model, fastclt.SparseAutoencoder)
    if model.cfg.normalization != "none":
        model._fit_normalization(x, x if sae else y)
    if model.cfg.activation == "batchtopk":
        model.train()
        for _ in range(3):
            model.loss(x[:, 0], None) if sae else model.loss(x, y)
        model.eval()


def _sae(activation, gen, lm, hook, block=1):
    cfg = fastclt.SAEConfig(d_in=D, n_features=24, activation=activation, k=4, dtype="float64", lm_layers=[block],
                            input_hook=hook, normalization="mean_std")
    model = fastclt.SparseAutoencoder(cfg)
    _randomize(model, gen)
    _fit(model, lm, gen)
    return model


# ------------------------------------------------------------------ the independent computation
def _act(model, h, s):
    cfg = model.cfg
    if cfg.activation == "relu":
        return h.clamp_min(0)
    if cfg.activation == "topk":
        keep = torch.zeros_like(h, dtype=torch.bool).scatter(1, h.topk(cfg.k, dim=1).indices, True)
        return (h * keep).clamp_min(0)
    theta = model.threshold.reshape(-1, h.shape[-1]) if cfg.activation == "jumprelu" else model.jumprelu_thresholds()
    return h * (h > theta[s])


def _clt_dense(model, xs: dict, t: int) -> torch.Tensor:
    """ŷ_t from the hooked inputs xs[s] (s ≤ t) with dense float64 math from the documented attributes."""
    cfg = model.cfg

    def norm_in(x, s):
        return (x - model.input_mean[s]) / model.input_scale[s] if cfg.normalization != "none" else x

    y = model.b_dec[t].clone()
    sources = range(t + 1) if cfg.cross_layer else [t]
    for s in sources:
        a = _act(model, norm_in(xs[s], s) @ model.W_enc[s].T + model.b_enc[s], s)
        if cfg.feature_affine:
            a = (a + model.feature_offset[t] * (a > 0)) * model.feature_scale[t]
        W = model.decoder_weight(s)[:, t - s if cfg.cross_layer else 0]
        y = y + a @ W
    if cfg.skip_connection:
        y = y + norm_in(xs[t], t) @ model.W_skip[t].T
    if cfg.normalization != "none":
        y = y * model.output_scale[t] + model.output_mean[t]
    return y


def _molt_dense(model, xs: dict, t: int) -> torch.Tensor:
    """A MOLT's ŷ_t from the hooked input xs[t]: dense gates, every transform formed as a d × d matrix."""
    cfg = model.cfg
    xn = (xs[t] - model.input_mean[t]) / model.input_scale[t] if cfg.normalization != "none" else xs[t]
    g = _act(model, xn @ model.W_enc[t].T + model.b_enc[t], t)
    y = model.b_dec[t] + sum(g[:, i:i + 1] * (xn @ model.transform(t, i).T) for i in range(cfg.n_features))
    return y * model.output_scale[t] + model.output_mean[t] if cfg.normalization != "none" else y


def _sae_dense(model, x):
    xn = (x - model.input_mean[0]) / model.input_scale[0]
    h = (xn - model.b_dec) @ model.W_enc.T + model.b_enc
    return (_act(model, h, 0) @ model.W_dec + model.b_dec) * model.output_scale[0] + model.output_mean[0]


def _reference_logits(model, lm, ids, layers, hook, targets, mode, record=None):
    """Logits of the LM with the test's own hooks; ``record`` collects (y, ŷ, l0) per spliced layer."""
    handles, xs, mlp_out = [], {}, {}
    sae = isinstance(model, fastclt.SparseAutoencoder)
    for l, block in enumerate(layers):
        mlp, norm, post = _modules(lm, block)
        if sae:
            # the residual stream itself becomes x̂: rebuild the block's output from its pieces
            def keep_mlp(mod, args, out, l=l):
                mlp_out[l] = out

            def block_hook(mod, args, out, mlp=mlp, norm=norm, post=post, l=l):
                h = out[0] if isinstance(out, tuple) else out
                branch = post(mlp_out[l]) if post is not None else mlp_out[l]
                resid = h - branch
                x_hat = torch.zeros_like(resid) if mode == "ablate" else _sae_dense(model, resid.flatten(0, 1))
                x_hat = x_hat.view(resid.shape)
                if record is not None:
                    record.setdefault(0, []).append((resid.flatten(0, 1), x_hat.flatten(0, 1)))
                new_branch = mlp(norm(x_hat))
                new_branch = post(new_branch) if post is not None else new_branch
                new = x_hat + new_branch
                return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

            def mlp_in_hook(mod, args, l=l):
                x = args[0].flatten(0, 1)
                x_hat = torch.zeros_like(x) if mode == "ablate" else _sae_dense(model, x)
                if record is not None:
                    record.setdefault(0, []).append((x, x_hat))
                return (x_hat.view(args[0].shape),)
            if hook == "resid_mid":
                handles.append(mlp.register_forward_hook(keep_mlp))
                handles.append(_block(lm, block).register_forward_hook(block_hook))
            else:
                handles.append(mlp.register_forward_pre_hook(mlp_in_hook))
            continue

        def capture(mod, args, l=l):
            xs[l] = args[0].flatten(0, 1)

        def replace(mod, args, out, l=l):
            if mode == "ablate":
                return torch.zeros_like(out)
            y_hat = (_molt_dense if isinstance(model, fastclt.MOLT) else _clt_dense)(model, xs, l)
            if record is not None:
                record.setdefault(l, []).append((out.flatten(0, 1), y_hat))
            return y_hat.view(out.shape)
        handles.append((norm if hook == "resid_mid" else mlp).register_forward_pre_hook(capture))
        if l in targets:
            handles.append(mlp.register_forward_hook(replace))
    try:
        return lm(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


def _reference_metrics(model, lm, ids, layers, hook):
    L = model.n_layers
    with torch.no_grad():
        lp = lm(input_ids=ids).logits.log_softmax(-1)
        p = lp.exp()

        def ce(lq):
            return float(-lq[:, :-1].gather(-1, ids[:, 1:, None]).mean())

        def run(targets, mode, record=None):
            return _reference_logits(model, lm, ids, layers, hook, targets, mode, record).log_softmax(-1)

        rec = {}
        lq = run(range(L), "replace", rec)
        out = {"kl": float((p * (lp - lq)).sum(-1).mean()), "ce_clean": ce(lp), "ce_spliced": ce(lq),
               "ce_ablated": ce(run(range(L), "ablate")),
               "top1_agreement": float((lq.argmax(-1) == lp.argmax(-1)).double().mean())}
        out["ce_recovered"] = (out["ce_ablated"] - out["ce_spliced"]) / (out["ce_ablated"] - out["ce_clean"])
        fvu = []
        for l in range(L):
            y = torch.cat([a for a, _ in rec[l]])
            y_hat = torch.cat([b for _, b in rec[l]])
            fvu.append(float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()))
        out["fvu"] = sum(fvu) / L
        per = []
        for l in range(L):
            lq = run([l], "replace")
            e = {"kl": float((p * (lp - lq)).sum(-1).mean()), "ce_spliced": ce(lq),
                 "ce_ablated": ce(run([l], "ablate")), "fvu": fvu[l]}
            e["ce_recovered"] = (e["ce_ablated"] - e["ce_spliced"]) / (e["ce_ablated"] - out["ce_clean"])
            per.append(e)
        out["per_layer"] = per
    return out


def _compare(got, ref, tol=1e-9):
    for key in ("kl", "ce_clean", "ce_spliced", "ce_ablated", "ce_recovered", "top1_agreement", "fvu"):
        assert got[key] == pytest.approx(ref[key], rel=tol, abs=1e-12), key
    for l, (g, r) in enumerate(zip(got["per_layer"], ref["per_layer"])):
        for key in r:
            assert g[key] == pytest.approx(r[key], rel=tol, abs=1e-12), (l, key)


def _ids(gen, n=5):
    return torch.randint(1, V, (n, T), generator=gen)


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("case", list(CLT_CASES))
@pytest.mark.parametrize("hook", ["mlp_in", "resid_mid"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_clt_splice_matches_independent_computation(lms, case, hook, family, gen):
    lm = lms[family]
    model = _clt(case, gen, lm, hook)
    ids = _ids(gen)
    got = evaluate_replacement(model, lm, ids, batch_size=2)
    ref = _reference_metrics(model, lm, ids, LAYERS, hook)
    _compare(got, ref)
    assert got["lm_layers"] == LAYERS and got["input_hook"] == hook and len(got["per_layer"]) == 3
    assert [e["lm_layer"] for e in got["per_layer"]] == LAYERS
    assert got["n_tokens"] == 5 * T and 0 < got["l0"] <= 24
    assert 0.05 < got["ce_recovered"] or got["ce_recovered"] < -0.05 or got["kl"] > 1e-3  # the splice matters


@pytest.mark.parametrize("family, case, hook", [("qwen2", "per_target-topk-affine-norm", "resid_mid"),
                                                ("gemma2", "none-relu", "mlp_in"),
                                                ("gemma2", "per_source-jumprelu-affine-skip", "resid_mid")])
def test_other_families(lms, family, case, hook, gen):
    model = _clt(case, gen, lms[family], hook)
    ids = _ids(gen, 3)
    _compare(evaluate_replacement(model, lms[family], ids, batch_size=3), _reference_metrics(model, lms[family], ids,
                                                                                              LAYERS, hook))


@pytest.mark.parametrize("activation, hook, family", [("topk", "mlp_in", "gpt2"), ("jumprelu", "resid_mid", "gpt2"),
                                                      ("batchtopk", "resid_mid", "llama"),
                                                      ("relu", "resid_mid", "gemma2")])
def test_sae_splice_matches_independent_computation(lms, activation, hook, family, gen):
    model = _sae(activation, gen, lms[family], hook)
    ids = _ids(gen, 4)
    got = evaluate_replacement(model, lms[family], ids, batch_size=3)
    ref = _reference_metrics(model, lms[family], ids, [1], hook)
    _compare(got, ref)


@pytest.mark.parametrize("kind", ["matryoshka-clt", "molt-jumprelu", "molt-topk"])
def test_matryoshka_and_molt_splice_matches_independent_computation(lms, kind, gen):
    """A Matryoshka CLT evaluates as its full dictionary; a MOLT set as the gated sum of its transforms."""
    lm = lms["gpt2"]
    if kind == "matryoshka-clt":
        cfg = fastclt.CLTConfig(n_layers=3, d_in=D, d_out=D, n_features=24, dtype="float64", lm_layers=LAYERS,
                                matryoshka_prefixes=[4, 12, 24], **CLT_CASES["per_source-jumprelu-affine-skip"])
        model = fastclt.CrossLayerTranscoder(cfg)
    else:
        act = kind.split("-")[1]
        cfg = fastclt.MOLTConfig(n_layers=3, d_in=D, d_out=D, n_features=7, ranks=[4, 2, 1], dtype="float64",
                                 lm_layers=LAYERS, activation=act, k=2, normalization="mean_std")
        model = fastclt.MOLT(cfg)
    _randomize(model, gen)
    _fit(model, lm, gen)
    ids = _ids(gen, 3)
    got = evaluate_replacement(model, lm, ids, batch_size=2)
    _compare(got, _reference_metrics(model, lm, ids, LAYERS, "mlp_in"))
    assert got["dictionary"] == type(model).__name__ and 0 < got["l0"]


def test_batch_size_changes_nothing(gen):
    lm = _lm("gpt2").float()
    model = _clt("per_source-jumprelu-affine-skip", gen, lm, dtype="float32")
    ids = _ids(gen, 6)
    a = evaluate_replacement(model, lm, ids, batch_size=1)
    b = evaluate_replacement(model, lm, ids, batch_size=4)
    for ea, eb in [(a, b)] + list(zip(a["per_layer"], b["per_layer"])):
        for key in ("kl", "ce_spliced", "ce_ablated", "top1_agreement", "fvu", "l0"):
            assert ea[key] == pytest.approx(eb[key], rel=1e-5, abs=1e-7), key
        assert ea["ce_recovered"] == pytest.approx(eb["ce_recovered"], rel=1e-3, abs=1e-3)


def test_zero_dictionary_recovers_nothing(lms, gen):
    model = _clt("per_target-topk-affine-norm", gen, lms["gpt2"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.zero_()
        model.output_mean.zero_()
    m = evaluate_replacement(model, lms["gpt2"], _ids(gen))
    assert m["ce_spliced"] == m["ce_ablated"] and m["ce_recovered"] == 0
    assert all(e["ce_recovered"] == 0 for e in m["per_layer"])
    assert m["l0"] == 0 and m["fvu"] == pytest.approx(1.0, rel=0.5)


@pytest.mark.parametrize("case", ["none-relu", "per_target-topk-affine-norm"])
def test_gradients_through_the_splice(lms, case, gen):
    """The spliced forward is differentiable: dictionary and LM gradients equal the dense reference's."""
    lm = lms["llama"]
    model = _clt(case, gen, lm, "resid_mid")
    ids = _ids(gen, 2)
    params = [p for p in model.parameters()] + [p for p in lm.parameters()]

    def grads(logits):
        for p in params:
            p.grad = None
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return [None if p.grad is None else p.grad.clone() for p in params]
    with splice(model, lm) as sp:
        g_splice = grads(lm(input_ids=ids).logits)
    assert not sp.handles
    g_ref = grads(_reference_logits(model, lm, ids, LAYERS, "resid_mid", range(3), "replace"))
    n_checked = 0
    for p, a, b in zip(params, g_splice, g_ref):
        if b is None:
            assert a is None or not a.any()
            continue
        assert a is not None
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12), (p.shape, (a - b).abs().max())
        n_checked += bool(b.abs().max() > 0)
    assert model.W_enc.grad is not None and model.W_enc.grad.abs().max() > 0 and n_checked > 10
    for p in params:
        p.grad = None


def _hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_models_unchanged_and_no_hooks_after_a_failure(gen, monkeypatch):
    lm = _lm("gpt2")
    lm.train()  # evaluation runs it in eval mode and must hand it back in train mode
    lm.transformer.h[1].eval()
    model = _clt("none-relu", gen, lm)
    before_lm = {k: v.clone() for k, v in lm.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate_replacement(model, lm, _ids(gen))
    calls = []
    from fastclt import replacement

    def failing(self, s, xn):
        calls.append(s)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return real(self, s, xn)
    real = replacement._Layerwise.encode
    monkeypatch.setattr(replacement._Layerwise, "encode", failing)
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_replacement(model, lm, _ids(gen))
    assert _hooks(lm) == 0 and _hooks(model) == 0
    assert lm.training and not lm.transformer.h[1].training and lm.transformer.h[0].training
    for k, v in lm.state_dict().items():
        assert torch.equal(v, before_lm[k]), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_arguments_fail_before_any_forward(lms, gen):
    lm = _lm("gpt2")
    model = _clt("none-relu", gen, lm)
    bt = _clt("set-batchtopk-skip", gen, lm)
    forwards = []
    lm.register_forward_pre_hook(lambda *a: forwards.append(1))
    ids = _ids(gen)
    unrecorded = fastclt.CrossLayerTranscoder(model.cfg.replace(lm_layers=None)).double()
    cases = [
        (lambda: evaluate_replacement(unrecorded, lm, ids, layers=[0, 1]), ValueError, "layers: expected 3"),
        (lambda: evaluate_replacement(unrecorded, lm, ids, layers=[0, 2, 4]), ValueError, "out of range"),
        (lambda: evaluate_replacement(unrecorded, lm, ids, layers=[0, 2, 2]), ValueError, "strictly increasing"),
        (lambda: evaluate_replacement(unrecorded, lm, ids, layers=[0, 1.0, 2]), TypeError, "layers"),
        (lambda: evaluate_replacement(model, lm, ids, layers=[0, 1, 2]), ValueError, "trained on LM blocks"),
        (lambda: evaluate_replacement(model, lm, ids.float()), TypeError, "input_ids"),
        (lambda: evaluate_replacement(model, lm, ids[0]), ValueError, "input_ids"),
        (lambda: evaluate_replacement(model, lm, ids[:, :1]), ValueError, "input_ids"),
        (lambda: evaluate_replacement(model, lm, ids + V), ValueError, "vocabulary"),
        (lambda: evaluate_replacement(model, lm, ids, input_hook="resid_post"), ValueError, "input_hook"),
        (lambda: evaluate_replacement(model, lm, ids, input_hook="resid_mid"), ValueError, "trained on 'mlp_in'"),
        (lambda: evaluate_replacement(model, lm, ids, batch_size=0), ValueError, "batch_size"),
        (lambda: evaluate_replacement(model, lm, ids, batch_size=2.0), TypeError, "batch_size"),
        (lambda: evaluate_replacement(model.cfg, lm, ids), TypeError, "model"),
        (lambda: evaluate_replacement(fastclt.CrossLayerTranscoder(model.cfg.replace(d_in=8)).double(), lm, ids),
         ValueError, "d_in"),
        (lambda: evaluate_replacement(model, lm, ids, paths={"mlp": "transformer.h.mlp"}), ValueError, "{i}"),
        (lambda: splice(model, lm, targets=[3]), ValueError, "targets"),
        (lambda: splice(model, lm, mode="zero"), ValueError, "mode"),
    ]
    fresh = fastclt.CrossLayerTranscoder(bt.cfg).double()  # no BatchTopK statistics yet
    cases.append((lambda: evaluate_replacement(fresh, lm, ids), ValueError, "to_jumprelu"))
    for fn, err, match in cases:
        with pytest.raises(err, match=match):
            fn()
    assert not forwards and _hooks(lm) == 1


def test_recorded_hook_and_layers_survive_save_load(tmp_path, lms, gen):
    lm = lms["gpt2"]
    model = _clt("per_source-jumprelu-affine-skip", gen, lm, "resid_mid", layers=[1, 3])
    model.save_pretrained(tmp_path)
    loaded = fastclt.CrossLayerTranscoder.from_pretrained(tmp_path)
    ids = _ids(gen, 2)
    got = evaluate_replacement(loaded, lm, ids, per_layer=False)
    assert got["lm_layers"] == [1, 3] and got["input_hook"] == "resid_mid"
    ref = _reference_metrics(model, lm, ids, [1, 3], "resid_mid")
    for key in ("kl", "ce_spliced", "ce_ablated"):
        assert got[key] == pytest.approx(ref[key], rel=1e-9)


def test_explicit_paths_and_splice_context(lms, gen):
    lm = lms["llama"]
    model = _clt("none-relu", gen, lm)
    ids = _ids(gen, 2)
    paths = dict(mlp="model.layers.{i}.mlp", norm="model.layers.{i}.post_attention_layernorm")
    with torch.no_grad():
        with splice(model, lm, paths=paths, record_stats=True) as sp:
            a = lm(input_ids=ids).logits
        assert _hooks(lm) == 0
        b = _reference_logits(model, lm, ids, LAYERS, "mlp_in", range(3), "replace")
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    st = sp.stats()
    assert len(st["fvu"]) == 3 and all(math.isfinite(v) for v in st["fvu"])
