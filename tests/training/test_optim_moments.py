"""fastclt.training.optim.Adam (Adam's moments in bfloat16) and the trainer's train.optimizer_moments.

(1) With float32 moments it is torch.optim.Adam bit for bit (foreach and single-tensor paths; fp32, fp64
and bf16 parameters, odd shapes, several parameters and groups, a changing lr, pieces of any size).
(2) With bfloat16 moments the moments really are bf16 (dtype, bytes) and the parameters track
torch.optim.Adam: over 20 steps the displacement differs by at most 1% of its norm (measured, worst of
3 seeds: 0.24% stochastic, 0.16% nearest) and no entry by more than 2% of the summed lr (measured
0.66%, 0.39%); with round-to-nearest and bf16 parameters it is torch's fused Adam bit for bit on the
CPU. Stochastic rounding is unbiased and seeded; round-to-nearest lets v drift up over long runs (why
the trainer rounds stochastically). A state_dict round trip continues exactly.
(3) ``python -m fastclt.train --train.optimizer_moments bfloat16`` trains like float32 and a stopped
run resumes to the uninterrupted run's losses and weights, bit for bit.
(4) Bad values of the option are errors that name it. (5) A checkpoint written with one moment dtype
is refused when resumed with the other (the error names the option and the setting to resume
with); nothing is converted or changed.
"""
import copy
import json

import pytest
import torch

import fastclt
from fastclt.train import main
from fastclt.training import checkpointing as ckpt
from fastclt.training.config import ConfigError, load_config, resolve_fingerprint
from fastclt.training.optim import Adam

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
SHAPES = [(7, 13), (1031,), (3, 5, 17), (1,), (129, 33)]
KW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8)


def _run(make, dtype=torch.float32, device="cpu", steps=20, seed=0, shapes=SHAPES, groups=False):
    """``steps`` Adam steps of ``make(params)`` on fresh random parameters and gradients (per-entry scales
    spanning 60×, a non-zero mean, growing over the steps) with a changing lr; (params, their start, opt)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes]
    start = [p.detach().clone() for p in params]
    scales = [(torch.rand(s, generator=gen) * 3 + 0.05).to(device) for s in shapes]
    opt = make([{"params": params[:2]}, {"params": params[2:], "lr": KW["lr"] / 3}] if groups else params)
    for t in range(steps):
        for p, sc in zip(params, scales):
            p.grad = ((torch.randn(p.shape, generator=gen).to(device) + 0.5) * sc * (1 + t / 10)).to(dtype)
        for i, group in enumerate(opt.param_groups):
            group["lr"] = KW["lr"] * (1 + t % 3) / (1 + 2 * i)
        opt.step()
    return params, start, opt


def _equal(a, b):
    assert all(torch.equal(x.detach(), y.detach()) for x, y in zip(a, b)), \
        max(float((x.detach().double() - y.detach().double()).abs().max()) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------- (1)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("chunk", [1 << 24, 100])
@pytest.mark.parametrize("groups", [False, True])
def test_float32_moments_are_torch_adam_exactly(device, dtype, foreach, chunk, groups):
    """Moments in the parameters' dtype (fp32, or fp64 for fp64 parameters): torch.optim.Adam bit for
    bit, whether the parameters are updated whole or in pieces of 100 entries. (On CUDA torch's
    single-tensor path runs other kernels than the foreach ops used here — a division by a scalar
    becomes a multiplication by its reciprocal — so there it is compared within a few ulps.)"""
    ref, _, opt_ref = _run(lambda ps: torch.optim.Adam(ps, foreach=foreach, **KW), dtype, device, groups=groups)
    ours, _, opt = _run(lambda ps: Adam(ps, moment_dtype=dtype, chunk_elements=chunk, **KW), dtype, device,
                        groups=groups)
    exact = foreach or device == "cpu"
    pairs = [(p.detach(), q.detach()) for p, q in zip(ref, ours)]
    pairs += [(opt_ref.state[p][k], opt.state[q][k]) for p, q in zip(ref, ours) for k in ("exp_avg", "exp_avg_sq")]
    for a, b in pairs:
        assert b.dtype == dtype
        if exact:
            assert torch.equal(a, b), float((a - b).abs().max())
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert all(float(opt.state[q]["step"]) == 20 for q in ours)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_moments_of_bf16_parameters_are_torch_adam_on_a_rounded_copy(device):
    """bf16 parameters with fp32 moments: torch.optim.Adam stepping an fp32 copy of the bf16 parameters
    (the copy taken before each step, the result rounded to nearest into the parameters), bit for bit."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen).to(device, torch.bfloat16).requires_grad_() for s in SHAPES]
    copies = [p.detach().float().requires_grad_() for p in params]
    ours, ref = Adam(params, moment_dtype=torch.float32, **KW), torch.optim.Adam(copies, foreach=True, **KW)
    for _ in range(20):
        for p, c in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=gen).to(device, torch.bfloat16)
            with torch.no_grad():
                c.copy_(p)
            c.grad = p.grad.float()
        ours.step()
        ref.step()
        _equal(params, [c.to(torch.bfloat16) for c in copies])
    for p, c in zip(params, copies):
        assert ours.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(ours.state[p]["exp_avg_sq"], ref.state[c]["exp_avg_sq"])


