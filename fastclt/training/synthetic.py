"""Synthetic activations with planted features: a CLT-shaped generative model.

Source layer s has ``n_true`` features. Feature (s, i) is active on a token with probability
p = true_l0 / n_true, with magnitude m ~ Uniform(0.5, 1.5); it writes ``m · e_{s,i}`` to the input
x_s and ``m · u_{s,i,t}`` to the target y_t of every layer t ≥ s:

    x_s = Σ_i m_{s,i} e_{s,i} + noise            e_{s,i}: unit [d_in]
    y_t = Σ_{s≤t} Σ_i m_{s,i} u_{s,i,t} + noise   u_{s,i}: [L − s, d_out], unit over all its targets

so an untied CLT with a feature per planted one reconstructs y exactly. ``true_decoder(s)`` gives
the planted u_{s,·} ([n_true, L − s, d_out]) and ``mmcs(model)`` the mean over planted features of
the best cosine similarity with a learned decoder direction ``model.decoder_weight(s)`` (for an
SAE — kind "sae" — x = y on one layer and the planted directions are e).

Batch ``i`` of data-parallel rank ``r`` is a pure function of (seed, r, i): resuming needs only
the batch counter, and every tensor-parallel rank of one dp group draws the same batch. Small
batches are drawn C at a time (C = ``chunk_batches(B)``, up to 8 while a chunk stays under ~2M
values): batch i is rows (i mod C)·B … of chunk ⌊i / C⌋, a pure function of (seed, r, ⌊i / C⌋, C),
and the chunk of the last call is kept, so the draw's fixed cost is paid once per C batches.

The noise is ``philox_normal``: counter-based Gaussian draws (Philox4x32-10 and Box-Muller), each a
function of (seed, stream, its index) only. With the C++ extension built they come from
``fastclt::normal_philox_`` (both cores, several times faster than ``Tensor.normal_``, whose
Mersenne twister steps once per value and dominated the demo's data cost); without it the same
uniforms go through PyTorch's log, sin and cos, so the two agree to float rounding (≤ ~1e-6 of the
std), not to the bit. The sums x = a E and y = a U run as sparse decodes of the activities (about 5%
of them are non-zero), not as dense GEMMs.
"""
from __future__ import annotations

import math

import torch

from fastclt import ops
from fastclt.codes import SparseCodes

__all__ = ["SyntheticActivations", "mmcs", "philox_normal"]


