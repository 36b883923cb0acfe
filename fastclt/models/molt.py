"""MOLT: a sparse mixture of linear transforms in place of each of L MLPs (docs/DESIGN.md §16).

Layer l reads x_l (the MLP input, like a transcoder) and reconstructs the MLP output y_l:

    g_{l,i} = act(e_{l,i} · x_l + b_{l,i})               i < T: the gates, sparse (JumpReLU / TopK / …)
    ŷ_l     = Σ_i g_{l,i} · U_{l,i} (V_{l,i} x_l)  (+ b_dec[l])

Transform i has rank r_i (rank groups, ``cfg.rank_groups``); A_{l,i} = U_{l,i} V_{l,i} is never formed.
Parameters (all readable attributes):
    W_enc [L, T, d_in]  gate vectors e_i        b_enc [L, T]  gate biases b_i       threshold [L, T] (JumpReLU)
    V [L, R, d_in]      rows rank_ptr[i]:rank_ptr[i+1] of layer l are V_{l,i}       (R = Σ_i r_i)
    U [L, R, d_out]     the same rows are U_{l,i}ᵀ (A_{l,i} = U[l, rows_i]ᵀ V[l, rows_i])
    b_dec [L, d_out]    (output_bias)
The gates are this model's "features": codes, dead masks, L0, the BatchTopK → JumpReLU statistics
and the sparsity penalty work as for the other dictionaries, with ``decoder_norms()`` the
transforms' Frobenius norms ‖U_{l,i} V_{l,i}‖_F (from r_i × r_i Gram products). A MOLT with
``n_layers = 1`` also takes and returns [B, d] tensors.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from fastclt import ops
from fastclt.config import MOLTConfig
from fastclt.models.base import SparseDictionary, _per_layer
from fastclt.models.clt import CrossLayerTranscoder, _set_fire_rate

__all__ = ["MOLT"]

class MOLT(SparseDictionary):
    config_class = MOLTConfig
    _dense_codes_ok = False  # its transforms read the gates as CSR (molt_decode)

    def __init__(self, cfg: MOLTConfig) -> None:
        if not isinstance(cfg, MOLTConfig):
            raise TypeError(f"cfg: expected a MOLTConfig, got {type(cfg).__name__}")
        self.n_layers, self.d_in, self.d_out = cfg.n_layers, cfg.d_in, cfg.d_out
        super().__init__(cfg)
        L, T, R = cfg.n_layers, cfg.n_features, cfg.total_rank
        dt = self.param_dtype
        self.rank_groups = cfg.rank_groups
        self.W_enc = nn.Parameter(torch.empty(L, T, cfg.d_in, dtype=dt))
        self.b_enc = nn.Parameter(torch.zeros(L, T, dtype=dt))
        self.V = nn.Parameter(torch.empty(L, R, cfg.d_in, dtype=dt))
        self.U = nn.Parameter(torch.empty(L, R, cfg.d_out, dtype=dt))
        if cfg.output_bias:
            self.b_dec = nn.Parameter(torch.zeros(L, cfg.d_out, dtype=dt))
        self._make_threshold((L, T))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Gate vectors: random unit directions; V ~ U(±1/√d_in), U ~ U(±1/√d_out); biases zero
        (``initialize_from_data`` then sets the gate biases of ReLU / JumpReLU gates from data)."""
        cfg = self.cfg
        W = torch.randn(self.W_enc.shape, dtype=torch.float32)
        self.W_enc.copy_(W / W.norm(dim=-1, keepdim=True))
        self.b_enc.zero_()
        self.V.uniform_(-1 / math.sqrt(cfg.d_in), 1 / math.sqrt(cfg.d_in))
        self.U.uniform_(-1 / math.sqrt(cfg.d_out), 1 / math.sqrt(cfg.d_out))
        if cfg.output_bias:
            self.b_dec.zero_()

    # ------------------------------------------------------------ structure
    def _enc_layers(self):
        return self.W_enc, self.b_enc, self._threshold_layers()

    def _pre_bias(self):
        return None

    def rank_ptr(self) -> torch.Tensor:
        """int64 [T + 1]: transform i owns rows rank_ptr[i] : rank_ptr[i+1] of U[l] and V[l]."""
        return ops.rank_ptr(self.rank_groups, self.device)

    def transform(self, layer: int, i: int) -> torch.Tensor:
        """A_{layer,i} = U_i V_i as a dense [d_out, d_in] matrix (for inspection and tests)."""
        if not 0 <= layer < self.n_layers or not 0 <= i < self.cfg.n_features:
            raise ValueError(f"layer, i: expected 0 <= layer < {self.n_layers} and 0 <= i < {self.cfg.n_features}, "
                             f"got {layer}, {i}")
        ptr = ops.rank_ptr(self.rank_groups, torch.device("cpu"))
        lo, hi = int(ptr[i]), int(ptr[i + 1])
        return self.U[layer, lo:hi].T @ self.V[layer, lo:hi]

    def decoder_norms(self) -> torch.Tensor:
        """[L, T] fp32 (fp64 for an fp64 model): ‖U_{l,i} V_{l,i}‖_F, from r_i × r_i Gram products."""
        return torch.stack([ops.molt_norms(U, V, self.rank_groups)
                            for U, V in zip(_per_layer(self.U), _per_layer(self.V))])

    transform_norms = decoder_norms

    def _decode_n(self, codes: list, xn: Optional[torch.Tensor], bias: bool) -> torch.Tensor:
        """L gate codes and the normalised inputs xn [B, L, d_in] → [B, L, d_out] (normalised space;
        bias=False: no b_dec, for AuxK)."""
        if len(codes) != self.n_layers:
            raise ValueError(f"codes: expected {self.n_layers} per-layer SparseCodes, got {len(codes)}")
        if xn is None:
            raise ValueError("x: a MOLT's transforms act on the input; decode(codes, x=x) needs x")
        if self.tp is not None:
            raise NotImplementedError("MOLT: tensor parallelism is not supported (train with train.tp = 1)")
        cdt = self._compute_dtype()
        b_dec = (self.b_dec.to(cdt).unbind(0) if bias and self.cfg.output_bias else [None] * self.n_layers)
        xs = _per_layer(xn.to(cdt), 1)
        Us, Vs = _per_layer(self.U.to(cdt)), _per_layer(self.V.to(cdt))
        return torch.stack([ops.molt_decode(c, x, U, V, self.rank_groups, b, impl=self.impl)
                            for c, x, U, V, b in zip(codes, xs, Us, Vs, b_dec)], 1)

    def _feature_axis(self, name: str) -> Optional[int]:
        # U and V are packed by rank rows, not by transform: a MOLT is not sharded (the trainer
        # refuses train.tp > 1 for it)
        if name in ("W_enc", "b_enc", "threshold", "log_threshold", "feature_cut_sum", "feature_cut_count"):
            return 1
        return None

    # ------------------------------------------------------ initialisation
    @torch.no_grad()
    def initialize_from_data(self, x: torch.Tensor, y: torch.Tensor, fire_rate: Optional[float] = None) -> None:
        """From a data sample x: [N, L, d_in], y: [N, L, d_out] (a one-layer MOLT also [N, d]): fit
        the normalisation statistics, set b_dec to the mean of the normalised y (output_bias), and
        for ReLU / JumpReLU gates set each gate's bias so that it opens on ``fire_rate`` of the
        sample (default: the config's ``init_fire_rate``, 2% for a MOLT: a sparse start, the kernels'
        cost grows with the open gates; nothing when both are None). TopK / BatchTopK gates take no
        fire_rate."""
        xl = self._check_tensor(self._layered(x, "x"), "x", self.d_in, self._shape_msg(self.d_in))
        yl = self._check_tensor(self._layered(y, "y"), "y", self.d_out, self._shape_msg(self.d_out))
        self._finite_rows(xl, yl, names=("x", "y"), allow_skip=False)
        self._fit_normalization(xl, yl)
        xn, yn = self._normalize(xl, "in"), self._normalize(yl, "out")
        if self.cfg.output_bias:
            self.b_dec.copy_(yn.double().mean(0))
        if self.cfg.activation not in ("relu", "jumprelu") and fire_rate is not None:
            raise ValueError(f"fire_rate: only ReLU / JumpReLU gates use it, not {self.cfg.activation!r}")
        _set_fire_rate(self, xn, fire_rate)  # ReLU: the gate opens where e·x + b > 0 (θ = 0)

    # ---------------------------------------------------------- public shapes
    # as a transcoder's: one layer also takes [B, d]; codes are a list of L SparseCodes
    _layered = CrossLayerTranscoder._layered
    _layered_codes = CrossLayerTranscoder._layered_codes

    def encode(self, x: torch.Tensor) -> list:
        """x: [B, L, d_in] → L SparseCodes of the gates (token-major CSR over T transforms)."""
        return super().encode(x)

    def decode(self, codes: list, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """codes: L gate SparseCodes and x: [B, L, d_in] (required: the transforms act on x) →
        ŷ: [B, L, d_out]."""
        if x is None:
            raise ValueError("x: a MOLT's transforms act on the input; decode(codes, x=x) needs x")
        y = super().decode(codes, x)
        return y[:, 0] if x.dim() == 2 else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, d_in] → ŷ: [B, L, d_out] (a one-layer MOLT also maps [B, d_in] → [B, d_out])."""
        y = super().forward(x)
        return y[:, 0] if x.dim() == 2 else y