# ----------------------------------------------------------------------------------------------- (2)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bf16_moments_track_torch_adam(device, rounding, dtype):
    for seed in range(3):
        ref, start, _ = _run(lambda ps: torch.optim.Adam(ps, **KW), dtype, device, seed=seed)
        ours, _, opt = _run(lambda ps: Adam(ps, rounding=rounding, seed=seed, **KW), dtype, device, seed=seed)
        d_ref = torch.cat([(p - s).detach().flatten() for p, s in zip(ref, start)])
        d_ours = torch.cat([(p - s).detach().flatten() for p, s in zip(ours, start)])
        assert float((d_ours - d_ref).norm() / d_ref.norm()) < 1e-2
        bound = 2e-2 * sum(KW["lr"] * (1 + t % 3) for t in range(20))  # (the lr of _run's steps)
        assert float((d_ours - d_ref).abs().max()) < bound
        for p in ours:
            st = opt.state[p]
            for k in ("exp_avg", "exp_avg_sq"):
                assert st[k].dtype == torch.bfloat16 and st[k].shape == p.shape and st[k].device == p.device
                assert st[k].element_size() * st[k].numel() == 2 * p.numel()
                assert st[k].untyped_storage().nbytes() == 2 * p.numel()
            assert torch.isfinite(st["exp_avg_sq"]).all() and (st["exp_avg_sq"] > 0).all()
    n = sum(p.numel() for p in ours)
    moments = sum(t.untyped_storage().nbytes() for st in opt.state.values() for k, t in st.items() if k != "step")
    assert moments == 2 * 2 * n  # torch.optim.Adam: 2 · 4 · n for fp32 parameters


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_parameters_nearest_rounding_is_torch_fused_adam(device):
    """bf16 parameters: torch's fused Adam keeps the moments in bf16 and computes in fp32, as this Adam
    with moment_dtype bfloat16 and round-to-nearest does: the same on the CPU bit for bit (CUDA's
    fused kernel orders its arithmetic differently: within a bf16 spacing)."""
    ref, _, opt_ref = _run(lambda ps: torch.optim.Adam(ps, fused=True, **KW), torch.bfloat16, device)
    ours, _, opt = _run(lambda ps: Adam(ps, rounding="nearest", **KW), torch.bfloat16, device)
    if device == "cpu":
        _equal(ref, ours)
    else:
        for p, q in zip(ref, ours):
            torch.testing.assert_close(p.detach().float(), q.detach().float(), rtol=2 ** -7, atol=1e-3)
    for p in ours:
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_is_unbiased_and_between_the_neighbours(device):
    """Each draw is one of x's two bf16 neighbours (x truncated toward 0, and one bf16 spacing further
    out); the mean of 400 draws is x within 5 standard errors; ±0, ±inf and bf16 numbers are kept, NaN
    stays NaN (also patterns whose integer sum would wrap)."""
    from fastclt.training.optim import _round_stochastic_
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(4097, device=device, generator=gen) * torch.logspace(-20, 20, 4097, device=device)
    down_bits = x.view(torch.int32) & -65536
    down, up = down_bits.view(torch.float32), (down_bits + 65536).view(torch.float32)
    spacing = (up - down).abs().double()
    out = torch.empty_like(x, dtype=torch.bfloat16)
    total = torch.zeros_like(x, dtype=torch.float64)
    draws = 400
    for _ in range(draws):
        bits = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=device, generator=gen)
        _round_stochastic_(out, x, bits)
        assert ((out.float() == down) | (out.float() == up)).all()
        total += out.double()
    assert (((total / draws - x.double()) / spacing).abs() < 5 * 0.5 / draws ** 0.5).all()
    kept = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, float("inf"), float("-inf")], device=device)
    kept[4] = kept[4].to(torch.bfloat16).float()
    special = torch.empty_like(kept, dtype=torch.bfloat16)
    _round_stochastic_(special, kept, torch.full(kept.shape, 0xFFFF, dtype=torch.int32, device=device))
    assert torch.equal(special.float(), kept) and torch.equal(special.float().signbit(), kept.signbit())
    nan_bits = torch.tensor([0x7FC00000, 0x7FFFFFFF, -1], dtype=torch.int32, device=device).view(torch.float32)
    _round_stochastic_(special[:3], nan_bits, torch.full((3,), 0xFFFF, dtype=torch.int32, device=device))
    assert torch.isnan(special[:3]).all()


