"""Density sweep (docs/DESIGN.md §17): each op that has a dense formulation, and whole training
steps, at code densities from 0.1% to 50%, in three modes (train steps: four):

    sparse     FASTCLT's crossover set to "never": the sparse kernels at every density
    dense      the crossover set to "always": the dense formulation (GEMMs) at every density; train
               steps hold their codes dense (``DenseCodes``) from the second step on
    adaptive   the default crossover table (fastclt/ops/density.py): what a user gets
    csr        (train steps) the default table for the ops, codes kept CSR: against "dense", this
               calibrates the crossover of "codes"

    sparse_decode     fwd+bwd, an SAE's decode, codes at density ρ over [B, F], W_dec [F, d]
    clt_decode        fwd+bwd, untied, L layers
    encode_backward   the JumpReLU encoder's backward alone (replayed; the forward GEMM is not timed)
    train_step        clt-none-jumprelu and sae-jumprelu: loss, backward, fused Adam, θ set for ρ

Rows: suite "density", variant "rho=<ρ>" (train steps: "<model> rho=<ρ>"), impl = the mode. At the
issue's densest point the CLT step also runs crosslayer-coding's (the ``clt`` package, when it
imports: its own JumpReLU CLT, LossManager and trainer step on the same weights, θ and data), and
``peer_comparison`` times fastclt's step against it in alternation (ABAB…, so that a machine shared
with other work slows both alike) and measures each one's peak resident memory in a fresh process.

``calibrate(rows)`` turns the sparse and dense rows into the crossover of each op (the density at
which the dense time falls below the sparse one, interpolated on log ρ; "codes": the CLT step's
dense rows against its csr rows): ``--suite density
--calibrate`` prints them and writes ``crossover.json`` beside the results. ``write_density_plots``
draws time against ρ per op and mode (``density_<shape>.png``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks.bench_train_step import _adam, _build_fastclt, _calibrate_threshold
from benchmarks.harness import Case, Timing
from benchmarks.shapes import Shape

__all__ = ["DENSITIES", "MODES", "density_cases", "calibrate", "write_density_plots", "peer_available",
           "peer_comparison", "PEER", "PEER_RHO"]

DENSITIES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5)
QUICK_DENSITIES = (0.003, 0.03, 0.1, 0.3, 0.5)  # --quick (the GPU check)
MODES = {"sparse": "never", "dense": "always", "adaptive": None, "csr": {"codes": "never"}}
OP_MODES = ("sparse", "dense", "adaptive")  # the modes of the single-op cases (no codes to hold)
# op → (the sweep's op, its variant prefix, the two modes whose crossing is the op's crossover)
CALIBRATED_OPS = {"sparse_decode": ("sparse_decode", "", "sparse", "dense"),
                  "clt_decode": ("clt_decode", "", "sparse", "dense"),
                  "encode_backward": ("encode_backward", "", "sparse", "dense"),
                  "codes": ("train_step", "clt-none", "csr", "dense")}
PEER = "crosslayer-coding"
PEER_RHO = 0.48  # the JumpReLU start: unit-norm encoder rows, b_enc = 0, θ = 0.05


@contextlib.contextmanager
def _mode(mode: str):
    from fastclt.ops import density
    value = MODES[mode]
    if value is None:
        yield
    else:
        with density.crossover(value):
            yield


def _rho_name(rho: float) -> str:
    return f"rho={rho:g}"


def _codes_at(B: int, F: int, rho: float, device, dtype, g: torch.Generator):
    from fastclt.codes import SparseCodes
    mask = torch.rand(B, F, generator=g, device=device) < rho
    if not bool(mask.any()):
        mask[0, 0] = True
    value = (torch.rand(B, F, generator=g, device=device) + 0.1).to(dtype)
    codes = SparseCodes.from_mask(value, mask)
    return codes.with_value(codes.value.detach().requires_grad_())


def _decode_case(op: str, s: Shape, rho: float, mode: str, device, dtype) -> Case:
    L = s.L if op == "clt_decode" else 1

    def make(seed: int):
        import fastclt.ops as ops
        g = torch.Generator(device=device).manual_seed(seed)
        codes = [_codes_at(s.B, s.F, rho, device, dtype, g) for _ in range(L)]
        if op == "clt_decode":
            W = [(torch.randn(s.F, L - l, s.d, generator=g, device=device) * 0.02).to(dtype).requires_grad_()
                 for l in range(L)]
        else:
            W = (torch.randn(s.F, s.d, generator=g, device=device) * 0.02).to(dtype).requires_grad_()
        gy = torch.randn(s.B, L, s.d, generator=g, device=device).to(dtype)

        def run():
            with _mode(mode):
                if op == "clt_decode":
                    y = ops.clt_decode(codes, W, "none")
                else:
                    y = ops.sparse_decode(codes[0], W)
                    y = y.unsqueeze(1)
                y.backward(gy)
            for c in codes:
                c.value.grad = None
            for w in (W if isinstance(W, list) else [W]):
                w.grad = None
        return run
    e = torch.finfo(dtype).bits // 8
    G = L * (L + 1) // 2 if op == "clt_decode" else 1
    nnz = rho * s.B * s.F
    return Case(suite="density", op=op, variant=_rho_name(rho), mode="fwd+bwd", shape=s.name, impl=mode,
                make=make, dtype=str(dtype).replace("torch.", ""), flops=6.0 * G * nnz * s.d,
                bytes=3.0 * G * nnz * s.d * e, need_bytes=(6 * L * s.B * s.F + 4 * G * s.F * s.d) * e, rotate=False)


def _encode_backward_case(s: Shape, rho: float, mode: str, device, dtype) -> Case:
    def make(seed: int):
        import fastclt.ops as ops
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(s.B, s.d, generator=g, device=device).to(dtype).requires_grad_()
        W = torch.randn(s.F, s.d, generator=g, device=device)
        W = (W / W.norm(dim=1, keepdim=True)).to(dtype).requires_grad_()
        b = torch.zeros(s.F, device=device, dtype=dtype, requires_grad=True)
        with torch.no_grad():
            h = (x[:256].float() @ W.float().T).flatten()
            keep = max(1, int(h.numel() * rho))
            theta = torch.full((s.F,), float(h.topk(keep).values.min()), device=device, dtype=dtype)
        theta.requires_grad_()
        codes = ops.encode(x, W, b, activation="jumprelu", threshold=theta, bandwidth=0.01)
        up = torch.randn(codes.nnz, generator=g, device=device).to(codes.value.dtype)

        def run():
            with _mode(mode):
                codes.value.backward(up, retain_graph=True)
            for t in (x, W, b, theta):
                t.grad = None
        return run
    e = torch.finfo(dtype).bits // 8
    nnz = rho * s.B * s.F
    return Case(suite="density", op="encode_backward", variant=_rho_name(rho), mode="bwd", shape=s.name, impl=mode,
                make=make, dtype=str(dtype).replace("torch.", ""), flops=4.0 * nnz * s.d,
                bytes=(2 * s.B * s.d + 2 * s.F * s.d) * e + nnz * (e + 4), need_bytes=6 * s.B * s.F * e,
                rotate=False)


def _train_case(family: str, s: Shape, rho: float, mode: str, device) -> Case:
    def make(seed: int):
        model, x, y, _ = _build_fastclt(family, "jumprelu", "none" if family == "clt" else "", s, device, seed)
        _set_rho(model, x, rho)
        opt = _adam(model.parameters())

        def step():
            opt.zero_grad(set_to_none=True)
            with _mode(mode):
                out = model.loss(x, y)
                out.loss.backward()
            opt.step()
        return step
    L = s.L if family == "clt" else 1
    variant = f"{'clt-none' if family == 'clt' else 'sae'}-jumprelu {_rho_name(rho)}"
    P = L * s.F * s.d + s.F * s.d * (L * (L + 1) // 2 if family == "clt" else 1)
    return Case(suite="density", op="train_step", variant=variant, mode="fwd+bwd+adam", shape=s.name, impl=mode,
                make=make, dtype="fp32", bytes=28.0 * P, need_bytes=16 * P + 24 * s.B * s.F * L, rotate=False)


def _set_rho(model, x: torch.Tensor, rho: float) -> None:
    """JumpReLU θ per layer so that a fraction ρ of the entries fire on (the first 256 rows of) x;
    the issue's regime (θ = 0.05 with b_enc = 0 and unit-norm rows) at PEER_RHO."""
    if abs(rho - PEER_RHO) < 1e-9:
        with torch.no_grad():
            model.threshold.fill_(0.05)
        return
    _calibrate_threshold(model, x, rho * model.cfg.n_features, model.cfg.n_features)


