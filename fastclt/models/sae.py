"""Sparse autoencoder (docs/DESIGN.md §2, §10): x: [B, d_in] → codes → x̂: [B, d_in].

    a = act(W_enc (x − b_dec) + b_enc),   x̂ = W_decᵀ a + b_dec

Parameters: W_enc [F, d_in], b_enc [F], W_dec [F, d_in] (a separate parameter, initialised as a
unit-normed copy of W_enc's rows), b_dec [d_in], threshold [F] (JumpReLU).
With ``unit_norm_decoder``, call ``project_decoder_grads()`` before and ``post_step()`` after each
optimizer step (the trainer does): the gradient parallel to each decoder row is removed, then the
rows are renormalised.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastclt import ops
from fastclt.codes import SparseCodes
from fastclt.config import SAEConfig
from fastclt.models.base import SparseDictionary, geometric_median
from fastclt.models.clt import _row_norms, _set_fire_rate

__all__ = ["SparseAutoencoder"]


class SparseAutoencoder(SparseDictionary):
    config_class = SAEConfig

    def __init__(self, cfg: SAEConfig) -> None:
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"cfg: expected an SAEConfig, got {type(cfg).__name__}")
        self.n_layers, self.d_in, self.d_out = 1, cfg.d_in, cfg.d_in
        super().__init__(cfg)
        F, d = cfg.n_features, cfg.d_in
        dt = self.param_dtype
        self.W_enc = nn.Parameter(torch.empty(F, d, dtype=dt))
        self.b_enc = nn.Parameter(torch.zeros(F, dtype=dt))
        self.W_dec = nn.Parameter(torch.empty(F, d, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dt))
        self._make_threshold((F,))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """docs/DESIGN.md §5: W_enc rows random unit directions; W_dec rows a unit-normed copy; biases zero."""
        W = torch.randn(self.W_enc.shape, dtype=torch.float32)
        W = W / W.norm(dim=1, keepdim=True)
        self.W_enc.copy_(W)
        self.W_dec.copy_(W)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ------------------------------------------------------------ structure
    def _enc_layers(self):
        return self.W_enc.unsqueeze(0), self.b_enc.unsqueeze(0), self._threshold_layers()

    def _pre_bias(self):
        return self.b_dec

    def decoder_weight(self, s: int = 0) -> torch.Tensor:
        """[F, 1, d_in]: the decoder as a one-layer CLT's expanded view."""
        if s != 0:
            raise ValueError(f"s: an SAE has one layer, got s={s}")
        return self.W_dec.unsqueeze(1)

    def decoder_norms(self) -> torch.Tensor:
        """[1, F] fp32 (fp64 for an fp64 model): ‖W_dec[i]‖, one fused reduction per row with fp32
        accumulation (no fp32 copy of the decoder; fastclt/models/clt.py ``_row_norms``)."""
        return _row_norms(self.W_dec, (-1,)).unsqueeze(0)

    def _decode_n(self, codes: list, xn: Optional[torch.Tensor], bias: bool) -> torch.Tensor:
        if len(codes) != 1:
            raise ValueError(f"codes: an SAE decodes one SparseCodes, got {len(codes)}")
        cdt = self._compute_dtype()
        if self.tp is None:
            y = ops.sparse_decode(codes[0], self.W_dec.to(cdt), self.b_dec.to(cdt) if bias else None, impl=self.impl)
        else:  # this shard's features: a partial sum over features, then b_dec once
            y = self.tp.reduce_partial(ops.sparse_decode(codes[0], self.W_dec.to(cdt), None, impl=self.impl))
            if bias:
                y = y + self.b_dec.to(y.dtype)
        return y.unsqueeze(1)

    def _decode_blocks(self, codes: list, xn: Optional[torch.Tensor]) -> tuple:
        """Matryoshka: (the G feature-block decodes [G, B, 1, d_in], base b_dec), one decode for all."""
        if self.tp is not None:
            raise NotImplementedError("matryoshka_prefixes: a tensor-parallel shard holds a slice of every prefix; "
                                      "Matryoshka models train with train.tp = 1")
        if len(codes) != 1:
            raise ValueError(f"codes: an SAE decodes one SparseCodes, got {len(codes)}")
        cdt = self._compute_dtype()
        blocks = ops.matryoshka_blocks(codes[0], self.W_dec.to(cdt), self.cfg.matryoshka_prefixes, impl=self.impl)
        return blocks.unsqueeze(2), self.b_dec.to(cdt)

    def _feature_axis(self, name: str) -> Optional[int]:
        if name in ("W_enc", "b_enc", "W_dec", "threshold", "log_threshold"):
            return 0
        if name in ("feature_cut_sum", "feature_cut_count"):
            return 1
        return None

    # ---------------------------------------------------- training helpers
    def batch_inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """A batch as activation sources yield it (x [B, 1, d_in]) → (x [B, d_in],): an SAE
        reconstructs its input, so y is not used."""
        return (x[:, 0],)

    @torch.no_grad()
    def project_decoder_grads(self) -> None:
        """Remove the component of W_dec's gradient parallel to each (unit) row."""
        if not self.cfg.unit_norm_decoder or self.W_dec.grad is None:
            return
        W = self.W_dec.float()
        W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g = self.W_dec.grad
        g.sub_(((g.float() * W).sum(1, keepdim=True) * W).to(g.dtype))

    @torch.no_grad()
    def post_step(self) -> None:
        """After an optimizer step: clamp θ ≥ 0 (raw JumpReLU) and renormalise decoder rows."""
        super().post_step()
        if self.cfg.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def initialize_from_data(self, x: torch.Tensor, fire_rate: Optional[float] = None) -> None:
        """docs/DESIGN.md §5 from a sample x: [N, d_in]: fit the normalisation, set b_dec to the geometric
        median (or mean, per ``b_dec_init``) of the normalised sample, and for ReLU/JumpReLU b_enc so
        that each feature fires on ``fire_rate`` of the sample (default: the config's ``init_fire_rate``;
        nothing when both are None)."""
        xl = self._check_tensor(self._layered(x, "x"), "x", self.d_in, self._shape_msg(self.d_in))
        self._finite_rows(xl, names=("x",), allow_skip=False)
        self._fit_normalization(xl, xl)
        xn = self._normalize(xl, "in")
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(xn[:, 0].double()))
        elif self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(xn[:, 0].double().mean(0))
        _set_fire_rate(self, xn, fire_rate)

    @torch.no_grad()
    def fold_normalization(self) -> "SparseAutoencoder":
        """An equivalent model with normalization="none": the statistics folded into the weights."""
        new = SparseAutoencoder(self.cfg.replace(normalization="none")).to(self.device)
        new.load_state_dict(self.state_dict())
        if self.cfg.normalization == "none":
            return new
        mu, sigma = self.input_mean[0].double(), self.input_scale[0].double()
        new.W_enc.copy_(self.W_enc.double() / sigma)
        new.W_dec.copy_(self.W_dec.double() * sigma)
        new.b_dec.copy_(self.b_dec.double() * sigma + mu)
        for name in ("input_mean", "output_mean"):
            getattr(new, name).zero_()
        for name in ("input_scale", "output_scale"):
            getattr(new, name).fill_(1.0)
        return new

    # ---------------------------------------------------------- public shapes
    def encode(self, x: torch.Tensor) -> SparseCodes:
        """x: [B, d_in] → SparseCodes over F features."""
        return super().encode(x)

    def decode(self, codes: SparseCodes, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """codes → x̂: [B, d_in]."""
        return super().decode(codes, x)

    def loss(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, dead_mask: Optional[torch.Tensor] = None, **kw):
        """x: [B, d_in] (y defaults to x), dead_mask: [F] bool → LossOutput (see SparseDictionary.loss)."""
        return super().loss(x, y, dead_mask, **kw)

    def _shape_msg(self, width: int) -> str:
        return f"[B, {width}]"

    def _mask_shape_msg(self) -> str:
        return f"[{self.cfg.n_features}]"

    def _layered(self, t, name: str):
        if isinstance(t, torch.Tensor) and t.dim() == 2:
            return t.unsqueeze(1)
        if isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected shape [B, {self.d_in}], got {tuple(t.shape)}")
        return t

    def _unlayered_shape(self, t: torch.Tensor):
        return t.squeeze(1).shape if t.dim() == 3 and t.shape[1] == 1 else t.shape

    def _unlayered(self, t: torch.Tensor) -> torch.Tensor:
        return t.squeeze(1)

    def _layered_codes(self, codes):
        if not isinstance(codes, SparseCodes):
            raise TypeError(f"codes: expected SparseCodes, got {type(codes).__name__}")
        return [codes]

    def _unlayered_codes(self, codes):
        return codes[0]