def test_stochastic_rounding_keeps_the_second_moment_unbiased_where_nearest_drifts():
    """3000 steps of stationary random gradients (β2 = 0.999): with round-to-nearest the bf16 v cannot
    decrease and drifts up (measured: median v / torch's v 1.33 at 3000 steps, 2.4 at 20 000); with
    stochastic rounding its median stays at 1 (measured 0.9998)."""
    ratios = {}
    for rounding in ("stochastic", "nearest"):
        gen = torch.Generator().manual_seed(5)
        p, q = torch.zeros(8192, requires_grad=True), torch.zeros(8192, requires_grad=True)
        scale = torch.rand(8192, generator=gen) * 2 + 0.1
        ours, ref = Adam([p], lr=1e-9, rounding=rounding), torch.optim.Adam([q], lr=1e-9)
        for _ in range(3000):
            p.grad = (torch.randn(8192, generator=gen) + 0.3) * scale
            q.grad = p.grad.clone()
            ours.step()
            ref.step()
        ratios[rounding] = float((ours.state[p]["exp_avg_sq"].float() / ref.state[q]["exp_avg_sq"]).median())
    assert abs(ratios["stochastic"] - 1) < 0.01, ratios
    assert ratios["nearest"] > 1.15, ratios


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_and_state_dict_round_trip_continues_exactly(device):
    """The same seed draws the same bits (another seed other bits); an optimizer rebuilt from a
    state_dict (bf16 moments kept bf16, not cast to the parameters' fp32) continues bit for bit."""
    a, _, _ = _run(lambda ps: Adam(ps, seed=1, **KW), device=device)
    b, _, _ = _run(lambda ps: Adam(ps, seed=1, **KW), device=device)
    c, _, _ = _run(lambda ps: Adam(ps, seed=2, **KW), device=device)
    _equal(a, b)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(device) for s in SHAPES] for _ in range(10)]
    opt = Adam(params, chunk_elements=500, **KW)

    def steps(o, ps, gs):
        for g in gs:
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            o.step()
    steps(opt, params, grads[:5])
    saved = copy.deepcopy(opt.state_dict())  # (as read from a file: torch's state_dict holds the live tensors)
    copies = [p.detach().clone().requires_grad_() for p in params]
    other = Adam(copies, chunk_elements=500, **KW)
    other.load_state_dict(saved)
    for p, q in zip(params, copies):
        for k in ("exp_avg", "exp_avg_sq"):
            assert other.state[q][k].dtype == torch.bfloat16 and torch.equal(other.state[q][k], opt.state[p][k])
        assert other.state[q]["step"].device.type == "cpu" and float(other.state[q]["step"]) == 5
    steps(opt, params, grads[5:])
    steps(other, copies, grads[5:])
    _equal(params, copies)
    torch_state = torch.optim.Adam(params, **KW)
    torch_state.load_state_dict(saved)  # torch's Adam casts the bf16 moments to fp32 ...
    with pytest.raises(ValueError, match="exp_avg of parameter 0 is stored in torch.float32.*keeps its moments "
                                         "in torch.bfloat16"):
        Adam(copies, **KW).load_state_dict(torch_state.state_dict())  # ... which this Adam refuses


