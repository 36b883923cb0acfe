"""End-to-end training step: ``model.loss(x, y).loss.backward()`` then ``torch.optim.Adam.step()``,
through the public API (docs/DESIGN.md §10), for

    sae-topk                      fastclt.SparseAutoencoder, TopK            (shapes with "sae")
    sae-batchtopk[-matryoshka5]   the same with BatchTopK, plain and with 5 Matryoshka prefixes
                                  m_g = F/16, F/8, F/4, F/2, F (``auto`` only: its goal compares
                                  it with the plain step)                    (shapes with "sae")
    plt-jumprelu                  fastclt.CrossLayerTranscoder, n_layers=1   (shapes with "sae")
    clt-<tying>-<activation>      tying none | per_source | per_target,
                                  activation batchtopk | jumprelu            (shapes with "clt")
    clt-none-batchtopk-matryoshka5   the untied BatchTopK CLT with those 5 prefixes (``auto`` only)
    molt-topk, molt-jumprelu      fastclt.MOLT, one layer, T = F transforms in the default rank
                                  groups (``bench_ops.molt_config``), k gates open per token (TopK;
                                  JumpReLU with the g·‖U V‖_F tanh penalty, whose Gram products cost
                                  8·d·Σ_i r_i² whatever B)                   (shapes with "molt")

Implementations are compared through the environment: ``FASTCLT_IMPL=reference`` (every op eager)
against ``FASTCLT_IMPL=auto`` (the kernels), set and restored around each step by ``fastclt_impl``.
``eai-sparsify``'s TopK SAE runs beside sae-topk when ``import sparsify`` works. Adam is fused
(``fused=True``) on GPUs and CPUs alike.
Parameters are fp32; on a GPU the loss runs under ``torch.autocast(bfloat16)`` (as sparsify's
forward does itself), on a CPU in fp32. JumpReLU thresholds are set so that about k features per
token fire on the benchmark's data, so that both activations do comparable sparse work.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

import torch

from benchmarks.bench_ops import molt_config, molt_flops
from benchmarks.harness import Case
from benchmarks.shapes import Shape

__all__ = ["fastclt_impl", "train_cases", "sparsify_available", "TRAIN_IMPLS", "NO_SCREEN", "screens"]

TRAIN_IMPLS = ("reference", "auto")
# "auto" with the CPU encoders' bf16 screen off (their fp32 GEMM): beside "auto" where it screens
NO_SCREEN = "auto-no-screen"
SPARSIFY = "eai-sparsify"


@contextlib.contextmanager
def _env(name: str, value: Optional[str]) -> Iterator[None]:
    """Set the environment variable ``name`` to ``value`` for the duration of the block (None: leave it
    as it is), then restore what was there before."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def fastclt_impl(impl: str):
    """Set ``FASTCLT_IMPL`` for the duration of the block and restore what was there before."""
    return _env("FASTCLT_IMPL", impl)


def _adam(params) -> torch.optim.Adam:
    """Adam, fused (CUDA and CPU): one pass per parameter, no full-size temporaries (the untied
    gpt2-clt has 2.3G parameters; on a CPU the default foreach path is ~20× slower). The same
    optimizer for every implementation and for eai-sparsify."""
    return torch.optim.Adam(list(params), lr=1e-4, fused=True)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


MATRYOSHKA_G = 5


def _variants(s: Shape) -> list[tuple[str, str, str, int]]:
    """(family, activation, tying, Matryoshka prefixes or 0) for the shape's model families."""
    out = []
    if "sae" in s.models:
        out += [("sae", "topk", "", 0), ("sae", "batchtopk", "", 0), ("sae", "batchtopk", "", MATRYOSHKA_G),
                ("plt", "jumprelu", "", 0)]
    if "clt" in s.models:
        out += [("clt", act, tying, 0) for tying in ("none", "per_source", "per_target")
                for act in ("batchtopk", "jumprelu")]
        out.append(("clt", "batchtopk", "none", MATRYOSHKA_G))
    if "molt" in s.models:
        out += [("molt", "topk", "", 0), ("molt", "jumprelu", "", 0)]
    return out


def _name(family: str, act: str, tying: str, prefixes: int = 0) -> str:
    name = f"{family}-{tying}-{act}" if tying else f"{family}-{act}"
    return name + (f"-matryoshka{prefixes}" if prefixes else "")


