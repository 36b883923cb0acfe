"""Per-op benchmarks: every registered implementation of an op side by side, on the same inputs,
with eager baselines where meaningful.

    encode            fwd | bwd (encoder backward alone) | fwd+bwd     + "torch-gemm" (F.linear, fwd)
    topk, batch_topk  fwd                                              + "torch.topk" rows / flattened
    batch_topk_layers fwd (shapes with L > 1)                          + "torch.topk-flat" over [L·B·F]
    sparse_decode     fwd | bwd | fwd+bwd                              + "dense-matmul", "embedding_bag"
    clt_decode        fwd | bwd | fwd+bwd, tying none / per_source / per_target (shapes with L > 1)
    auxk              fwd | fwd+bwd: auxk_select → sparse_decode (no b_dec) → auxk_loss
    molt              fwd | bwd | fwd+bwd: a MOLT layer, TopK gates (encode) → molt_decode (shapes
                      with "molt"; T = F transforms in the default rank groups)   + "gate-gemm" (fwd)

"fwd" runs under ``torch.no_grad()``; "bwd" replays the backward of one recorded forward
(``retain_graph=True``, gradients reset to None before each run, as a training step does);
"fwd+bwd" records and runs both. FLOPs and bytes are the minimal counts of benchmarks/README.md.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as Fn

from benchmarks.harness import Case
from benchmarks.shapes import Shape

__all__ = ["ops_cases", "random_codes", "OPS", "shape_ops", "molt_config", "molt_flops"]

OPS = ("encode", "topk", "batch_topk", "batch_topk_layers", "sparse_decode", "clt_decode", "auxk", "molt")
DICTIONARY_OPS = OPS[:-1]  # the ops of the SAE / PLT / CLT shapes
MODES = ("fwd", "bwd", "fwd+bwd")


def _ops():
    import fastclt  # noqa: F401
    import fastclt.ops as ops  # registers every kernel implementation the repository ships
    return ops


def _elem(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(1000 + seed)


def _randn(shape, g, device, dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)


def random_codes(B: int, F: int, k: int, device: torch.device, dtype: torch.dtype, seed: int,
                 variable: bool = False):
    """SparseCodes with k entries per row (or a random count in [k/2, 3k/2] when ``variable``, as
    BatchTopK gives), indices distinct within a row and spread evenly over features, values > 0."""
    from fastclt.codes import SparseCodes
    g = _gen(device, seed)
    if variable:
        lengths = torch.randint(max(k // 2, 1), min(k + (k + 1) // 2, F) + 1, (B,), generator=g, device=device)
    else:
        lengths = torch.full((B,), k, device=device, dtype=torch.int64)
    row_ptr = torch.zeros(B + 1, dtype=torch.int64, device=device)
    row_ptr[1:] = torch.cumsum(lengths, 0)
    nnz = int(row_ptr[-1])
    rows = torch.repeat_interleave(torch.arange(B, device=device), lengths, output_size=nnz)
    pos = torch.arange(nnz, device=device) - row_ptr[rows]
    stride = max(F // max(int(lengths.max()), 1), 1)
    base = torch.randint(0, F, (B,), generator=g, device=device)
    perm = torch.randperm(F, generator=g, device=device)
    index = perm[(base[rows] + pos * stride) % F].to(torch.int32)
    value = (torch.rand(nnz, generator=g, device=device) + 0.1).to(dtype)
    return SparseCodes(row_ptr, index, value, F, None if variable else k)


# ------------------------------------------------------------------------------ generic modes


def _modal(mode: str, build: Callable[[int], dict], forward: Callable[[dict], torch.Tensor],
           leaves: Callable[[dict], list]) -> Callable[[int], Callable[[], object]]:
    """make(seed) for one mode: fwd under no_grad, bwd replayed on one graph, or both."""
    def make(seed: int):
        inp = build(seed)
        if mode == "fwd":
            def fwd():
                with torch.no_grad():
                    return forward(inp)
            return fwd
        params = leaves(inp)
        for t in params:
            t.requires_grad_(True)
        out = forward(inp)
        g = _randn(out.shape, _gen(out.device, seed + 7), out.device, out.dtype)

        def reset():
            for t in params:
                t.grad = None
        if mode == "bwd":
            def bwd():
                reset()
                out.backward(g, retain_graph=True)
            return bwd

        def fwd_bwd():
            reset()
            forward(inp).backward(g)
        return fwd_bwd
    return make


class _Ctx:
    def __init__(self, device: torch.device, dtype: torch.dtype, max_sets: int = 4):
        self.device, self.dtype, self.max_sets = device, dtype, max_sets
        self.e = _elem(dtype)
        self.dname = str(dtype).replace("torch.", "")

    def impls(self, op: str) -> list[tuple[str, Optional[str]]]:
        """(impl, reason to skip or None) for every registered implementation of ``op``."""
        ops = _ops()
        out = []
        for impl in ops.implementations(op):
            if impl == "triton" and self.device.type != "cuda":
                out.append((impl, "triton: timed on CUDA only (the interpreter is for tests)"))
                continue
            try:
                ops.resolve(op, impl, self.device)
                out.append((impl, None))
            except Exception as e:  # unavailable here: a row with the reason
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                out.append((impl, "unavailable: " + msg.split(": ")[1 if "not available on" in msg else 0][:160]))
        return out


# ------------------------------------------------------------------------------------ encode


def _encode_cases(s: Shape, c: _Ctx, priority_of: Callable[..., int]) -> list[Case]:
    ops = _ops()
    B, d, F, k, e = s.B, s.d, s.F, s.k, c.e
    acts = (["topk"] if "sae" in s.models else []) + (["batchtopk"] if "clt" in s.models else []) + ["jumprelu"]
    nnz = B * k
    in_bytes = (B * d + F * d + 2 * F) * e
    flops = {"fwd": 2.0 * B * d * F, "bwd": 4.0 * nnz * d}
    byts = {"fwd": in_bytes + nnz * (e + 4) + 8 * (B + 1),
            "bwd": (2 * B * d + 2 * F * d + F) * e + nnz * (e + 4)}
    flops["fwd+bwd"] = flops["fwd"] + flops["bwd"]
    byts["fwd+bwd"] = byts["fwd"] + byts["bwd"]
    theta = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - k / F)))

    def build(seed: int) -> dict:
        g = _gen(c.device, seed)
        return {"x": _randn((B, d), g, c.device, c.dtype),
                "W": _randn((F, d), g, c.device, c.dtype, 1 / math.sqrt(d)),
                "b": _randn((F,), g, c.device, c.dtype, 0.01),
                "theta": torch.full((F,), theta, device=c.device, dtype=c.dtype)}

    cases = []
    for act in acts:
        for mode in MODES:
            need = c.max_sets * in_bytes + 4 * B * F * e
            common = dict(suite="ops", op="encode", variant=act, mode=mode, shape=s.name, dtype=c.dname,
                          flops=flops[mode], bytes=byts[mode], input_bytes=in_bytes, need_bytes=need,
                          priority=priority_of("encode", act, mode, s.name))
            for impl, why in c.impls("encode"):
                def fwd(inp, impl=impl, act=act):
                    codes = ops.encode(inp["x"], inp["W"], inp["b"], activation=act, k=k,
                                       threshold=inp["theta"] if act == "jumprelu" else None, impl=impl)
                    return codes.value

                def leaves(inp, act=act):
                    return [inp["x"], inp["W"], inp["b"]] + ([inp["theta"]] if act == "jumprelu" else [])
                cases.append(Case(impl=impl, make=None if why else _modal(mode, build, fwd, leaves), skip=why,
                                  **common))
            if mode == "fwd":
                cases.append(Case(impl="torch-gemm", note="F.linear(x, W_enc, b_enc): the dense GEMM alone",
                                  make=_modal(mode, build, lambda inp: Fn.linear(inp["x"], inp["W"], inp["b"]),
                                              lambda inp: []), **common))
    return cases


# ------------------------------------------------------------------------------------ select


def _select_cases(s: Shape, c: _Ctx, priority_of) -> list[Case]:
    ops = _ops()
    cases = []
    layered = [("topk", 1), ("batch_topk", 1)] + ([("batch_topk_layers", s.L)] if s.L > 1 else [])
    for op, L in layered:
        if s.ops is not None and op not in s.ops:
            continue
        shape = (s.B, s.F) if op != "batch_topk_layers" else (L, s.B, s.F)
        n = math.prod(shape)
        keep = s.k * s.B * L
        byts = n * c.e + keep * (c.e + 4)
        common = dict(suite="ops", op=op, variant=f"k={s.k}", mode="fwd", shape=s.name, dtype=c.dname,
                      flops=None, bytes=byts, input_bytes=n * c.e, need_bytes=c.max_sets * n * c.e + n * 12,
                      priority=priority_of(op, "", "fwd", s.name))

        def build(seed, shape=shape):
            return {"h": _randn(shape, _gen(c.device, seed), c.device, c.dtype)}
        for impl, why in c.impls(op):
            def fwd(inp, impl=impl, op=op):
                return getattr(ops, op)(inp["h"], s.k, impl=impl)
            cases.append(Case(impl=impl, make=None if why else _modal("fwd", build, fwd, lambda i: []), skip=why,
                              **common))
        if op == "topk":
            base = ("torch.topk", "torch.topk(h, k, dim=1): values and indices only",
                    lambda inp: torch.topk(inp["h"], s.k, dim=1, sorted=False))
        else:
            base = ("torch.topk-flat", "torch.topk on the flattened tensor: values and indices only",
                    lambda inp, keep=keep: torch.topk(inp["h"].reshape(-1), keep, sorted=False))
        cases.append(Case(impl=base[0], note=base[1], make=_modal("fwd", build, base[2], lambda i: []), **common))
    return cases


# ------------------------------------------------------------------------------------ decode


def _decode_cases(s: Shape, c: _Ctx, priority_of) -> list[Case]:
    ops = _ops()
    B, d, F, k, e = s.B, s.d, s.F, s.k, c.e
    nnz = B * k
    flops = {"fwd": 2.0 * nnz * d, "bwd": 4.0 * nnz * d}
    byts = {"fwd": nnz * d * e + nnz * (e + 4) + B * d * e, "bwd": 2 * nnz * d * e + B * d * e + nnz * (2 * e + 4)}
    flops["fwd+bwd"], byts["fwd+bwd"] = flops["fwd"] + flops["bwd"], byts["fwd"] + byts["bwd"]
    in_bytes = F * d * e + nnz * (e + 4)

    def build(seed):
        codes = random_codes(B, F, k, c.device, c.dtype, seed)
        return {"codes": codes, "W": _randn((F, d), _gen(c.device, seed + 1), c.device, c.dtype, 1 / math.sqrt(d))}

    def build_dense(seed):
        inp = build(seed)
        inp["a"] = inp["codes"].to_dense(F)
        return inp

    def build_bag(seed):
        inp = build(seed)
        idx, val = inp["codes"].topk_view()
        inp["idx"], inp["val"] = idx.long(), val.contiguous()
        return inp

    cases = []
    for mode in MODES:
        common = dict(suite="ops", op="sparse_decode", variant=f"k={k}", mode=mode, shape=s.name, dtype=c.dname,
                      flops=flops[mode], bytes=byts[mode], input_bytes=in_bytes,
                      need_bytes=c.max_sets * in_bytes + 3 * F * d * e,
                      priority=priority_of("sparse_decode", "", mode, s.name))
        for impl, why in c.impls("sparse_decode"):
            def fwd(inp, impl=impl):
                return ops.sparse_decode(inp["codes"], inp["W"], impl=impl)
            cases.append(Case(impl=impl, skip=why, make=None if why else _modal(
                mode, build, fwd, lambda inp: [inp["codes"].value, inp["W"]]), **common))
        dense_common = dict(common, need_bytes=common["need_bytes"] + 3 * B * F * e)
        cases.append(Case(impl="dense-matmul", note="a_dense @ W_dec with a_dense: [B, F]", make=_modal(
            mode, build_dense, lambda inp: inp["a"] @ inp["W"], lambda inp: [inp["a"], inp["W"]]), **dense_common))
        cases.append(Case(impl="embedding_bag", note="F.embedding_bag(mode='sum', per_sample_weights=value)",
                          make=_modal(mode, build_bag, lambda inp: Fn.embedding_bag(
                              inp["idx"], inp["W"], per_sample_weights=inp["val"], mode="sum"),
                              lambda inp: [inp["val"], inp["W"]]), **common))
    return cases


def _clt_decode_cases(s: Shape, c: _Ctx, priority_of) -> list[Case]:
    ops = _ops()
    B, d, F, k, L, e = s.B, s.d, s.F, s.k, s.L, c.e
    nnz = B * k  # expected per source layer
    cases = []
    for tying in ("none", "per_source", "per_target"):
        gathered_rows = {"none": nnz * L * (L + 1) / 2, "per_source": nnz * L,
                         "per_target": nnz * L * (L + 1) / 2}[tying]
        w_bytes = (F * d * e * L * (L + 1) // 2) if tying == "none" else F * d * e * L
        flops = {"fwd": 2.0 * gathered_rows * d, "bwd": 4.0 * gathered_rows * d}
        byts = {"fwd": gathered_rows * d * e + L * nnz * (e + 4) + B * L * d * e,
                "bwd": 2 * gathered_rows * d * e + B * L * d * e + L * nnz * (2 * e + 4)}
        flops["fwd+bwd"], byts["fwd+bwd"] = flops["fwd"] + flops["bwd"], byts["fwd"] + byts["bwd"]
        in_bytes = w_bytes + L * nnz * (e + 4)

        def build(seed, tying=tying):
            codes = [random_codes(B, F, k, c.device, c.dtype, seed * 100 + l, variable=True) for l in range(L)]
            g = _gen(c.device, seed + 1)
            if tying == "none":
                W = [_randn((F, L - l, d), g, c.device, c.dtype, 1 / math.sqrt(d)) for l in range(L)]
            else:
                W = _randn((L, F, d), g, c.device, c.dtype, 1 / math.sqrt(d))
            return {"codes": codes, "W": W}

        def leaves(inp):
            W = inp["W"] if isinstance(inp["W"], list) else [inp["W"]]
            return [cs.value for cs in inp["codes"]] + W

        for mode in MODES:
            common = dict(suite="ops", op="clt_decode", variant=tying, mode=mode, shape=s.name, dtype=c.dname,
                          flops=flops[mode], bytes=byts[mode], input_bytes=in_bytes,
                          need_bytes=c.max_sets * in_bytes + 2 * w_bytes,
                          priority=priority_of("clt_decode", tying, mode, s.name))
            for impl, why in c.impls("clt_decode"):
                def fwd(inp, impl=impl, tying=tying):
                    return ops.clt_decode(inp["codes"], inp["W"], tying, impl=impl)
                cases.append(Case(impl=impl, skip=why, make=None if why else _modal(mode, build, fwd, leaves),
                                  **common))
    return cases


# -------------------------------------------------------------------------------------- auxk


def _auxk_cases(s: Shape, c: _Ctx, priority_of) -> list[Case]:
    ops = _ops()
    B, d, F, e = s.B, s.d, s.F, c.e
    n_dead = max(1, int(s.dead_frac * F))
    k_aux = min(s.k_aux, n_dead)
    gathered = B * k_aux * d
    flops = {"fwd": 2.0 * B * d * n_dead + 2.0 * gathered}
    byts = {"fwd": (B * d + n_dead * d) * e + gathered * e + 3 * B * d * e}
    flops["fwd+bwd"] = flops["fwd"] + 8.0 * gathered
    byts["fwd+bwd"] = byts["fwd"] + 3 * gathered * e + 2 * n_dead * d * e
    in_bytes = (3 * B * d + 2 * F * d + F) * e

    def build(seed):
        g = _gen(c.device, seed)
        dead = torch.zeros(F, dtype=torch.bool, device=c.device)
        dead[torch.randperm(F, generator=g, device=c.device)[:n_dead]] = True
        return {"x": _randn((B, d), g, c.device, c.dtype), "W_enc": _randn((F, d), g, c.device, c.dtype, d ** -0.5),
                "b_enc": _randn((F,), g, c.device, c.dtype, 0.01),
                "W_dec": _randn((F, d), g, c.device, c.dtype, d ** -0.5),
                "resid": _randn((B, d), g, c.device, c.dtype, 0.3), "y": _randn((B, d), g, c.device, c.dtype),
                "dead": dead}

    decode_impls = dict(c.impls("sparse_decode"))
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        common = dict(suite="ops", op="auxk", variant=f"k_aux={k_aux},dead={n_dead}", mode=mode, shape=s.name,
                      dtype=c.dname, flops=flops[mode], bytes=byts[mode], input_bytes=in_bytes,
                      need_bytes=c.max_sets * in_bytes + 3 * B * n_dead * e,
                      priority=priority_of("auxk", "", mode, s.name))
        for impl, why in c.impls("auxk_select"):
            dec = impl if impl in decode_impls and decode_impls[impl] is None else "reference"
            note = "" if dec == impl else f"sparse_decode impl={dec}"

            def fwd(inp, impl=impl, dec=dec):
                codes = ops.auxk_select(inp["x"], inp["W_enc"], inp["b_enc"], inp["dead"], k_aux, impl=impl)
                e_hat = ops.sparse_decode(codes, inp["W_dec"], impl=dec)
                return ops.auxk_loss(e_hat, inp["resid"], inp["y"], n_dead, k_aux)
            cases.append(Case(impl=impl, skip=why, note=note, make=None if why else _modal(
                mode, build, fwd, lambda inp: [inp["W_enc"], inp["b_enc"], inp["W_dec"]]), **common))
    return cases


# -------------------------------------------------------------------------------------- molt


def molt_config(s: Shape, activation: str = "topk"):
    """The benchmarks' MOLT layer at a shape: d_in = d_out = d, T = F transforms in the default
    rank groups (at d = 768: N = F/31 of rank 512, 2N of 256, … 16N of 32), k gates open per token."""
    import fastclt
    return fastclt.MOLTConfig(n_layers=1, d_in=s.d, d_out=s.d, n_features=s.F, activation=activation, k=s.k,
                              normalization="none", sparsity_coef=1e-3)


def molt_flops(s: Shape) -> dict:
    """Counted FLOPs of a MOLT layer per mode, and "active": what the transforms and the sparse gate
    backward cost (everything but the gate GEMM). nnz = B·k gates, r̄ = R/T the mean rank of an
    active transform (TopK gates on random data open every transform alike): forward the gate GEMM
    2·B·d·T and 4·nnz·r̄·d (V_i x, then U_i h); backward 2·nnz·d (the gate vectors' sparse gradient)
    and 6·nnz·r̄·d (U_iᵀ dy, dU_i, dV_i; x is data: no dx)."""
    cfg = molt_config(s)
    nnz, r_mean = s.B * s.k, cfg.total_rank / cfg.n_features
    gate = 2.0 * s.B * s.d * s.F
    fwd_active, bwd = 4.0 * nnz * r_mean * s.d, 2.0 * nnz * s.d + 6.0 * nnz * r_mean * s.d
    return {"fwd": gate + fwd_active, "bwd": bwd, "fwd+bwd": gate + fwd_active + bwd, "gate": gate,
            "active": fwd_active + bwd}


def _molt_cases(s: Shape, c: _Ctx, priority_of) -> list[Case]:
    ops = _ops()
    cfg = molt_config(s)
    groups, R, T = cfg.rank_groups, cfg.total_rank, cfg.n_features
    B, d, k, e = s.B, s.d, s.k, c.e
    flops = molt_flops(s)
    # x, the gate vectors and every transform's factors read (a batch opens every transform); the
    # backward reads dy, x and U and writes dU, dV and the gate vectors' gradient
    byts = {"fwd": (2 * B * d + T * d + 2 * R * d) * e, "bwd": (2 * B * d + 2 * T * d + 3 * R * d) * e}
    byts["fwd+bwd"] = byts["fwd"] + byts["bwd"]
    in_bytes = (B * d + T * d + 2 * R * d) * e
    # the eager reference holds a few dense [B, R] fp32 activations, and the factors' gradients
    need = c.max_sets * in_bytes + 4 * R * d * e + 16 * B * R
    encode_impls = {impl for impl, why in c.impls("encode") if why is None}

    def build(seed):
        g = _gen(c.device, seed)
        W = torch.randn((T, d), generator=g, device=c.device, dtype=torch.float32)
        return {"x": _randn((B, d), g, c.device, c.dtype), "W": (W / W.norm(dim=1, keepdim=True)).to(c.dtype),
                "b": torch.zeros(T, device=c.device, dtype=c.dtype),
                "U": _randn((R, d), g, c.device, c.dtype, d ** -0.5),
                "V": _randn((R, d), g, c.device, c.dtype, d ** -0.5),
                "b_dec": _randn((d,), g, c.device, c.dtype, 0.01)}

    def leaves(inp):  # x is data: no gradient, as in training
        return [inp["W"], inp["b"], inp["U"], inp["V"], inp["b_dec"]]

    cases = []
    for mode in MODES:
        common = dict(suite="ops", op="molt", variant=f"topk k={k}", mode=mode, shape=s.name, dtype=c.dname,
                      flops=flops[mode], bytes=byts[mode], input_bytes=in_bytes, need_bytes=need,
                      priority=priority_of("molt", "", mode, s.name))
        for impl, why in c.impls("molt_decode"):
            enc = impl if impl in encode_impls else "auto"

            def fwd(inp, impl=impl, enc=enc):
                gates = ops.encode(inp["x"], inp["W"], inp["b"], activation="topk", k=k, impl=enc)
                return ops.molt_decode(gates, inp["x"], inp["U"], inp["V"], groups, inp["b_dec"], impl=impl)
            cases.append(Case(impl=impl, skip=why, note="" if why else f"gates: encode impl={enc}",
                              make=None if why else _modal(mode, build, fwd, leaves), **common))
        if mode == "fwd":
            cases.append(Case(impl="gate-gemm", note="F.linear(x, W_gate, b_gate): the gate GEMM alone",
                              make=_modal(mode, build, lambda inp: Fn.linear(inp["x"], inp["W"], inp["b"]),
                                          lambda inp: []),
                              **dict(common, flops=flops["gate"], bytes=(B * d + T * d + B * T) * e,
                                     priority=priority_of("molt", "gate-gemm", mode, s.name))))
    return cases


# ------------------------------------------------------------------------------------ entry


def shape_ops(shape: Shape) -> tuple:
    """The ops a shape runs by default: its own ``ops``, else those of its model families (the
    dictionary ops for "sae" / "clt", "molt" for "molt")."""
    if shape.ops is not None:
        return tuple(shape.ops)
    out = DICTIONARY_OPS if {"sae", "clt"} & set(shape.models) else ()
    return out + (("molt",) if "molt" in shape.models else ())


def ops_cases(shape: Shape, device: torch.device, dtype: torch.dtype, *, ops: Optional[tuple] = None,
              priority_of: Callable[..., int] = lambda *a: 1) -> list[Case]:
    """Every op case of one shape. ``ops`` restricts to a few op names (default: ``shape_ops``);
    ``priority_of(op, variant, mode, shape)`` orders the run."""
    c = _Ctx(device, dtype)
    wanted = set(ops or shape_ops(shape))
    if "molt" not in shape.models:  # a MOLT op needs a MOLT shape, a dictionary op a dictionary shape
        wanted.discard("molt")
    if not {"sae", "clt"} & set(shape.models):
        wanted &= {"molt"}
    cases: list[Case] = []
    if "encode" in wanted:
        cases += _encode_cases(shape, c, priority_of)
    if wanted & {"topk", "batch_topk", "batch_topk_layers"}:
        cases += [x for x in _select_cases(shape, c, priority_of) if x.op in wanted]
    if "sparse_decode" in wanted:
        cases += _decode_cases(shape, c, priority_of)
    if "clt_decode" in wanted and shape.L > 1:
        cases += _clt_decode_cases(shape, c, priority_of)
    if "auxk" in wanted:
        cases += _auxk_cases(shape, c, priority_of)
    if "molt" in wanted:
        cases += _molt_cases(shape, c, priority_of)
    return cases
