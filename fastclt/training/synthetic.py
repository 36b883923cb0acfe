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
"""
from __future__ import annotations

import torch

__all__ = ["SyntheticActivations", "mmcs"]


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
        for s in range(n_layers):
            U_all[s, :, s:] = self.U[s]
        self._U_all = U_all.reshape(n_layers * n_true, n_layers * d_out)
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
        g = torch.Generator().manual_seed(mix % (2 ** 62))
        B, L = n_rows, self.L
        a = torch.zeros(B * L * self.n_true)
        where = self._active(a.numel(), g)
        a[where] = 0.5 + torch.rand(where.numel(), generator=g)
        a = a.view(B, L, self.n_true)
        # the noise drawn with its scale (no separate multiply), and added by the GEMM of y (beta = 1)
        x = torch.bmm(a.transpose(0, 1), self.E).transpose(0, 1) + \
            torch.empty(B, L, self.d_in).normal_(0.0, self.noise, generator=g)
        if self.kind == "sae":
            return x, x
        y = torch.empty(B, L * self.d_out).normal_(0.0, self.noise, generator=g)
        y = torch.addmm(y, a.reshape(B, L * self.n_true), self._U_all).view(B, L, self.d_out)  # Σ_{s≤t} a_s U_s[:, t−s]
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