def _prefixes(F: int, G: int) -> list[int]:
    """G prefix ends F/2^(G-1), …, F/2, F (at least one feature per block)."""
    ends = sorted({max(g + 1, F >> (G - 1 - g)) for g in range(G)})
    return ends if ends[-1] == F else ends + [F]


def _n_params(family: str, tying: str, s: Shape) -> int:
    if family == "molt":  # gate vectors and biases, U and V, b_dec
        return s.F * s.d + s.F + molt_config(s).total_rank * 2 * s.d + s.d
    L = s.L if family == "clt" else 1
    enc = L * s.F * s.d
    dec = s.F * s.d * (L * (L + 1) // 2 if tying == "none" else L)
    return enc + dec + L * (s.F + 2 * s.d)


def molt_step_flops(act: str, s: Shape) -> float:
    """A MOLT step's counted FLOPs: those of the ops suite's MOLT layer forward and backward
    (``bench_ops.molt_flops``); JumpReLU gates add the norm penalty's Gram products, independent of
    B: U_iᵀU_i and V_i V_iᵀ forward and their backward, 8·d·Σ_i r_i²."""
    flops = molt_flops(s)["fwd+bwd"]
    if act == "jumprelu":
        flops += 8.0 * s.d * sum(n * r * r for n, r in molt_config(s).rank_groups)
    return flops


def sparsify_available(device: torch.device) -> Optional[str]:
    """None when eai-sparsify imports, else the reason. On a CPU its Triton decoder is disabled
    (SPARSIFY_DISABLE_TRITON=1, its own switch) so that it runs its eager embedding_bag path."""
    if device.type != "cuda":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        import sparsify  # noqa: F401
    except Exception as e:
        return f"eai-sparsify not importable ({type(e).__name__}: {str(e)[:80]})"
    if device.type != "cuda":
        import sparsify.sparse_coder as sc
        import sparsify.utils as su
        sc.decoder_impl = su.eager_decode  # in case sparsify was imported before the switch was set
    return None


def _calibrate_threshold(model, x: torch.Tensor, k: int, F: int) -> str:
    """Set JumpReLU thresholds so that about k of F features fire per token on ``x``."""
    with torch.no_grad():
        W = model.W_enc
        b = model.b_enc
        if W.dim() == 2:
            W, b, xs = W[None], b[None], x[:256, None, :]
        else:
            xs = x[:256]
        thr = []
        for l in range(W.shape[0]):
            h = (xs[:, l].float() @ W[l].float().T + b[l].float()).flatten()
            keep = max(1, int(h.numel() * k / F))
            thr.append(h.topk(keep).values.min().clamp_min(1e-3))
        thr = torch.stack(thr)
        for name, log in (("threshold", False), ("log_threshold", True), ("theta", False)):
            p = getattr(model, name, None)
            if isinstance(p, torch.Tensor) and p.is_leaf:
                val = thr.log() if log else thr
                p.copy_(val.reshape(-1, 1).expand(p.reshape(len(thr), -1).shape).reshape(p.shape).to(p.dtype))
                return ""
    return "JumpReLU threshold not calibrated (no leaf threshold attribute)"


def _build_fastclt(family: str, act: str, tying: str, s: Shape, device: torch.device, seed: int, prefixes: int = 0):
    import fastclt
    g = torch.Generator(device=device).manual_seed(seed)
    mat = {"matryoshka_prefixes": _prefixes(s.F, prefixes)} if prefixes else {}
    if family == "sae":
        with torch.device(device):  # initialise on the device: a 2G-parameter CLT is slow on a CPU
            model = fastclt.SparseAutoencoder(fastclt.SAEConfig(d_in=s.d, n_features=s.F, activation=act, k=s.k, **mat))
        x = torch.randn(s.B, s.d, generator=g, device=device)
        y = x
    elif family == "molt":
        with torch.device(device):
            model = fastclt.MOLT(molt_config(s, act))
        x = torch.randn(s.B, 1, s.d, generator=g, device=device)
        y = 0.5 * x + torch.randn(s.B, 1, s.d, generator=g, device=device)
    else:
        L = s.L if family == "clt" else 1
        with torch.device(device):
            model = fastclt.CrossLayerTranscoder(fastclt.CLTConfig(
                n_layers=L, d_in=s.d, d_out=s.d, n_features=s.F, activation=act, k=s.k,
                decoder_tying=tying or "none", skip_connection=False, normalization="none", **mat))
        x = torch.randn(s.B, L, s.d, generator=g, device=device)
        y = 0.5 * x + torch.randn(s.B, L, s.d, generator=g, device=device)
    model = model.to(device)
    note = _calibrate_threshold(model, x, s.k, s.F) if act == "jumprelu" else ""
    return model, x, y, note


def _resolved(device: torch.device) -> str:
    """Which impl "auto" picks per op on this device, e.g. "auto: encode=triton, ...". """
    try:
        import fastclt.ops as ops
        parts = []
        for op in ("encode", "batch_topk", "sparse_decode", "clt_decode", "molt_decode"):
            with contextlib.suppress(Exception):
                parts.append(f"{op}={ops.resolve(op, 'auto', device)[0]}")
        return "auto: " + ", ".join(parts)
    except Exception:
        return ""


def _make_fastclt(family, act, tying, s, device, impl, prefixes=0) -> Callable[[int], Callable[[], None]]:
    """impl: an implementation of ``FASTCLT_IMPL``, or ``NO_SCREEN`` ("auto" with the CPU encoders'
    bf16 screen off: their fp32 GEMM, fastclt/ops/ext/screen.py)."""
    screen = "0" if impl == NO_SCREEN else None
    impl = "auto" if impl == NO_SCREEN else impl

    def make(seed: int):
        model, x, y, _ = _build_fastclt(family, act, tying, s, device, seed, prefixes)
        opt = _adam(model.parameters())

        def step():
            opt.zero_grad(set_to_none=True)
            with fastclt_impl(impl), _env("FASTCLT_SCREEN", screen):
                with _autocast(device):
                    out = model.loss(x, y)
                out.loss.backward()
            opt.step()
        return step
    return make


def screens(family: str, act: str, s: Shape, device: torch.device) -> bool:
    """Whether the encoders of this variant screen their selection at this shape
    (fastclt/ops/ext/screen.py: by default on a CPU with AMX, TopK / BatchTopK, large enough products;
    ``FASTCLT_SCREEN`` as set)."""
    if device.type != "cpu" or act not in ("topk", "batchtopk") or family == "molt":
        return False
    from fastclt.ops.ext import screen
    return screen.applies(torch.empty(s.B, s.d), torch.empty(s.F, s.d), torch.empty(s.F), act, s.k)


def _make_sparsify(s: Shape, device: torch.device) -> Callable[[int], Callable[[], None]]:
    def make(seed: int):
        import sparsify
        torch.manual_seed(seed)
        sae = sparsify.SparseCoder(s.d, sparsify.SparseCoderConfig(num_latents=s.F, k=s.k), device=device,
                                   dtype=torch.float32)
        x = torch.randn(s.B, s.d, generator=torch.Generator(device=device).manual_seed(seed), device=device)
        opt = _adam(sae.parameters())

        def step():
            opt.zero_grad(set_to_none=True)
            out = sae(x)  # its forward autocasts to bf16 on CUDA itself
            out.fvu.backward()
            opt.step()
        return step
    return make


def _make_clc(s: Shape, device: torch.device, tying: str) -> Callable[[int], Callable[[], None]]:
    """crosslayer-coding's BatchTopK CLT (k per token, the tying ``tying``) on the same shape and data,
    stepped as its trainer steps: ``get_feature_activations``, ``LossManager.compute_total_loss`` with
    them precomputed (reconstruction only: no sparsity, pre-activation or auxiliary terms), backward,
    the same fused Adam."""
    def make(seed: int):
        from clt.config import CLTConfig, TrainingConfig
        from clt.models.clt import CrossLayerTranscoder
        from clt.training.losses import LossManager
        torch.manual_seed(seed)
        L = s.L
        pcfg = CLTConfig(num_features=s.F, num_layers=L, d_model=s.d, activation_fn="batchtopk", batchtopk_k=s.k,
                         decoder_tying=tying, clt_dtype="float32")
        peer = CrossLayerTranscoder(pcfg, process_group=None, device=device)
        tcfg = TrainingConfig(learning_rate=1e-4, training_steps=1000, normalization_method="none",
                              sparsity_lambda=0.0, preactivation_coef=0.0,
                              activation_path="unused: activations are passed in")
        lm = LossManager(tcfg, clt_config=pcfg)
        opt = _adam(peer.parameters())
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(s.B, L, s.d, generator=g, device=device)
        y = 0.5 * x + torch.randn(s.B, L, s.d, generator=g, device=device)
        inputs = {l: x[:, l] for l in range(L)}
        targets = {l: y[:, l] for l in range(L)}

        def step():
            opt.zero_grad(set_to_none=True)
            acts = peer.get_feature_activations(inputs)
            loss, _ = lm.compute_total_loss(peer, inputs, targets, 500, 1000, precomputed_activations=acts)
            loss.backward()
            opt.step()
            peer.decoder_module._cached_decoder_norms = None  # as its trainer does after each step
        return step
    return make


def train_cases(shape: Shape, device: torch.device, *, priority_of: Callable[..., int] = lambda *a: 1) -> list[Case]:
    """One case per (model variant, impl) of the shape, plus eai-sparsify beside the TopK SAE and
    crosslayer-coding beside the BatchTopK CLTs of a CPU CLT shape."""
    s = shape
    dname = "bf16-autocast" if device.type == "cuda" else "fp32"
    e = 2 if device.type == "cuda" else 4
    cases = []
    for family, act, tying, prefixes in _variants(s):
        L = s.L if family == "clt" else 1
        gather = {"": 1, "none": L * (L + 1) / 2, "per_source": L,
                  "per_target": L * (L + 1) / 2}[tying] if family == "clt" else 1
        P = _n_params(family, tying, s)
        # encoder GEMM + sparse encoder backward per layer, decoder gathers fwd (2) + bwd (4)
        flops = 2.0 * s.B * s.d * s.F * L + 4.0 * s.B * s.k * s.d * L + 6.0 * s.B * s.k * s.d * gather
        # fp32 param, grad, Adam m, v; ~4 dense [B, F] fp32 buffers per layer (eager)
        need = 16 * P + 16 * s.B * s.F * L
        if family == "molt":  # the eager reference holds a few dense [B, R] activations
            flops = molt_step_flops(act, s)
            need = 16 * P + 16 * s.B * molt_config(s).total_rank
        byts = 28.0 * P + 3 * s.B * L * s.d * e
        variant = _name(family, act, tying, prefixes)
        # a Matryoshka step is compared with the plain step of the same kernels: no eager row
        impls = ("auto",) if prefixes else TRAIN_IMPLS
        if not prefixes and screens(family, act, s, device):
            impls += (NO_SCREEN,)
        for impl in impls:
            note = _resolved(device) if impl == "auto" else \
                "auto with the bf16 screen off (FASTCLT_SCREEN=0): the encoders' fp32 GEMM" if impl == NO_SCREEN else ""
            if prefixes:
                note = f"prefixes {_prefixes(s.F, prefixes)}" + (f"; {note}" if note else "")
            cases.append(Case(suite="train", op="train_step", variant=variant, mode="fwd+bwd+adam", shape=s.name,
                              impl=impl, dtype=dname, flops=flops, bytes=byts, need_bytes=need, rotate=False,
                              make=_make_fastclt(family, act, tying, s, device, impl, prefixes), note=note,
                              priority=priority_of("train_step", variant, "", s.name)))
        if family == "sae" and act == "topk":
            why = sparsify_available(device)
            P_sp = 2 * s.F * s.d + s.F + s.d
            cases.append(Case(suite="train", op="train_step", variant=variant, mode="fwd+bwd+adam", shape=s.name,
                              impl=SPARSIFY, dtype=dname, flops=flops, bytes=28.0 * P_sp + 3 * s.B * s.d * e,
                              need_bytes=16 * P_sp + 16 * s.B * s.F, rotate=False,
                              make=None if why else _make_sparsify(s, device), skip=why,
                              note="" if why else "SparseCoder(num_latents=F, k) and loss = fvu",
                              priority=priority_of("train_step", variant, "", s.name)))
        if family == "clt" and act == "batchtopk" and not prefixes and s.name == "cpu-clt":
            from benchmarks.bench_density import PEER, peer_available
            why = peer_available()
            cases.append(Case(suite="train", op="train_step", variant=variant, mode="fwd+bwd+adam", shape=s.name,
                              impl=PEER, dtype=dname, flops=flops, bytes=byts, need_bytes=need, rotate=False,
                              make=None if why else _make_clc(s, device, tying), skip=why,
                              note="" if why else "its BatchTopK CLT and LossManager (reconstruction only)",
                              priority=priority_of("train_step", variant, "", s.name)))
    return cases
