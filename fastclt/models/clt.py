"""Cross-layer transcoder (docs/DESIGN.md §2, §10); ``n_layers=1`` is a per-layer transcoder (PLT).

    a_s = act(W_enc[s] x_s + b_enc[s])                      x: [B, L, d_in] → L sparse codes over F
    ŷ_t = Σ_{s ≤ t} D^{s→t}(a_s) + b_dec[t] (+ W_skip[t] x_t)  → [B, L, d_out]

A per-layer transcoder set (``cross_layer=False``): L independent transcoders in one module,
``ŷ_l = W_dec[l]ᵀ a_l + b_dec[l] (+ W_skip[l] x_l)`` — the same encoder and sparse-decode kernels,
every source writing only its own layer.

Parameters (all readable attributes):
    W_enc [L, F, d_in], b_enc [L, F], b_dec [L, d_out], threshold [L, F] (JumpReLU),
    W_dec: "none" → ParameterList of L tensors [F, L − s, d_out]; "per_source" / "per_target" → [L, F, d_out];
        cross_layer=False → one [L, F, d_out] (row i of W_dec[l]: feature (l, i)'s decoder into layer l),
    feature_offset / feature_scale [L, F] (feature_affine), W_skip [L, d_out, d_in] (skip_connection).
``decoder_weight(s)`` is the expanded [F, L − s, d_out] view for any tying, and [F, 1, d_out]
(the only target, layer s) for a per-layer transcoder set.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fastclt import ops
from fastclt.codes import SparseCodes
from fastclt.config import CLTConfig
from fastclt.models.base import SparseDictionary

__all__ = ["CrossLayerTranscoder"]


class CrossLayerTranscoder(SparseDictionary):
    config_class = CLTConfig

    def __init__(self, cfg: CLTConfig) -> None:
        if not isinstance(cfg, CLTConfig):
            raise TypeError(f"cfg: expected a CLTConfig, got {type(cfg).__name__}")
        self.n_layers, self.d_in, self.d_out = cfg.n_layers, cfg.d_in, cfg.d_out
        super().__init__(cfg)
        L, F, d_in, d_out = cfg.n_layers, cfg.n_features, cfg.d_in, cfg.d_out
        dt = self.param_dtype
        self.W_enc = nn.Parameter(torch.empty(L, F, d_in, dtype=dt))
        self.b_enc = nn.Parameter(torch.zeros(L, F, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(L, d_out, dtype=dt))
        if self._per_pair_decoders():
            self.W_dec = nn.ParameterList([nn.Parameter(torch.empty(F, L - s, d_out, dtype=dt)) for s in range(L)])
        else:
            self.W_dec = nn.Parameter(torch.empty(L, F, d_out, dtype=dt))
        if cfg.feature_affine:
            self.feature_offset = nn.Parameter(torch.zeros(L, F, dtype=dt))
            scale = torch.full((L, F), 0.1, dtype=dt)
            scale[0] = 1.0
            self.feature_scale = nn.Parameter(scale)
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(L, d_out, d_in, dtype=dt))
        self._make_threshold((L, F))
        self.reset_parameters()

    def _per_pair_decoders(self) -> bool:
        """Untied cross-layer decoders: one [F, L − s, d_out] block per source."""
        return self.cfg.decoder_tying == "none" and self.cfg.cross_layer

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """docs/DESIGN.md §5: encoder rows random unit directions (pre-activations O(1) on data with
        E‖x‖ = √d); decoders small, uniform ±1/√(L·F) (±1/√F for a per-layer set, as L
        separate transcoders); biases zero."""
        cfg = self.cfg
        W = torch.randn(self.W_enc.shape, dtype=torch.float32)
        self.W_enc.copy_(W / W.norm(dim=-1, keepdim=True))
        bound = 1.0 / math.sqrt((cfg.n_layers if cfg.cross_layer else 1) * cfg.n_features)
        for W_dec in self._decoder_params():
            W_dec.uniform_(-bound, bound)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def _decoder_params(self) -> list:
        return list(self.W_dec) if self._per_pair_decoders() else [self.W_dec]

    # ------------------------------------------------------------ structure
    def _enc_layers(self):
        return self.W_enc, self.b_enc, self._threshold_layers()

    def _pre_bias(self):
        return None

    def decoder_weight(self, s: int) -> torch.Tensor:
        """[F, L − s, d_out]: the decoder rows of source s for targets s..L−1 (a view; for tied
        decoders an expansion; the feature affine is not applied). A per-layer transcoder set
        (cross_layer=False) writes only to its own layer: [F, 1, d_out], the target s."""
        L = self.n_layers
        if not 0 <= s < L:
            raise ValueError(f"s: expected a source layer in [0, {L}), got {s}")
        if not self.cfg.cross_layer:
            return self.W_dec[s].unsqueeze(1)
        tying = self.cfg.decoder_tying
        if tying == "none":
            return self.W_dec[s]
        if tying == "per_source":
            return self.W_dec[s].unsqueeze(1).expand(-1, L - s, -1)
        return self.W_dec[s:].permute(1, 0, 2)

    def decoder_norms(self) -> torch.Tensor:
        """[L, F] fp32 (fp64 for an fp64 model): ‖W_dec,i^s‖ = sqrt(Σ_{t≥s} ‖W^{s→t}[i]‖²), the
        concatenated norm of docs/DESIGN.md §4 (including the per-target scale when the feature affine is on).
        Each decoder row's norm is one fused reduction with fp32 accumulation (``_row_norms``): no
        fp32 copy or square of the decoder, forward or backward; zero rows get a zero gradient."""
        tying = self.cfg.decoder_tying
        if not self.cfg.cross_layer:  # feature (l, i) writes W_dec[l][i] to layer l only
            return _row_norms(self.W_dec, (-1,))
        if tying == "none":
            return torch.stack([_row_norms(W, (1, 2)) for W in self.W_dec])
        row_sq = _row_norms(self.W_dec, (-1,)).square()  # [L, F]
        scale_sq = self.feature_scale.to(row_sq.dtype).pow(2) if self.cfg.feature_affine else torch.ones_like(row_sq)
        if tying == "per_source":  # feature (s, i) writes W_dec[s][i]·scale_t[i] to every t ≥ s
            tail = scale_sq.flip(0).cumsum(0).flip(0)  # Σ_{t≥s} scale_t²
            return _sqrt0(row_sq * tail)
        # per_target: feature (s, i) writes W_dec[t][i]·scale_t[i] to t ≥ s
        return _sqrt0((row_sq * scale_sq).flip(0).cumsum(0).flip(0))

    def _decode_n(self, codes: list, xn: Optional[torch.Tensor], bias: bool) -> torch.Tensor:
        """L codes → [B, L, d_out] in normalised space (bias=False: no b_dec and no skip, for AuxK)."""
        cfg = self.cfg
        if len(codes) != self.n_layers:
            raise ValueError(f"codes: expected {self.n_layers} per-layer SparseCodes, got {len(codes)}")
        cdt = self._compute_dtype()
        W_dec, off, scale = self._decoder_views(cdt)
        b_dec = self.b_dec.to(cdt) if bias and self.tp is None else None
        if not cfg.cross_layer:  # L independent transcoders: one sparse decode per layer
            b_l = [None] * self.n_layers if b_dec is None else b_dec.unbind(0)
            y = torch.stack([ops.sparse_decode(c, W, b, impl=self.impl)
                             for c, W, b in zip(codes, W_dec.unbind(0), b_l)], 1)
        else:
            # AuxK's decode (bias=False) may leave out the sources without dead features: the loss's
            # own decode gives every decoder block its gradient
            y = ops.clt_decode(codes, W_dec, cfg.decoder_tying, b_dec, off, scale, impl=self.impl, skip_empty=not bias)
        if self.tp is not None:  # this shard's features: a partial sum over features, then b_dec once
            y = self.tp.reduce_partial(y)
            if bias:
                y = y + self.b_dec.to(y.dtype)
        if bias and cfg.skip_connection:
            y = y + self._skip(xn, cdt)
        return y

    def _decoder_views(self, cdt: torch.dtype):
        """(W_dec in the compute dtype: a list of [F, L − s, d_out] or one [L, F, d_out], feature
        offset, feature scale) for the decodes."""
        cfg = self.cfg
        if self._per_pair_decoders():
            W_dec = [W.to(cdt) for W in self.W_dec]
        else:
            W_dec = self.W_dec.to(cdt)
        off = self.feature_offset if cfg.feature_affine else None
        scale = self.feature_scale if cfg.feature_affine else None
        return W_dec, off, scale

    def _skip(self, xn: Optional[torch.Tensor], cdt: torch.dtype) -> torch.Tensor:
        if xn is None:
            raise ValueError("x: this model has a skip connection; decode(codes, x=x) needs x")
        return torch.einsum("bli,loi->blo", xn.to(cdt), self.W_skip.to(cdt))

    def _decode_blocks(self, codes: list, xn: Optional[torch.Tensor]) -> tuple:
        """Matryoshka: (the G feature-block decodes [G, B, L, d_out] — block g decodes the features
        m_{g-1} ≤ i < m_g of every source layer —, base b_dec (+ the skip term)), one decode for all."""
        cfg = self.cfg
        if self.tp is not None:
            raise NotImplementedError("matryoshka_prefixes: a tensor-parallel shard holds a slice of every prefix; "
                                      "Matryoshka models train with train.tp = 1")
        if len(codes) != self.n_layers:
            raise ValueError(f"codes: expected {self.n_layers} per-layer SparseCodes, got {len(codes)}")
        cdt = self._compute_dtype()
        W_dec, off, scale = self._decoder_views(cdt)
        prefixes = cfg.matryoshka_prefixes
        if not cfg.cross_layer:  # L independent transcoders
            blocks = torch.stack([ops.matryoshka_blocks(c, W, prefixes, impl=self.impl)
                                  for c, W in zip(codes, W_dec.unbind(0))], 2)
        else:
            blocks = ops.matryoshka_clt_blocks(codes, W_dec, cfg.decoder_tying, prefixes, off, scale, impl=self.impl)
        base = self.b_dec.to(cdt)
        if cfg.skip_connection:
            base = base + self._skip(xn, cdt)
        return blocks, base

    def _feature_axis(self, name: str) -> Optional[int]:
        if name.startswith("W_dec."):  # untied: W_dec.{s} is [F, L − s, d_out]
            return 0
        if name in ("W_enc", "b_enc", "threshold", "log_threshold", "W_dec", "feature_offset", "feature_scale",
                    "feature_cut_sum", "feature_cut_count"):
            return 1
        return None

    # ------------------------------------------------------ initialisation
    @torch.no_grad()
    def initialize_from_data(self, x: torch.Tensor, y: torch.Tensor, fire_rate: Optional[float] = None) -> None:
        """docs/DESIGN.md §5 from a data sample x: [N, L, d_in], y: [N, L, d_out]: fit the normalisation
        statistics, set b_dec to the mean of (normalised) y, and for ReLU/JumpReLU set b_enc so that
        each feature fires on ``fire_rate`` of the sample (default: the config's ``init_fire_rate``;
        nothing when both are None)."""
        xl = self._check_tensor(self._layered(x, "x"), "x", self.d_in, self._shape_msg(self.d_in))
        yl = self._check_tensor(self._layered(y, "y"), "y", self.d_out, self._shape_msg(self.d_out))
        self._finite_rows(xl, yl, names=("x", "y"), allow_skip=False)
        self._fit_normalization(xl, yl)
        xn, yn = self._normalize(xl, "in"), self._normalize(yl, "out")
        self.b_dec.copy_(yn.double().mean(0))
        _set_fire_rate(self, xn, fire_rate)

    @torch.no_grad()
    def fold_normalization(self) -> "CrossLayerTranscoder":
        """An equivalent model with normalization="none": the statistics folded into the weights."""
        cfg = self.cfg
        new = CrossLayerTranscoder(cfg.replace(normalization="none")).to(self.device)
        new.load_state_dict(self.state_dict())
        if cfg.normalization == "none":
            return new
        mi, si, mo, so = (t.double() for t in (self.input_mean, self.input_scale, self.output_mean, self.output_scale))
        W_enc = self.W_enc.double() / si[:, None, :]
        new.W_enc.copy_(W_enc)
        new.b_enc.copy_(self.b_enc.double() - torch.einsum("lfd,ld->lf", W_enc, mi))
        b_dec = self.b_dec.double() * so + mo
        if self._per_pair_decoders():
            for s, W in enumerate(self.W_dec):
                new.W_dec[s].copy_(W.double() * so[s:][None])
        elif cfg.decoder_tying == "per_target" or not cfg.cross_layer:
            new.W_dec.copy_(self.W_dec.double() * so[:, None, :])
        else:
            if not torch.allclose(so, so[:1].expand_as(so)):
                raise ValueError("normalization: a per_source tied decoder shares rows across target layers, "
                                 "so output scales that differ per layer cannot be folded into it")
            new.W_dec.copy_(self.W_dec.double() * so[0])
        if cfg.skip_connection:
            W_skip = self.W_skip.double() * so[:, :, None] / si[:, None, :]
            new.W_skip.copy_(W_skip)
            b_dec = b_dec - torch.einsum("loi,li->lo", W_skip, mi)
        new.b_dec.copy_(b_dec)
        for name in ("input_mean", "output_mean"):
            getattr(new, name).zero_()
        for name in ("input_scale", "output_scale"):
            getattr(new, name).fill_(1.0)
        return new

    # ---------------------------------------------------------- public shapes
    def _layered(self, t, name: str):
        # A PLT (n_layers=1) also takes [B, d]; its outputs then drop the layer axis.
        if isinstance(t, torch.Tensor) and t.dim() == 2 and self.n_layers == 1:
            return t.unsqueeze(1)
        return t

    def encode(self, x: torch.Tensor) -> list:
        """x: [B, L, d_in] → list of L SparseCodes (token-major CSR over F features)."""
        return super().encode(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, d_in] → ŷ: [B, L, d_out] (a PLT also maps [B, d_in] → [B, d_out])."""
        y = super().forward(x)
        return y[:, 0] if x.dim() == 2 else y

    def decode(self, codes: list, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """codes: L SparseCodes → ŷ: [B, L, d_out] (x: [B, L, d_in], needed only for the skip term)."""
        return super().decode(codes, x)

    def _layered_codes(self, codes):
        if isinstance(codes, SparseCodes):
            codes = [codes]
        if not isinstance(codes, (list, tuple)) or not all(isinstance(c, SparseCodes) for c in codes):
            raise TypeError(f"codes: expected a list of {self.n_layers} SparseCodes, got {type(codes).__name__}")
        return list(codes)


class _RowNorms(torch.autograd.Function):
    """‖W‖ over ``dims`` in fp32, fp64 for fp64 W (see ``_row_norms``)."""

    @staticmethod
    def forward(ctx, W, dims):
        acc = torch.float64 if W.dtype == torch.float64 else torch.float32
        norm = torch.linalg.vector_norm(W, 2, dim=dims, dtype=acc)
        ctx.save_for_backward(W, norm)
        ctx.dims = dims
        return norm

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        W, norm = ctx.saved_tensors
        scale = torch.where(norm > 0, grad / norm, torch.zeros_like(norm))  # d‖w‖/dw = w/‖w‖; 0 at w = 0
        for d in sorted(d % W.dim() for d in ctx.dims):
            scale = scale.unsqueeze(d)
        # fp32 scale times W, rounded once into W's dtype (on a GPU without an fp32 temporary)
        return torch.mul(W, scale, out=torch.empty_like(W)), None


def _row_norms(W: torch.Tensor, dims: tuple) -> torch.Tensor:
    """fp32 (fp64 for fp64 W) norms of W over ``dims``, differentiable: one fused reduction with
    fp32 accumulation (torch reads a bf16 W on a GPU without widening it first), and a backward that writes
    ``W·g/‖W‖`` straight into W's dtype — no fp32 copy or square of W kept for autograd."""
    return _RowNorms.apply(W, dims)


def _sqrt0(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) for x ≥ 0 whose gradient is 0, not NaN, where x = 0 (a decoder row of zeros)."""
    pos = x > 0
    return torch.where(pos, x, torch.ones_like(x)).sqrt() * pos


def _set_fire_rate(model: SparseDictionary, xn: torch.Tensor, fire_rate: Optional[float]) -> None:
    """The ReLU/JumpReLU start of docs/DESIGN.md §5: b_enc so that h = W_enc x + b_enc exceeds θ (0 for
    ReLU) on ``fire_rate`` of the sample ``xn`` [N, L, d_in] (normalised), per feature: b_enc,i = θ_i − q_i
    with q_i the (1 − fire_rate) quantile of feature i's W_enc x over the sample. ``fire_rate`` None: the
    config's ``init_fire_rate`` for ReLU/JumpReLU (nothing when that is None, or for TopK/BatchTopK)."""
    act = model.cfg.activation
    if fire_rate is None:
        fire_rate = model.cfg.init_fire_rate if act in ("relu", "jumprelu") else None
        if fire_rate is None:
            return
    if act not in ("relu", "jumprelu"):
        raise ValueError(f"fire_rate: only ReLU and JumpReLU dictionaries use it, not {act!r}")
    if isinstance(fire_rate, bool) or not isinstance(fire_rate, (int, float)) or not 0 < fire_rate < 1:
        raise ValueError(f"fire_rate: expected a fraction in (0, 1), got {fire_rate!r}")
    if xn.shape[0] == 0:
        raise ValueError("x: expected at least one token to set the encoder bias from")
    W_enc, b_enc, theta = model._enc_layers()
    pre_bias = model._pre_bias()
    for l in range(model.n_layers):
        h = ops.preacts(xn[:, l].to(W_enc.dtype), W_enc[l], None, pre_bias)
        q = torch.quantile(h.float(), 1 - fire_rate, dim=0)
        b_enc[l].copy_((0.0 if theta is None else theta[l].float()) - q)