# ---------------------------------------------------------------------------- crosslayer-coding
def peer_available() -> Optional[str]:
    """None when crosslayer-coding's ``clt`` package imports, else why not (it is not on PyPI:
    install it from its repository, e.g. ``pip install --no-deps <checkout>``)."""
    try:
        from clt.config import CLTConfig, TrainingConfig  # noqa: F401
        from clt.models.clt import CrossLayerTranscoder  # noqa: F401
        from clt.training.losses import LossManager  # noqa: F401
    except Exception as e:
        return f"crosslayer-coding (clt) not importable ({type(e).__name__}: {str(e)[:80]})"
    return None


def _build_peer(s: Shape, device, seed: int, rho: float):
    """crosslayer-coding's untied JumpReLU CLT with fastclt's weights, θ and data, and its trainer
    step (``get_feature_activations`` then ``LossManager.compute_total_loss`` with them precomputed,
    backward, the same fused Adam); MSE + tanh sparsity on both sides, no pre-activation loss."""
    from clt.config import CLTConfig, TrainingConfig
    from clt.models.clt import CrossLayerTranscoder
    from clt.training.losses import LossManager
    ours, x, y, _ = _build_fastclt("clt", "jumprelu", "none", s, device, seed)
    _set_rho(ours, x, rho)
    L = s.L
    pcfg = CLTConfig(num_features=s.F, num_layers=L, d_model=s.d, activation_fn="jumprelu",
                     jumprelu_threshold=0.05, decoder_tying="none", clt_dtype="float32")
    peer = CrossLayerTranscoder(pcfg, process_group=None, device=device)
    sd = peer.state_dict()
    with torch.no_grad():
        for l in range(L):
            sd[f"encoder_module.encoders.{l}.weight"].copy_(ours.W_enc[l])
            sd[f"encoder_module.encoders.{l}.bias_param"].copy_(ours.b_enc[l])
            for t in range(l, L):
                sd[f"decoder_module.decoders.{l}->{t}.weight"].copy_(ours.W_dec[l][:, t - l, :].T)
                sd[f"decoder_module.decoders.{l}->{t}.bias_param"].zero_()
        sd["theta_manager.log_threshold"].copy_(ours.threshold.detach().log())
    tcfg = TrainingConfig(learning_rate=1e-4, training_steps=1000, normalization_method="none",
                          sparsity_lambda=ours.cfg.sparsity_coef, sparsity_c=ours.cfg.sparsity_c,
                          preactivation_coef=0.0, activation_path="unused: activations are passed in")
    lm = LossManager(tcfg, clt_config=pcfg)
    opt = _adam(peer.parameters())
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