class SyntheticActivations:
    def __init__(self, n_layers: int, d_in: int, d_out: int, n_true: int, true_l0: float, noise: float,
                 seed: int = 0, kind: str = "clt") -> None:
        self.L, self.d_in, self.d_out, self.n_true = n_layers, d_in, d_out, n_true
        self.p = min(1.0, true_l0 / n_true)
        self.noise, self.seed, self.kind = noise, seed, kind
        g = torch.Generator().manual_seed(10_000_019 * seed + 17)
        E = torch.randn(n_layers, n_true, d_in, generator=g)
        self.E = E / E.norm(dim=-1, keepdim=True)
        self.U = []
        for s in range(n_layers):
            U = torch.randn(n_true, n_layers - s, d_out, generator=g)
            self.U.append(U / U.flatten(1).norm(dim=1)[:, None, None])
        # every source's decoder as one [L·n_true, L·d_out] matrix (zero blocks for t < s): y in one GEMM
        U_all = torch.zeros(n_layers, n_true, n_layers, d_out)
        E_all = torch.zeros(n_layers, n_true, n_layers, d_in)
        for s in range(n_layers):
            U_all[s, :, s:] = self.U[s]
            E_all[s, :, s] = self.E[s]
        self._U_all = U_all.reshape(n_layers * n_true, n_layers * d_out)
        self._E_all = E_all.reshape(n_layers * n_true, n_layers * d_in)  # x_s = a_s E_s in one decode
        self._cached = None  # (key, x, y) of the last chunk of small batches

    CHUNK_VALUES = 1 << 21  # values drawn per chunk of small batches (activities, x and y), at most
    MAX_CHUNK = 8

    def chunk_batches(self, batch_size: int) -> int:
        """C: the batches of ``batch_size`` rows drawn together (1 for large batches)."""
        per_batch = max(1, batch_size * self.L * (self.n_true + self.d_in + self.d_out))
        return max(1, min(self.MAX_CHUNK, self.CHUNK_VALUES // per_batch))

    def batch(self, index: int, batch_size: int, dp_rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (x [B, L, d_in], y [B, L, d_out]) fp32 on the CPU (y is x for kind "sae")."""
        C = self.chunk_batches(batch_size)
        if C == 1:
            return self._draw(index, batch_size, dp_rank, 1)
        chunk, j = divmod(index, C)
        key = (chunk, batch_size, dp_rank)
        cached = self._cached  # one tuple, replaced whole: a reader in another thread sees one or the other
        if cached is None or cached[0] != key:
            cached = (key, *self._draw(chunk, batch_size * C, dp_rank, C))
            self._cached = cached
        rows = slice(j * batch_size, (j + 1) * batch_size)
        x = cached[1][rows]
        return (x, x) if self.kind == "sae" else (x, cached[2][rows])

    def _draw(self, index: int, n_rows: int, dp_rank: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n_rows`` rows from the generator of (seed, rank, index, chunk size)."""
        mix = (self.seed * 1_000_003 + dp_rank) * 1_000_000_007 + index
        if chunk > 1:
            mix = mix * 31 + chunk
        seed = mix % (2 ** 62)
        g = torch.Generator().manual_seed(seed)
        B, L, T = n_rows, self.L, self.n_true
        where = self._active(B * L * T, g)  # flat positions in [B, L·n_true], increasing
        width = L * T
        row_ptr = torch.searchsorted(where, torch.arange(B + 1) * width)
        a = SparseCodes(row_ptr, (where % width).to(torch.int32), 0.5 + torch.rand(where.numel(), generator=g), width)
        with torch.no_grad():
            x = ops.sparse_decode(a, self._E_all).view(B, L, self.d_in)
            if self.noise > 0:
                x += philox_normal(x.numel(), seed, 0, self.noise).view_as(x)
            if self.kind == "sae":
                return x, x
            y = ops.sparse_decode(a, self._U_all).view(B, L, self.d_out)  # Σ_{s≤t} a_s U_s[:, t−s]
            if self.noise > 0:
                y += philox_normal(y.numel(), seed, 1, self.noise).view_as(y)
        return x, y

    def _active(self, n: int, g: torch.Generator) -> torch.Tensor:
        """The active positions among n independent Bernoulli(p) trials, increasing (int64).

        The gaps between successive successes are i.i.d. Geometric(p): G = ⌊log U / log(1 − p)⌋
        failures before each success, U ~ Uniform(0, 1]. Drawing about n·p gaps (not n uniforms)
        is what makes a batch cheap at the demo's p = 3/64; drawn in float64, so that the gap
        distribution is exact to far below any sampling error."""
        if self.p >= 1.0:
            return torch.arange(n)
        log_q = torch.log1p(torch.tensor(-self.p, dtype=torch.float64))
        parts, end = [], -1  # end: the last position drawn so far
        while end < n:
            mean = (n - end) * self.p
            u = 1.0 - torch.rand(int(mean + 6.0 * mean ** 0.5) + 16, generator=g, dtype=torch.float64)
            pos = end + torch.cumsum(torch.floor(torch.log(u) / log_q).long() + 1, 0)
            parts.append(pos)
            end = int(pos[-1])
        pos = torch.cat(parts) if len(parts) > 1 else parts[0]
        return pos[:int(torch.searchsorted(pos, n))]

    def true_decoder(self, s: int) -> torch.Tensor:
        """[n_true, L − s, d_out] planted decoder directions of source s (SAE: [n_true, 1, d_in])."""
        if self.kind == "sae":
            return self.E[s].unsqueeze(1)
        return self.U[s]


_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
_WORD = 0xFFFFFFFF


def _philox4x32(c: list, key: tuple, rounds: int = 10) -> list:
    """Philox4x32 of the counter words ``c`` (four int64 tensors of values < 2³²) under ``key`` (two
    ints < 2³²) → the four output words (int64 tensors)."""
    k0, k1 = key
    for _ in range(rounds):  # int64 products wrap; their low 64 bits are the exact 32 × 32-bit product
        p0, p1 = c[0] * _PHILOX_MUL[0], c[2] * _PHILOX_MUL[1]
        c = [((p1 >> 32) & _WORD) ^ c[1] ^ k0, p1 & _WORD, ((p0 >> 32) & _WORD) ^ c[3] ^ k1, p0 & _WORD]
        k0, k1 = (k0 + _PHILOX_WEYL[0]) & _WORD, (k1 + _PHILOX_WEYL[1]) & _WORD
    return c


def philox_normal(n: int, seed: int, stream: int, std: float) -> torch.Tensor:
    """n draws of N(0, std²), fp32 on the CPU, value i a function of (seed, stream, i) only.

    Block j of four values is Philox4x32-10 of the counter (j mod 2³², ⌊j / 2³²⌋, stream, 0) under
    the key (seed mod 2³², ⌊seed / 2³²⌋ mod 2³²); its words w give uniforms u = (2⌊w / 2⁹⌋ + 1) 2⁻²⁴
    in (0, 1), and each pair (u₁, u₂) two values by Box-Muller: r cos θ, r sin θ with
    r = std·√(−2 ln u₁), θ = 2π (u₂ − ½). On the C++ extension, ``fastclt::normal_philox_``; else
    these ops (the same uniforms; the two agree to float rounding)."""
    if n < 0 or not 0 <= stream < 2 ** 32 or std < 0:
        raise ValueError(f"philox_normal: expected n >= 0, stream in [0, 2^32), std >= 0; got n={n}, "
                         f"stream={stream}, std={std}")
    from fastclt import _ext

    if _ext.has_cpu_ext():
        out = torch.empty(n)
        torch.ops.fastclt.normal_philox_(out, seed, stream, std)
        return out
    j = torch.arange((n + 3) // 4, dtype=torch.int64)
    c = _philox4x32([j & _WORD, j >> 32, torch.full_like(j, stream), torch.zeros_like(j)],
                    (seed & _WORD, (seed >> 32) & _WORD))
    u = [((w >> 9).float() * 2 + 1) * 2.0 ** -24 for w in c]
    out = []
    for u1, u2 in ((u[0], u[1]), (u[2], u[3])):
        r, theta = std * torch.sqrt(-2 * torch.log(u1)), 2 * math.pi * (u2 - 0.5)
        out += [r * torch.cos(theta), r * torch.sin(theta)]
    return torch.stack(out, 1).reshape(-1)[:n]


@torch.no_grad()
def mmcs(model, source: SyntheticActivations) -> tuple[float, list]:
    """Mean over planted features of max cosine similarity with the learned decoder rows →
    (mean over all layers, per-layer list). The model must be the full (merged) one. A per-layer
    transcoder set (decoders [F, 1, d_out]) is compared on the planted directions into its own layer."""
    per_layer = []
    n_layers = 1 if source.kind == "sae" else source.L
    for s in range(n_layers):
        learned = model.decoder_weight(s).detach()
        true = source.true_decoder(s)[:, :learned.shape[1]].flatten(1).double()
        learned = learned.flatten(1).double().cpu()
        true = true / true.norm(dim=1, keepdim=True).clamp_min(1e-12)
        learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
        per_layer.append(float((true @ learned.T).max(1).values.mean()))
    return sum(per_layer) / len(per_layer), per_layer
