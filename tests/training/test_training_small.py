"""Small SAEs and CLTs trained for a few hundred steps on synthetic data with planted sparse
features reach low FVU (the models, losses and gradients work together)."""
import pytest
import torch

import fastclt


def planted(n_tokens, n_true, d, active, gen):
    """Sparse non-negative codes over ``n_true`` features, ``active`` per token on average."""
    on = torch.rand(n_tokens, n_true, generator=gen) < active / n_true
    mag = 0.5 + torch.rand(n_tokens, n_true, generator=gen)
    return on * mag


def unit_rows(n, d, gen):
    W = torch.randn(n, d, generator=gen)
    return W / W.norm(dim=1, keepdim=True)


def train(model, batches, steps, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        x, y = batches(step)
        out = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if hasattr(model, "project_decoder_grads"):
            model.project_decoder_grads()
        opt.step()
        model.post_step()
    return out.metrics["fvu"]


@pytest.mark.parametrize("activation,k", [("topk", 4), ("jumprelu", 4)])
def test_sae_recovers_planted_features(activation, k):
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    d, n_true = 24, 32
    D = unit_rows(n_true, d, gen)

    def batches(step):
        x = planted(128, n_true, d, 3, gen) @ D + 0.01 * torch.randn(128, d, generator=gen)
        return x, None

    cfg = fastclt.SAEConfig(d_in=d, n_features=96, activation=activation, k=k, sparsity_coef=3e-3,
                            threshold_init=0.1, jumprelu_bandwidth=0.1)
    sae = fastclt.SparseAutoencoder(cfg)
    sae.initialize_from_data(batches(0)[0])
    fvu = train(sae, batches, 200)
    assert fvu < 0.12, f"{activation}: final FVU {fvu:.3f}"


@pytest.mark.parametrize("tying,activation", [("none", "batchtopk"), ("per_source", "topk"),
                                              ("per_target", "batchtopk"), ("none", "jumprelu")])
def test_clt_recovers_planted_cross_layer_features(tying, activation):
    gen = torch.Generator().manual_seed(12)
    torch.manual_seed(12)
    L, d, n_true = 3, 16, 16
    enc = [unit_rows(n_true, d, gen) for _ in range(L)]
    if tying == "none":
        dec = [[unit_rows(n_true, d, gen) for _ in range(L - s)] for s in range(L)]
    elif tying == "per_source":
        dec = [[unit_rows(n_true, d, gen)] * (L - s) for s in range(L)]
    else:
        per_t = [unit_rows(n_true, d, gen) for _ in range(L)]
        dec = [[per_t[t] for t in range(s, L)] for s in range(L)]

    def batches(step):
        B = 128
        a = [planted(B, n_true, d, 2, gen) for _ in range(L)]
        x = torch.stack([a[s] @ enc[s] + 0.01 * torch.randn(B, d, generator=gen) for s in range(L)], 1)
        y = torch.stack([sum(a[s] @ dec[s][t - s] for s in range(t + 1)) for t in range(L)], 1)
        return x, y

    cfg = fastclt.CLTConfig(n_layers=L, d_in=d, d_out=d, n_features=48, activation=activation, k=3,
                            decoder_tying=tying, sparsity_coef=1e-3, threshold_init=0.1, jumprelu_bandwidth=0.1)
    model = fastclt.CrossLayerTranscoder(cfg)
    model.initialize_from_data(*batches(0))
    fvu = train(model, batches, 200)
    assert fvu < 0.12, f"{tying}/{activation}: final FVU {fvu:.3f}"