def _build_ours(s: Shape, device, seed: int, rho: float, mode: str = "adaptive"):
    return _train_case("clt", s, rho, mode, device).make(seed)


def _peak_rss_child(which: str, shape: str, rho: float, steps: int) -> None:
    """Run in a fresh process: build, then ``steps`` training steps; print the peak resident
    memory gained over what was resident after building (MiB)."""
    from benchmarks.shapes import SHAPES
    s = SHAPES[shape]
    device = torch.device("cpu")
    step = _build_peer(s, device, 0, rho) if which == PEER else _build_ours(s, device, 0, rho, which)
    base = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    for _ in range(steps):
        step()
    print(json.dumps({"peak_extra_mib": _status_mib("VmHWM") - base, "base_mib": base}))


def _status_mib(key: str) -> float:
    """A memory line of /proc/self/status (VmRSS: resident now, VmHWM: its peak) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key} line")


def _peak_rss(which: str, shape: str, rho: float, steps: int = 3) -> Optional[dict]:
    """Peak extra resident memory of ``which`` ("adaptive" / "sparse" / "dense" fastclt, or PEER) in a
    fresh process on the CPU; None when it could not be measured."""
    code = (f"from benchmarks.bench_density import _peak_rss_child; "
            f"_peak_rss_child({which!r}, {shape!r}, {rho!r}, {steps})")
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo)] + [p for p in sys.path if p]))
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=900)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def peer_comparison(s: Shape, device, runner, rounds: int = 7, rho: float = PEER_RHO,
                    log: Callable[[str], None] = print) -> list[dict]:
    """fastclt's CLT step (adaptive, and sparse for reference) and crosslayer-coding's on the same
    weights, data and θ, timed in alternation: after a warm-up of each, ``rounds`` rounds of one
    step of each, the order rotating per round. Rows (suite "density", op "train_step", mode
    "alternating") with the median and p20/p80 of each; on the CPU peak_extra_mb is the peak resident
    memory a fresh process gains over 3 steps (GPU: torch.cuda.max_memory_allocated during one step)."""
    why = peer_available()
    names = ["adaptive", "sparse", PEER]
    variant = f"clt-none-jumprelu {_rho_name(rho)}"
    cases = {n: Case(suite="density", op="train_step", variant=variant, mode="alternating", shape=s.name, impl=n,
                     make=None, dtype="fp32", note="ABAB… alternation, same weights/θ/data" if n == PEER else "")
             for n in names}
    if why:
        names = names[:2]
    steps = {}
    for n in names:
        steps[n] = _build_peer(s, device, 0, rho) if n == PEER else _build_ours(s, device, 0, rho, n)
        for _ in range(2):
            steps[n]()
    times: dict = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            steps[n]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[n].append((time.perf_counter() - t) * 1e3)
    rows = []
    for n in names:
        ts = sorted(times[n])
        timing = Timing(statistics.median(ts), ts[max(0, int(0.2 * (len(ts) - 1)))], ts[int(0.8 * (len(ts) - 1))],
                        len(ts))
        mem = (None, None)
        if device.type == "cpu":
            m = _peak_rss(n, s.name, rho)
            if m is not None:
                mem = (m["peak_extra_mib"], m["base_mib"])
        note = cases[n].note + ("; " if cases[n].note else "") + ("peak RSS gained over 3 steps, fresh process"
                                                                   if device.type == "cpu" else "")
        cases[n].note = note
        rows.append(runner.row(cases[n], "ok", timing=timing, mem=mem))
        log(f"[bench] density {s.name} {variant} {n} (alternating): {timing.median_ms:.4g} ms, "
            f"peak {mem[0] if mem[0] is None else round(mem[0])} MiB")
        del steps[n]
    if why:
        rows.append(runner.row(cases[PEER], "skipped", why))
    return rows


# --------------------------------------------------------------------------------- cases
def density_cases(s: Shape, device: torch.device, dtype: torch.dtype, *, quick: bool = False,
                  priority_of: Callable[..., int] = lambda *a: 1) -> list[Case]:
    """Every (op, density, mode) case of the sweep at shape ``s`` (``quick``: QUICK_DENSITIES; at
    ``tiny``, CI's shape: the lowest and highest density only)."""
    densities = QUICK_DENSITIES if quick else DENSITIES
    if s.name == "tiny":
        densities = (densities[0], densities[-1])
    cases = []
    for rho in densities:
        for mode in MODES:
            if mode in OP_MODES:
                for op in ("sparse_decode", "clt_decode"):
                    if op == "clt_decode" and s.L < 2:
                        continue
                    cases.append(_decode_case(op, s, rho, mode, device, dtype))
                cases.append(_encode_backward_case(s, rho, mode, device, dtype))
            for family in ("clt",) if s.name == "tiny" else ("clt", "sae"):
                cases.append(_train_case(family, s, rho, mode, device))
    for c in cases:
        c.priority = priority_of(c.op, c.variant, c.mode, c.shape)
    return cases


# --------------------------------------------------------------------------- analysis
def _rho_of(variant: str) -> Optional[float]:
    for part in variant.split():
        if part.startswith("rho="):
            return float(part[4:])
    return None


def _series(rows: list[dict], shape: str, op: str, variant_prefix: str = "") -> dict:
    """{mode: {ρ: median ms}} of the sweep rows of one op (train steps: one model)."""
    out: dict = {}
    for r in rows:
        if (r["suite"] != "density" or r["shape"] != shape or r["op"] != op or r["status"] != "ok"
                or not r.get("median_ms") or r["mode"] == "alternating"):
            continue
        if variant_prefix and not r["variant"].startswith(variant_prefix):
            continue
        rho = _rho_of(r["variant"])
        if rho is not None and r["impl"] in MODES:
            out.setdefault(r["impl"], {})[rho] = r["median_ms"]
    return out


def calibrate(rows: list[dict], shape: str) -> dict:
    """{op: crossover density} from the sparse and dense rows of ``shape`` ("codes": the CLT step's
    csr and dense rows): the first ρ at which dense ≤ sparse, interpolated on log ρ between the sweep
    points around it (the time ratio's log crossing 0); inf when dense never wins, the smallest ρ
    when it always does."""
    out = {}
    for op, (swept, prefix, lo, hi) in CALIBRATED_OPS.items():
        ser = _series(rows, shape, swept, prefix)
        sp, de = ser.get(lo, {}), ser.get(hi, {})
        rhos = sorted(set(sp) & set(de))
        if not rhos:
            continue
        ratio = [(r, math.log(de[r] / sp[r])) for r in rhos]
        cross = math.inf
        for i, (r, lr) in enumerate(ratio):
            if lr <= 0:
                if i == 0:
                    cross = r
                else:
                    r0, l0 = ratio[i - 1]
                    f = l0 / (l0 - lr)
                    cross = math.exp(math.log(r0) + f * (math.log(r) - math.log(r0)))
                break
        out[op] = cross
    return out


def adaptive_gaps(rows: list[dict], shape: str) -> list[tuple]:
    """(op, ρ, adaptive / min(sparse, dense)) for every op and density of the sweep."""
    out = []
    for op, prefix in (("sparse_decode", ""), ("clt_decode", ""), ("encode_backward", ""),
                       ("train_step", "clt-none"), ("train_step", "sae")):
        ser = _series(rows, shape, op, prefix)
        name = f"{op} {prefix}".strip()
        for rho, a in sorted(ser.get("adaptive", {}).items()):
            best = min(v for v in (ser.get("sparse", {}).get(rho), ser.get("dense", {}).get(rho)) if v is not None)
            out.append((name, rho, a / best))
    return out


def write_density_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """density_<shape>.png: median time against ρ (log-log), one panel per op, one line per mode (the
    train steps' ``csr`` line: CSR codes into the adaptive ops)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for shape in sorted({r["shape"] for r in rows if r["suite"] == "density"}):
        panels = [("sparse_decode", ""), ("clt_decode", ""), ("encode_backward", ""), ("train_step", "clt-none"),
                  ("train_step", "sae")]
        panels = [(op, p) for op, p in panels if _series(rows, shape, op, p)]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
        for ax, (op, prefix) in zip(axes[0], panels):
            ser = _series(rows, shape, op, prefix)
            for mode, style in (("sparse", "o-"), ("dense", "s-"), ("adaptive", "^--"), ("csr", "d:")):
                pts = sorted(ser.get(mode, {}).items())
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=mode)
            peer = [r for r in rows if r["suite"] == "density" and r["shape"] == shape and r["op"] == op
                    and r["impl"] == PEER and r["status"] == "ok" and op == "train_step" and prefix == "clt-none"]
            for r in peer:
                ax.plot([_rho_of(r["variant"])], [r["median_ms"]], "kx", markersize=9, label=PEER)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("density ρ = nnz / (B·F)")
            ax.set_ylabel("median ms")
            ax.set_title(f"{op} {prefix}".strip(), fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle(f"density sweep, {shape}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"density_{shape}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_crossovers(rows: list[dict], out_dir: Path, device: str, dtype: str) -> Optional[Path]:
    shapes = sorted({r["shape"] for r in rows if r["suite"] == "density"})
    found = {s: calibrate(rows, s) for s in shapes}
    found = {s: c for s, c in found.items() if c}
    if not found:
        return None
    path = out_dir / "crossover.json"
    found = {s: {op: ("never" if math.isinf(v) else round(v, 4)) for op, v in c.items()} for s, c in found.items()}
    path.write_text(json.dumps({"device": device, "dtype": dtype, "crossover": found}, indent=1))
    return path