def test_bad_arguments_are_named():
    p = [torch.zeros(3, requires_grad=True)]
    for kwargs, name in ((dict(moment_dtype=torch.float16), "moment_dtype"), (dict(moment_dtype="fp8"), "moment_dtype"),
                         (dict(rounding="up"), "rounding"), (dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"),
                         (dict(chunk_elements=0), "chunk_elements")):
        with pytest.raises(ValueError, match=f"^{name}: expected"):
            Adam(p, **kwargs)
    with pytest.raises(ValueError, match="params: expected float32, bfloat16 or float64"):
        Adam([torch.zeros(3, dtype=torch.float16, requires_grad=True)])


# ----------------------------------------------------------------------------------------------- (3)
ARGS = ["--model.n_layers", "2", "--model.d_in", "16", "--model.d_out", "16", "--model.n_features", "32",
        "--model.activation", "topk", "--model.k", "2", "--data.n_true", "16", "--data.true_l0", "2",
        "--train.steps", "20", "--train.batch_size", "64", "--train.lr_warmup_steps", "4",
        "--train.dead_tokens", "128", "--train.init_samples", "128", "--train.eval_batches", "1",
        "--train.device", "cpu", "--train.grad_accum", "2", "--data.prefetch", "2",
        "--log.every", "1", "--log.progress", "false", "--log.plot", "false", "--checkpoint.every", "5"]
BF16 = ["--train.optimizer_moments", "bfloat16"]


def _metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def _snapshot(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def bf16_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16_ref")
    assert main(ARGS + BF16 + ["--out_dir", str(out)]) == 0
    return out


def test_trainer_with_bf16_moments_trains_like_float32(tmp_path):
    """150 steps at lr 1e-2: the FVU falls from ~0.98 to ~0.3 with either moment dtype (measured: the mean
    of the last 10 steps 0.304 bf16 vs 0.313 float32); the checkpoint's moments are bf16."""
    args = [a for a in ARGS]
    args[args.index("--train.steps") + 1] = "150"
    args[args.index("--train.grad_accum") + 1] = "1"
    args[args.index("--checkpoint.every") + 1] = "0"
    args += ["--train.lr", "1e-2", "--log.every", "1"]
    fvu = {}
    for name, extra in (("float32", []), ("bfloat16", BF16)):
        out = tmp_path / name
        assert main(args + extra + ["--out_dir", str(out)]) == 0
        m = [r["fvu"] for r in _metrics(out) if "fvu" in r]
        fvu[name] = (sum(m[:10]) / 10, sum(m[-10:]) / 10)
    assert fvu["bfloat16"][0] == pytest.approx(fvu["float32"][0], rel=1e-3)  # (the first steps barely differ)
    assert fvu["bfloat16"][1] < 0.5 * fvu["bfloat16"][0]
    assert fvu["bfloat16"][1] == pytest.approx(fvu["float32"][1], rel=0.1), fvu
    tensors = ckpt.load_checkpoint(ckpt.find_checkpoints(tmp_path / "bfloat16")[0], _layout(),
                                   load_config(args + BF16 + ["--out_dir", "x"]).fingerprint(), "cpu")[0]
    moments = {k: v for k, v in tensors.items() if k.startswith("optim/") and not k.endswith("/step")}
    assert moments and all(v.dtype == torch.bfloat16 for v in moments.values())


def _layout():
    from fastclt.training.parallel import Layout
    return Layout()


def test_trainer_with_bf16_moments_resumes_exactly(bf16_reference, tmp_path):
    assert main(ARGS + BF16 + ["--out_dir", str(tmp_path), "--train.max_steps", "7"]) == 0
    assert [p.name for p in ckpt.find_checkpoints(tmp_path)] == ["step_00000007", "step_00000005"]
    assert main(ARGS + BF16 + ["--out_dir", str(tmp_path)]) == 0
    ref = [(r["step"], r["loss"], r["grad_norm"]) for r in _metrics(bf16_reference)]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in _metrics(tmp_path)] == ref
    a = fastclt.CrossLayerTranscoder.from_pretrained(bf16_reference / "model").state_dict()
    b = fastclt.CrossLayerTranscoder.from_pretrained(tmp_path / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file
    ours, theirs = (load_file(ckpt.checkpoint_dir(out) / "step_00000020" / "rank_00000.safetensors")
                    for out in (tmp_path, bf16_reference))
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert ours["optim/W_enc/exp_avg_sq"].dtype == torch.bfloat16  # (the moments of the last step, bit for bit)


# ----------------------------------------------------------------------------------------------- (4)
@pytest.mark.parametrize("value", ["bf16", "float16", "fp32", "1"])
def test_bad_values_name_the_option(value, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^train\.optimizer_moments: expected one of \('float32', 'bfloat16'\)"):
        load_config(ARGS + ["--train.optimizer_moments", value, "--out_dir", str(tmp_path)])
    assert main(ARGS + ["--optimizer_moments", value, "--out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "train.optimizer_moments" in err and repr(value) in err, err
    assert not (tmp_path / "o").exists()


def test_help_and_memory_estimate_know_the_option(capsys):
    from fastclt.train import _memory_needed
    assert main(["--help"]) == 0
    assert "--train.optimizer_moments" in capsys.readouterr().out
    need = {}
    for moments in ("float32", "bfloat16"):
        cfg = load_config(["--model.d_in", "768", "--model.n_layers", "12", "--model.n_features", "32768",
                           "--train.optimizer_moments", moments])
        mcfg = cfg.model_config()
        need[moments] = _memory_needed(cfg, mcfg, ckpt.model_class(mcfg), _layout(), torch.device("cuda"))
    with torch.device("meta"):
        n = sum(p.numel() for p in ckpt.model_class(mcfg)(mcfg).parameters())
    assert n == 2_265_326_592  # a CLT of GPT-2 small's size
    part = "model, gradients and Adam state"
    assert need["float32"][part] >= 16 * n and need["bfloat16"][part] >= 12 * n
    assert need["float32"][part] - need["bfloat16"][part] == 2 * 2 * n  # 9.06 GB (8.44 GiB) of 36.25 GB


# ----------------------------------------------------------------------------------------------- (5)
@pytest.mark.parametrize("first, then", [([], BF16), (BF16, [])])
def test_resuming_with_the_other_moment_dtype_is_refused(first, then, tmp_path, capsys):
    assert main(ARGS + first + ["--out_dir", str(tmp_path), "--train.max_steps", "5"]) == 0
    before = _snapshot(tmp_path)
    capsys.readouterr()
    written = "bfloat16" if first else "float32"
    assert main(ARGS + then + ["--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "train.optimizer_moments" in err, err
    assert f"rerun with --train.optimizer_moments {written} to resume it" in err, err
    assert _snapshot(tmp_path) == before  # nothing converted, set aside or written
    assert main(ARGS + first + ["--out_dir", str(tmp_path)]) == 0  # the right setting resumes
    assert "resumed from" in capsys.readouterr().out


def test_restore_refuses_moments_of_another_dtype():
    """Beneath the configuration check: restore() compares the stored moments' dtype with the
    optimizer's and refuses a difference (torch's load_state_dict would cast silently)."""
    model = fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=8, n_features=16, activation="topk", k=2))
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    bf16 = Adam(params, **KW)
    bf16.step()
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"optim/{n}/{k}": v for i, n in enumerate(names) for k, v in bf16.state_dict()["state"][i].items()})
    tensors["rng/cpu"] = torch.get_rng_state()
    with pytest.raises(ckpt.ConfigMismatch, match=r"stored in bfloat16, but this run keeps them in float32 "
                                                  r"\(train\.optimizer_moments\)"):
        ckpt.restore(tensors, model, torch.optim.Adam(params, **KW), names, "cpu")
    ckpt.restore(tensors, model, Adam(params, **KW), names, "cpu")  # the same dtype loads


def test_checkpoints_from_before_the_option_resume_as_float32():
    """A fingerprint recorded before train.optimizer_moments existed resolves to its default, float32."""
    fp = load_config(ARGS).fingerprint()
    assert fp["train.optimizer_moments"] == "float32"
    assert resolve_fingerprint({k: v for k, v in fp.items() if k != "train.optimizer_moments"}) == fp
