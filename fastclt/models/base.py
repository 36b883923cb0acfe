"""What every sparse dictionary shares: input checks, normalisation, the loss of docs/DESIGN.md §4, the
BatchTopK → JumpReLU statistics, and safetensors save/load.

Internally every dictionary is *layered*: inputs are [B, L, d_in], targets [B, L, d_out], encoder
weights [L, F, d_in]. An SAE is the case L = 1 whose public methods take [B, d_in].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from fastclt import ops
from fastclt.ops import density
from fastclt.ops.reference.auxk import empty_codes
from fastclt.checkpoint import CheckpointError, load_tensors, read_header, save_tensors, write_json
from fastclt.codes import SparseCodes
from fastclt.config import SAEConfig
from fastclt.profiling import phase

__all__ = ["LossOutput", "InputCheck", "SparseDictionary", "JumpReLUCalibration", "geometric_median"]

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class InputCheck:
    """A finiteness check of a loss's inputs, computed on the device and not yet read (reading it
    synchronises): ``sums`` fp32 [n], one per tensor (a NaN or Inf anywhere makes its sum non-finite),
    of ``tensors`` named ``names``. ``raise_if_nonfinite`` reads it and raises the ValueError that
    ``loss`` raises under nonfinite="error" (a sum that overflowed on finite values is checked
    exactly: no error)."""

    sums: torch.Tensor
    names: tuple
    tensors: tuple

    def raise_if_nonfinite(self) -> None:
        for t, name, s in zip(self.tensors, self.names, self.sums.tolist()):
            if not math.isfinite(s):
                _raise_on_nonfinite_rows(t, name)


def _raise_on_nonfinite_rows(t: torch.Tensor, name: str) -> None:
    row_ok = torch.isfinite(t).flatten(1).all(1)
    if not bool(row_ok.all()):
        bad = int((~row_ok).sum())
        raise ValueError(f"{name}: {bad} token(s) contain NaN or Inf (set nonfinite='skip' to drop "
                         f"them during training, or clean the activations)")


@dataclass
class LossOutput:
    """What ``model.loss`` returns.

    loss: scalar tensor to backpropagate. codes: per-layer SparseCodes. y_hat: [B, L, d_out]
    reconstruction in normalised space. fired: [L, F] bool, features active in this batch.
    n_tokens: tokens used (after skipping non-finite ones). ``metrics``: dict of floats (computed
    once, on first access: reading them synchronises with the device). ``input_check``: with
    ``loss(..., defer_input_check=True)``, the finiteness check of x and y left to the caller.
    """

    loss: torch.Tensor
    codes: list
    y_hat: torch.Tensor
    fired: torch.Tensor
    n_tokens: int
    skipped_tokens: int
    parts: dict = field(default_factory=dict)
    per_layer: dict = field(default_factory=dict)
    input_check: Optional["InputCheck"] = None
    _metrics: Optional[dict] = None

    @property
    def metrics(self) -> dict:
        """{name: float} of the parts, the per-layer means and every layer's value, and the loss: one
        transfer from the device for all of them."""
        if self._metrics is None:
            self.unpack_metrics(self.packed_metrics().cpu().tolist())
        return self._metrics

    def packed_metrics(self) -> torch.Tensor:
        """The values ``metrics`` reads, packed in one tensor on the device and not read (fp32, or fp64
        for an fp64 loss): a caller that reads other values anyway reads these with them and hands the
        floats to ``unpack_metrics``."""
        dt = torch.float64 if self.loss.dtype == torch.float64 else torch.float32  # (the loss exactly)
        scalars = [t.detach().to(dt).reshape(()) for t in self.parts.values()]
        scalars.append(self.loss.detach().to(dt).reshape(()))
        rows = [t.detach().to(dt).reshape(-1) for t in self.per_layer.values()]
        parts = [torch.stack(scalars)]
        if rows and len({r.shape[0] for r in rows}) == 1:  # one [K, L] block: its means in one op
            block = torch.stack(rows)
            parts += [block.mean(1), block.reshape(-1)]
        elif rows:
            parts += [torch.stack([r.mean() for r in rows])] + rows
        return torch.cat(parts)

    def unpack_metrics(self, floats: list) -> None:
        """Sets ``metrics`` from the floats of ``packed_metrics``."""
        names = list(self.parts) + list(self.per_layer)
        per_layer_names = [f"layer{l}/{key}" for key, t in self.per_layer.items() for l in range(t.shape[0])]
        n = len(self.parts)
        metrics = dict(zip(names[:n], floats[:n]))
        metrics.update(zip(names[n:] + per_layer_names, floats[n + 1:]))
        metrics["loss"] = floats[n]
        metrics["skipped_tokens"] = float(self.skipped_tokens)
        self._metrics = metrics


def geometric_median(points: torch.Tensor, iters: int = 64, eps: float = 1e-6) -> torch.Tensor:
    """points: [N, d] → [d], the geometric median by Weiszfeld's iterations (fp64 internally)."""
    p = points.double()
    m = p.mean(0)
    for _ in range(iters):
        w = 1.0 / (p - m).norm(dim=1).clamp_min(eps)
        new = (w[:, None] * p).sum(0) / w.sum()
        if (new - m).norm() <= eps * (1 + m.norm()):
            m = new
            break
        m = new
    return m.to(points.dtype)


def _per_layer(t: torch.Tensor, dim: int = 0) -> tuple:
    """The slices of ``t`` along ``dim`` as views whose backward writes no full-size zero tensor:
    a squeeze for one layer (a view both ways), else an unbind (one stack in the backward)."""
    return (t.squeeze(dim),) if t.shape[dim] == 1 else t.unbind(dim)


class SparseDictionary(nn.Module):
    """Base of CrossLayerTranscoder and SparseAutoencoder. Subclasses define the parameters and:

    ``_enc_layers()`` → (W_enc [L, F, d_in], b_enc [L, F], threshold [L, F] or None),
    ``_pre_bias()`` → [d_in] or None (an SAE's b_dec), ``_decode_n(codes, xn, bias)`` → [B, L, d_out]
    (bias=False: no b_dec and no skip term, for AuxK), ``_decode_blocks(codes, xn)`` → (G block
    decodes [B, L, d_out], the base b_dec (+ skip) they add to) for Matryoshka configs,
    ``decoder_norms()`` → [L, F], ``_layered(x, name)`` / ``_unlayered(t)`` (public ↔ [B, L, d]).
    """

    config_class = None  # set by subclasses
    n_layers: int
    d_in: int
    d_out: int

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.impl = "auto"
        # Tensor parallelism (fastclt.training.parallel.TensorParallel, or None): this module then
        # holds F/tp features of every layer; the selection ops run over all shards (their
        # ``group=`` is ``tp.process_group``) and partial decodes and feature sums go through
        # ``self.tp``, so that the result equals the unsharded model's.
        self.tp = None
        self._last_density: Optional[float] = None  # of the last batch's codes (``_codes_form``)
        L, F = self.n_layers, cfg.n_features
        dt = _DTYPES[cfg.dtype]
        # Normalisation statistics: xn = (x − mean) / scale (identity until fitted).
        self.register_buffer("input_mean", torch.zeros(L, self.d_in, dtype=dt))
        self.register_buffer("input_scale", torch.ones(L, self.d_in, dtype=dt))
        self.register_buffer("output_mean", torch.zeros(L, self.d_out, dtype=dt))
        self.register_buffer("output_scale", torch.ones(L, self.d_out, dtype=dt))
        if cfg.activation in ("topk", "batchtopk"):
            # Smallest kept value: a running mean per layer and per-feature sums, for to_jumprelu().
            self.register_buffer("cut_mean", torch.zeros(L, dtype=torch.float32))
            self.register_buffer("cut_steps", torch.zeros((), dtype=torch.int64))
            self.register_buffer("feature_cut_sum", torch.zeros(L, F, dtype=torch.float32))
            self.register_buffer("feature_cut_count", torch.zeros(L, F, dtype=torch.int64))

    # ----------------------------------------------------------------- basics
    @property
    def param_dtype(self) -> torch.dtype:
        return _DTYPES[self.cfg.dtype]

    @property
    def device(self) -> torch.device:
        return self.b_enc.device

    def _make_threshold(self, shape: tuple) -> None:
        """JumpReLU thresholds of ``shape``: raw θ (default) or log θ, per docs/DESIGN.md §3."""
        if self.cfg.activation != "jumprelu":
            return
        init = torch.full(shape, float(self.cfg.threshold_init), dtype=self.param_dtype)
        if self.cfg.threshold_param == "log":
            self.log_threshold = nn.Parameter(init.log())
        else:
            self.threshold = nn.Parameter(init)

    def _threshold_layers(self) -> Optional[torch.Tensor]:
        if self.cfg.activation != "jumprelu":
            return None
        L, F = self.n_layers, self.cfg.n_features
        if self.cfg.threshold_param == "log":
            return self.log_threshold.exp().reshape(L, F)
        return self._parameters["threshold"].reshape(L, F)

    def __getattr__(self, name: str):
        # ``threshold`` reads as θ for either parameterisation (raw θ, or exp of log θ).
        if name == "threshold" and "log_threshold" in self._parameters:
            return self._parameters["log_threshold"].exp()
        return super().__getattr__(name)

    @torch.no_grad()
    def post_step(self) -> None:
        """Call after each optimizer step: keeps a raw JumpReLU threshold ≥ 0 (docs/DESIGN.md §3)."""
        if self.cfg.activation == "jumprelu" and self.cfg.threshold_param == "raw":
            self._parameters["threshold"].clamp_(min=0)

    def _compute_dtype(self) -> torch.dtype:
        dev = self.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return self.param_dtype

    # ----------------------------------------------------------------- checks
    def _check_tensor(self, t, name: str, width: int, rank_msg: str) -> torch.Tensor:
        """t: [B, L, width] (after ``_layered``) → checked tensor; errors name ``name``."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor {rank_msg}, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.dim() != 3 or t.shape[1] != self.n_layers or t.shape[2] != width:
            raise ValueError(f"{name}: expected shape {rank_msg}, got {tuple(self._unlayered_shape(t))}")
        if t.device != self.device:
            raise ValueError(f"{name}: is on {t.device} but the model's weights are on {self.device}")
        if t.dtype != self.param_dtype and not torch.is_autocast_enabled(t.device.type):
            raise TypeError(f"{name}: dtype {t.dtype} does not match the model's {self.param_dtype} "
                            f"(cast it, or run under torch.autocast)")
        return t

    def _finite_rows(self, *tensors: torch.Tensor, names: tuple, allow_skip: bool) -> Optional[torch.Tensor]:
        """Apply cfg.nonfinite: None when every value is finite (or ignored), else the bool [B] mask
        of finite rows ("skip", in the loss) — or a ValueError naming the tensor."""
        policy = self.cfg.nonfinite
        if policy == "ignore":
            return None
        good = None
        # one fp32 reduction per tensor, their sum and one device sync decide the common case: a NaN
        # or Inf anywhere makes it non-finite (finite values whose sum overflows only send it to the
        # per-tensor sums and the exact row check below)
        distinct, _ = self._distinct(tensors, names)
        total = distinct[0].sum(dtype=torch.float32)
        for t in distinct[1:]:
            total = total + t.sum(dtype=torch.float32)
        if math.isfinite(float(total)):
            return None
        check = self._input_sums(tensors, names)
        for t, name, s in zip(check.tensors, check.names, check.sums.tolist()):
            if math.isfinite(s):
                continue
            if policy == "error" or not allow_skip:
                _raise_on_nonfinite_rows(t, name)
            else:
                row_ok = torch.isfinite(t).flatten(1).all(1)
                good = row_ok if good is None else good & row_ok
        if good is None or bool(good.all()):
            return None
        return good

    @staticmethod
    def _distinct(tensors, names) -> tuple[list, list]:
        """The tensors (and their names) each once, in order: an SAE's y is its x."""
        seen, seen_names = [], []
        for t, name in zip(tensors, names):
            if not any(t is u for u in seen):
                seen.append(t)
                seen_names.append(name)
        return seen, seen_names

    @staticmethod
    def _input_sums(tensors, names) -> InputCheck:
        """The sums of the distinct tensors, not read: no device sync."""
        seen, seen_names = SparseDictionary._distinct(tensors, names)
        return InputCheck(torch.stack([t.sum().float() for t in seen]), tuple(seen_names), tuple(seen))

    # ----------------------------------------------------------- normalisation
    def _normalize(self, t: torch.Tensor, which: str) -> torch.Tensor:
        if self.cfg.normalization == "none":
            return t
        mean, scale = (self.input_mean, self.input_scale) if which == "in" else (self.output_mean, self.output_scale)
        return (t - mean.to(t.dtype)) / scale.to(t.dtype)

    def _denormalize_out(self, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalization == "none":
            return t
        return t * self.output_scale.to(t.dtype) + self.output_mean.to(t.dtype)

    @staticmethod
    def _fit_stats(t: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """t: [N, L, d] → (mean [L, d], scale [L, d]) for ``kind`` ("mean_std" or "sqrt_d")."""
        t = t.double()
        L, d = t.shape[1], t.shape[2]
        if kind == "mean_std":
            mean = t.mean(0)
            std = t.std(0, unbiased=False)
            floor = 1e-6 * std.mean(1, keepdim=True).clamp_min(1e-12)
            return mean, torch.maximum(std, floor)
        norm = t.norm(dim=2).mean(0)  # E‖x‖ per layer
        scale = (norm / math.sqrt(d)).clamp_min(1e-12)
        return torch.zeros(L, d, dtype=t.dtype, device=t.device), scale[:, None].expand(L, d).clone()

    @torch.no_grad()
    def _fit_normalization(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.cfg.normalization == "none":
            return
        for (mean_buf, scale_buf), t in (((self.input_mean, self.input_scale), x),
                                         ((self.output_mean, self.output_scale), y)):
            mean, scale = self._fit_stats(t, self.cfg.normalization)
            mean_buf.copy_(mean)
            scale_buf.copy_(scale)

    # ------------------------------------------------------------ encode path
    _dense_codes_ok = True  # whether _decode_n / _decode_blocks take DenseCodes (a MOLT's transforms do not)

    def _codes_form(self) -> str:
        """"dense" when this step should hold its codes dense (``DenseCodes``, docs/DESIGN.md §17): a
        ReLU / JumpReLU dictionary on the default implementation, not tensor-parallel, whose previous
        batch's codes were at least as dense as the crossover of "codes" (``fastclt.ops.density``);
        else "sparse". The first batch is encoded sparse: its density decides the next one's form."""
        last = self._last_density
        if (last is None or self.cfg.activation not in ("relu", "jumprelu") or self.tp is not None
                or self.impl != "auto" or not self._dense_codes_ok):
            return "sparse"
        return "dense" if density.use_dense("codes", last, self.device, self._compute_dtype()) else "sparse"

    def _record_density(self, codes: list) -> None:
        """Remember the density of a batch's codes (stored entries over L·B·F) for ``_codes_form``."""
        if self.cfg.activation not in ("relu", "jumprelu") or not codes:
            return
        counted = [c for c in codes if c.is_dense and c._nnz is None]
        if counted:  # one device sync for all layers held dense
            for c, n in zip(counted, torch.stack([c.stored.count_nonzero() for c in counted]).tolist()):
                c._nnz = int(n)
        self._last_density = density.of_layers(codes, self.cfg.n_features)

    def _encode_n(self, xn: torch.Tensor, need_preacts: bool = False, form: str = "sparse"):
        """xn: [B, L, d_in] normalised → (codes: L SparseCodes, preacts: L × [B, F] or None);
        ``form="dense"``: ReLU / JumpReLU codes held dense (``DenseCodes``, see ``_codes_form``)."""
        cfg = self.cfg
        cdt = self._compute_dtype()
        W_enc, b_enc, theta = self._enc_layers()
        pre_bias = self._pre_bias()
        pre_bias = None if pre_bias is None else pre_bias.to(cdt)
        x_c = xn.to(cdt)
        W_c, b_c = W_enc.to(cdt), b_enc.to(cdt)
        L = self.n_layers
        tp = self.tp
        group = None if tp is None else tp.process_group  # selections run over all feature shards
        if tp is not None and pre_bias is not None:
            # The pre-bias is replicated; its gradient through the sharded encoder is a partial sum.
            x_c = tp.copy_in(x_c - pre_bias)
            pre_bias = None
        if cfg.activation == "batchtopk":
            across = getattr(cfg, "batchtopk_across_layers", False)
            if not need_preacts:  # fused: no dense [L, B, F] kept for autograd; one selection for all layers
                return ops.encode_layers(x_c, W_c, b_c, cfg.k, pre_bias, across_layers=across, group=group,
                                         impl=self.impl), None
            if across:
                h = ops.preacts_layers(x_c, W_c, b_c, pre_bias)
                return ops.batch_topk_layers(h, cfg.k, group=group, impl=self.impl), list(h.unbind(0))
        codes, hs = [], []
        # per-layer views by unbind (one stack in the backward), not by indexing: each ``W_c[l]``
        # would allocate and zero a full [L, F, d] gradient in the backward (L² traffic)
        xs, Ws, bs = _per_layer(x_c, 1), _per_layer(W_c), _per_layer(b_c)
        thetas = None if theta is None else _per_layer(theta.to(cdt))
        for l in range(L):
            out = ops.encode(xs[l], Ws[l], bs[l], activation=cfg.activation, k=cfg.k,
                             threshold=None if thetas is None else thetas[l],
                             bandwidth=cfg.jumprelu_bandwidth, pre_bias=pre_bias,
                             return_preacts=need_preacts, group=group, impl=self.impl, form=form)
            if need_preacts:
                codes.append(out[0])
                hs.append(out[1])
            else:
                codes.append(out)
        return codes, (hs if need_preacts else None)

    # ------------------------------------------------------------- public API
    def encode(self, x: torch.Tensor) -> Union[list, SparseCodes]:
        """x → sparse codes (see the subclass for shapes)."""
        xl = self._check_tensor(self._layered(x, "x"), "x", self.d_in, self._shape_msg(self.d_in))
        self._finite_rows(xl, names=("x",), allow_skip=False)
        codes, _ = self._encode_n(self._normalize(xl, "in"))
        return self._unlayered_codes(codes)

    def decode(self, codes, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """codes (from ``encode``) → reconstruction in the data's space (x only for a skip term)."""
        codes = self._layered_codes(codes)
        xn = None
        if x is not None:
            xl = self._check_tensor(self._layered(x, "x"), "x", self.d_in, self._shape_msg(self.d_in))
            xn = self._normalize(xl, "in")
        y = self._denormalize_out(self._decode_n(codes, xn, bias=True))
        return self._unlayered(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x → reconstruction ŷ (encode, then decode)."""
        xl = self._check_tensor(self._layered(x, "x"), "x", self.d_in, self._shape_msg(self.d_in))
        self._finite_rows(xl, names=("x",), allow_skip=False)
        xn = self._normalize(xl, "in")
        codes, _ = self._encode_n(xn, form=self._codes_form())
        self._record_density(codes)
        return self._unlayered(self._denormalize_out(self._decode_n(codes, xn, bias=True)))

    def decode_prefixes(self, x: torch.Tensor) -> torch.Tensor:
        """Matryoshka: x → [G, B, (L,) d_out], the reconstruction of every prefix in the data's space
        (prefix g uses the features i < m_g of every layer; the last one is ``forward(x)``)."""
        if self.cfg.matryoshka_loss_weights is None:
            raise ValueError("decode_prefixes: this model has no matryoshka_prefixes")
        xl = self._check_tensor(self._layered(x, "x"), "x", self.d_in, self._shape_msg(self.d_in))
        self._finite_rows(xl, names=("x",), allow_skip=False)
        xn = self._normalize(xl, "in")
        codes, _ = self._encode_n(xn)
        blocks, base = self._decode_blocks(codes, xn)
        y = self._denormalize_out(ops.prefix_sums(blocks, base))
        return y if x.dim() == 3 else y[:, :, 0]

    def loss(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, dead_mask: Optional[torch.Tensor] = None, *,
             sparsity_coef: Optional[float] = None, preact_coef: Optional[float] = None,
             defer_input_check: bool = False, dead_counts: Optional[list] = None) -> LossOutput:
        """The training loss of docs/DESIGN.md §4 on a batch (in normalised space).

        sparsity_coef / preact_coef override the config's λ / λ_p (the trainer ramps λ).
        defer_input_check: under nonfinite="error", do not wait for the device to check x and y for
        NaN / Inf: the check comes back as ``input_check``, and the caller runs its
        ``raise_if_nonfinite`` when it next reads from the device (the trainer: with the loss and
        gradient norm, one transfer per step).
        dead_counts: dead_mask's number of dead features per layer when the caller knows it without
        reading the device (the trainer, while no feature can have been silent for long enough: all
        zeros); AuxK then skips its own count (a device read).
        dead_mask: [L, F] bool (SAE: [F]) — adds AuxK for TopK/BatchTopK dictionaries.
        A Matryoshka config (``matryoshka_prefixes``) makes the reconstruction loss Σ_g w_g · loss of
        prefix g (docs/DESIGN.md §15); ``y_hat`` (then detached) and the per-layer metrics are the
        full dictionary's, AuxK fits its residual, and parts ``fvu_prefix{g}`` give the other
        prefixes' FVU.
        """
        cfg = self.cfg
        xl = self._check_tensor(self._layered(x, "x"), "x", self.d_in, self._shape_msg(self.d_in))
        yl = xl if y is None else self._check_tensor(self._layered(y, "y"), "y", self.d_out,
                                                     self._shape_msg(self.d_out))
        if yl.shape[0] != xl.shape[0]:
            raise ValueError(f"y: expected {xl.shape[0]} tokens like x, got {yl.shape[0]}")
        B0 = xl.shape[0]
        input_check = None
        if defer_input_check and cfg.nonfinite == "error":
            input_check, good = self._input_sums((xl, yl), ("x", "y")), None
        else:
            good = self._finite_rows(xl, yl, names=("x", "y"), allow_skip=True)
        if good is not None:
            xl, yl = xl[good], yl[good]
        skipped = B0 - xl.shape[0]
        xn, yn = self._normalize(xl, "in"), self._normalize(yl, "out")

        lam = cfg.sparsity_coef if sparsity_coef is None else sparsity_coef
        lam_p = cfg.preact_coef if preact_coef is None else preact_coef
        need_pre = cfg.activation == "jumprelu" and lam_p > 0
        with phase("encode"):
            codes, hs = self._encode_n(xn, need_preacts=need_pre, form=self._codes_form())
            self._record_density(codes)
        with phase("losses"):
            parts, total, y_hat, mse_l, fvu_l = self._loss_terms(xn, yn, codes, hs, dead_mask, lam, lam_p,
                                                                 dead_counts)
        fired, l0 = self.code_stats(codes)
        return LossOutput(loss=total, codes=codes, y_hat=y_hat, fired=fired, n_tokens=xn.shape[0],
                          skipped_tokens=skipped, parts=parts,
                          per_layer={"mse": mse_l.detach(), "fvu": fvu_l.detach(), "l0": l0}, input_check=input_check)

    def _loss_terms(self, xn, yn, codes, hs, dead_mask, lam, lam_p, dead_counts=None) -> tuple:
        """``loss``'s terms from the codes: (parts, total loss, ŷ, MSE per layer, FVU per layer)."""
        cfg = self.cfg
        weights = cfg.matryoshka_loss_weights
        # (an implementation without its own prefix_errors and total_variance uses the device's default ones)
        impl = self.impl if self.impl in ops.implementations("prefix_errors") else "auto"
        if weights is None:
            with phase("decode"):
                y_hat = self._decode_n(codes, xn, bias=True)
            # Σ_b ‖y − ŷ‖² and Σ_b ‖y − ȳ‖² per layer: on the kernels one read of y and ŷ for both
            # (where a difference, its square, their sums and the variance's passes would each read them)
            sq, tv = ops.fvu_terms(yn, y_hat, impl=self.impl if self.impl in ops.implementations("fvu_terms")
                                   else "auto")
        else:  # the squared errors of every prefix [G, L], for the cost of one decode
            with phase("decode"):
                blocks, base = self._decode_blocks(codes, xn)
            sq_prefix, y_hat = ops.prefix_errors(yn, base, blocks, impl=impl)
            sq = sq_prefix[-1]
            tv = ops.total_variance(yn, impl=impl)
        tv = tv.clamp_min(1e-12)
        B = max(xn.shape[0], 1)
        mse_l, fvu_l = sq / B, sq / tv
        recon = (fvu_l if cfg.reconstruction_loss == "fvu" else mse_l).sum()
        parts = {}
        if weights is not None:
            # Σ_g w_g · (reconstruction loss of prefix g); the last prefix is the full dictionary
            recon = recon * weights[-1]
            for g, w in enumerate(weights[:-1]):
                sq_g = sq_prefix[g]
                recon = recon + w * (sq_g / tv if cfg.reconstruction_loss == "fvu" else sq_g / B).sum()
                parts[f"fvu_prefix{g}"] = (sq_g / tv).mean()
        parts["reconstruction"] = recon
        total = recon
        for term in self.penalties(codes, hs, xn, yn, y_hat, dead_mask, lam, lam_p, parts, total_var=tv,
                                   dead_counts=dead_counts):
            total = total + term
        return parts, total, y_hat, mse_l, fvu_l

    def penalties(self, codes: list, hs: Optional[list], xn: torch.Tensor, yn: torch.Tensor, y_hat: torch.Tensor,
                  dead_mask: Optional[torch.Tensor], lam: float, lam_p: float, parts: dict,
                  total_var: Optional[torch.Tensor] = None, dead_counts: Optional[list] = None) -> list:
        """The terms ``loss`` adds to the reconstruction loss (docs/DESIGN.md §4), also used by the
        objectives that train through the LM: λ · sparsity (ReLU/JumpReLU), λ_p · the pre-activation
        loss (JumpReLU, ``hs``: the L dense pre-activations), AuxK weight · AuxK (TopK/BatchTopK with a
        ``dead_mask``). codes: L SparseCodes of xn [B, L, d_in]; yn, y_hat: the normalised target and
        prediction [B, L, d_out]; total_var: ``ops.total_variance(yn)`` when the caller has it;
        dead_counts: as ``loss`` takes it. Fills ``parts``; returns the weighted terms (scalar tensors) to add."""
        cfg = self.cfg
        terms = []
        norms = None
        tp = self.tp
        if cfg.activation in ("relu", "jumprelu") and lam > 0:
            norms = self.decoder_norms()
            sp = ops.sparsity_loss(codes, norms, cfg.sparsity, cfg.sparsity_c)
            if tp is not None:  # a sum over features: add the other shards' parts
                sp = tp.sum_loss(sp)
            parts["sparsity"] = sp
            terms.append(lam * sp)
        if cfg.activation == "jumprelu" and lam_p > 0 and hs is not None:
            norms = self.decoder_norms() if norms is None else norms
            _, _, theta = self._enc_layers()
            pre = sum(ops.preact_loss(hs[l], theta[l], norms[l]) for l in range(self.n_layers))
            if tp is not None:
                pre = tp.sum_loss(pre)
            parts["preact"] = pre
            terms.append(lam_p * pre)
        if dead_mask is not None and cfg.activation in ("topk", "batchtopk"):
            dead = self._layered_mask(dead_mask)
            aux = self._auxk(xn, yn, y_hat, dead, total_var, dead_counts)
            parts["auxk"] = aux
            if tp is not None:
                parts["dead_fraction"] = tp.sum_detached(dead.float().sum()) / (dead.numel() * tp.size)
            else:
                parts["dead_fraction"] = dead.float().mean()
            terms.append(cfg.auxk_coef * aux)
        return terms

    def code_stats(self, codes: list) -> tuple:
        """(fired [L, F] bool, l0 [L]) of a batch's codes; in train mode, a TopK/BatchTopK dictionary
        also updates its JumpReLU statistics (``to_jumprelu``)."""
        cfg = self.cfg
        fired, l0, fmin = self._code_stats(codes)
        if self.training and cfg.activation in ("topk", "batchtopk"):
            self._update_cut_stats(fmin)
        if self.tp is not None:
            l0 = self.tp.sum_detached(l0)
        return fired, l0

    # ------------------------------------------------- the trainer's batches
    def batch_inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """The positional arguments of ``loss``, ``initialize_from_data`` and ``calibrate_jumprelu`` for
        a batch as activation sources yield it — x [B, L, d_in], y [B, L, d_out] — so that a trainer
        treats every dictionary alike: (x, y) here; an SAE takes (x[:, 0],) and reconstructs it."""
        return x, y

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor, dead_mask: Optional[torch.Tensor] = None,
                   **kw) -> LossOutput:
        """``loss`` of a batch as activation sources yield it (see ``batch_inputs``); dead_mask [L, F]."""
        return self.loss(*self.batch_inputs(x, y), dead_mask=dead_mask, **kw)

    def check_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The ValueError ``loss`` raises under nonfinite="error" when a batch (as ``batch_loss`` takes
        it) holds NaN or Inf, else nothing (reads from the device). For a caller that deferred the
        check (``defer_input_check``) and met an error before reading it: a kernel refusing NaN."""
        xi, yi = self.batch_inputs(x, y)
        xl = self._layered(xi, "x")
        yl = xl if yi is None else self._layered(yi, "y")
        self._finite_rows(xl, yl, names=("x", "y"), allow_skip=False)

    def project_decoder_grads(self) -> None:
        """Call after the backward pass, before the optimizer step: a constraint on the decoder's
        gradient (an SAE with unit-norm decoder rows); nothing for other dictionaries."""

    def _auxk(self, xn, yn, y_hat, dead: torch.Tensor, total_var: Optional[torch.Tensor] = None,
              dead_counts: Optional[list] = None) -> torch.Tensor:
        """AuxK (docs/DESIGN.md §4): top-k_aux dead pre-activations, decoded WITHOUT b_dec or skip.
        dead_counts: the per-layer counts of ``dead`` when the caller knows them (unsharded models)."""
        tp = self.tp
        if dead_counts is not None and (tp is not None or len(dead_counts) != self.n_layers):
            raise ValueError(f"dead_counts: expected {self.n_layers} per-layer counts of an unsharded model, got "
                             f"{len(dead_counts)}" + (" under tensor parallelism" if tp is not None else ""))
        # per layer in one transfer (unsharded: a layer without dead features needs no selection)
        per_layer = dead_counts if dead_counts is not None else dead.sum(1).tolist() if tp is None else None
        n_dead = sum(per_layer) if tp is None else int(tp.sum_detached(dead.sum()))
        if n_dead == 0:
            return y_hat.new_zeros((), dtype=torch.float32)
        cdt = self._compute_dtype()
        W_enc, b_enc, _ = self._enc_layers()
        pre_bias = self._pre_bias()
        # b_dec enters an SAE's encoder as a pre-bias; AuxK must not train it through that path either.
        pre_bias = None if pre_bias is None else pre_bias.detach().to(cdt)
        k_aux = self.cfg.effective_k_aux
        group = None if tp is None else tp.process_group
        # layer views by unbind: W_enc[l] would backpropagate a zero-filled [L, F, d_in] per layer
        aux_codes = [empty_codes(x_l.to(cdt), W_l.shape[0]) if per_layer is not None and per_layer[l] == 0 else
                     ops.auxk_select(x_l.to(cdt), W_l.to(cdt), b_l.to(cdt), dead_l, k_aux, pre_bias, group=group,
                                     n_dead=None if per_layer is None else int(per_layer[l]), impl=self.impl)
                     for l, (x_l, W_l, b_l, dead_l) in enumerate(zip(xn.unbind(1), W_enc.unbind(0), b_enc.unbind(0),
                                                                     dead.unbind(0)))]
        e_hat = self._decode_n(aux_codes, xn, bias=False)  # xn: a MOLT's transforms read it
        residual = (yn - y_hat).detach()
        return ops.auxk_loss(e_hat, residual, yn, n_dead / self.n_layers, k_aux, total_var=total_var)

    def _layered_mask(self, dead_mask: torch.Tensor) -> torch.Tensor:
        L, F = self.n_layers, self.cfg.n_features
        if not isinstance(dead_mask, torch.Tensor) or dead_mask.dtype != torch.bool:
            raise TypeError(f"dead_mask: expected a bool tensor, got {getattr(dead_mask, 'dtype', type(dead_mask))}")
        m = dead_mask.reshape(L, F) if dead_mask.numel() == L * F else None
        if m is None:
            raise ValueError(f"dead_mask: expected {self._mask_shape_msg()}, got {tuple(dead_mask.shape)}")
        if m.device != self.device:
            raise ValueError(f"dead_mask: is on {m.device} but the model is on {self.device}")
        return m

    @torch.no_grad()
    def _code_stats(self, codes: list) -> tuple:
        """(fired [L, F] bool: features with an active (> 0) entry, l0 [L] fp32: active entries per
        token, fmin [L, F] fp32: each feature's smallest active value, +inf where none; None for codes
        held dense) of the L layers' codes, with a fixed number of ops whatever L and no synchronisation
        with the device: the op ``code_stats`` (codes held dense: per-layer reductions of their [B, F]
        tensors)."""
        B = codes[0].batch_size
        if all(c.is_dense for c in codes):
            # from the [B, F] codes (ReLU / JumpReLU only: no fmin, which only TopK/BatchTopK read)
            active = [c.dense.detach() > 0 for c in codes]
            fired = torch.stack([a.any(0) for a in active])
            l0 = torch.stack([a.count_nonzero() for a in active]).float() / max(B, 1)
            return fired, l0, None
        impl = self.impl if self.impl in ops.implementations("code_stats") else "auto"
        fmin, active = ops.code_stats(codes, self.cfg.n_features, impl=impl)
        fired = torch.isfinite(fmin)
        l0 = active.float() / B if B else torch.zeros(len(codes), device=fmin.device)
        return fired, l0, fmin

    # ------------------------------------------------- BatchTopK → JumpReLU
    @torch.no_grad()
    def _update_cut_stats(self, fmin: torch.Tensor, momentum: float = 0.99) -> None:
        """fmin [L, F]: each feature's smallest active value this step (+inf where none, ``_code_stats``)."""
        seen = torch.isfinite(fmin)
        self.feature_cut_sum += torch.where(seen, fmin, 0.0)
        self.feature_cut_count += seen
        cut = fmin.amin(1)  # the smallest kept value per layer (+inf when none)
        if self.tp is not None:  # the smallest kept value over all shards
            cut = self.tp.min_detached(cut)
        cut = torch.where(torch.isfinite(cut), cut, torch.zeros_like(cut))
        first = self.cut_steps == 0
        self.cut_mean.copy_(torch.where(first, cut, momentum * self.cut_mean + (1 - momentum) * cut))
        self.cut_steps += 1

    @torch.no_grad()
    def jumprelu_thresholds(self, min_count: int = 100) -> torch.Tensor:
        """[L, F] thresholds for inference: per feature (mean of its smallest kept values) where the
        feature was seen in at least ``min_count`` steps, else the layer's running cut."""
        if self.cfg.activation not in ("topk", "batchtopk"):
            raise ValueError(f"activation: only a TopK/BatchTopK dictionary converts to JumpReLU, "
                             f"not {self.cfg.activation!r}")
        if int(self.cut_steps) == 0:
            raise ValueError("jumprelu_thresholds: no training batches seen yet "
                             "(statistics are collected by loss() in train mode)")
        per_feature = self.feature_cut_sum / self.feature_cut_count.clamp_min(1)
        layer = self.cut_mean[:, None].expand_as(per_feature)
        return torch.where(self.feature_cut_count >= min_count, per_feature, layer)

    def to_jumprelu(self, min_count: int = 100):
        """A JumpReLU copy of this TopK/BatchTopK dictionary (docs/DESIGN.md §3), for inference, with the
        thresholds of the training statistics (see ``calibrate_jumprelu`` for thresholds set on
        held-out activations)."""
        return self._jumprelu_copy(self.jumprelu_thresholds(min_count))

    def _jumprelu_copy(self, theta: torch.Tensor):
        """A JumpReLU copy of this TopK/BatchTopK dictionary with thresholds ``theta`` [L, F]."""
        changes = {"activation": "jumprelu", "threshold_param": "raw"}
        if hasattr(self.cfg, "batchtopk_across_layers"):
            changes["batchtopk_across_layers"] = False
        new = type(self)(self.cfg.replace(**changes))
        new.to(self.device)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith(("cut_", "feature_cut"))}
        new.load_state_dict(state, strict=False)
        with torch.no_grad():
            new._parameters["threshold"].copy_(theta.reshape(new._parameters["threshold"].shape))
        return new

    @torch.no_grad()
    def calibrate_jumprelu(self, x: torch.Tensor, y: Optional[torch.Tensor] = None,
                           target_l0: Union[None, float, list] = None, batch_size: int = 4096) -> "JumpReLUCalibration":
        """Convert this TopK/BatchTopK dictionary to JumpReLU with thresholds set on held-out activations.

        x: [N, L, d_in] (SAE: [N, d_in]) activations not used in training; y: [N, L, d_out] targets
        (SAE: defaults to x; a CLT without y reports no FVU). One threshold θ_l per layer, shared by
        the layer's features, is chosen so that the JumpReLU L0 of layer l on these N tokens is
        ``target_l0`` (a number, or one per layer) — by default the L0 this TopK/BatchTopK model has
        on the same tokens, encoded ``batch_size`` tokens at a time. With n_l = round(target_l0 · N)
        and v_1 ≥ v_2 ≥ … the positive pre-activations of layer l over all tokens and features,
        θ_l = (v_{n_l} + v_{n_l + 1}) / 2, so exactly n_l of them satisfy h > θ_l (barring ties);
        θ_l = 0 when fewer than n_l + 1 are positive. Returns a ``JumpReLUCalibration`` holding the
        new model, θ, and L0 and FVU (in the data's space, Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over all tokens)
        before and after.
        """
        cfg = self.cfg
        if cfg.activation not in ("topk", "batchtopk"):
            raise ValueError(f"activation: only a TopK/BatchTopK dictionary is calibrated to JumpReLU, "
                             f"not {cfg.activation!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        L = self.n_layers
        xl = self._check_tensor(self._layered(x, "x"), "x", self.d_in, self._shape_msg(self.d_in))
        if y is None and isinstance(cfg, SAEConfig):  # an SAE reconstructs its input
            y = x
        yl = None
        if y is not None:
            yl = self._check_tensor(self._layered(y, "y"), "y", self.d_out, self._shape_msg(self.d_out))
            if yl.shape[0] != xl.shape[0]:
                raise ValueError(f"y: expected {xl.shape[0]} tokens like x, got {yl.shape[0]}")
        N = xl.shape[0]
        if N == 0:
            raise ValueError("x: expected at least one token of calibration data")
        self._finite_rows(xl, *([] if yl is None else [yl]), names=("x", "y"), allow_skip=False)
        was_training = self.training
        self.eval()
        try:
            before = _calibration_pass(self, xl, yl, batch_size)
            if target_l0 is None:
                targets = before[0]
            else:
                targets = [target_l0] * L if isinstance(target_l0, (int, float)) else list(target_l0)
                if len(targets) != L or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not
                                            0 <= t <= cfg.n_features for t in targets):
                    raise ValueError(f"target_l0: expected a number in [0, n_features={cfg.n_features}] or a list of "
                                     f"{L} of them, got {target_l0!r}")
                targets = [float(t) for t in targets]
            counts = [int(round(t * N)) for t in targets]
            theta = _thresholds_for_counts(self, xl, counts, batch_size)
            new = self._jumprelu_copy(theta[:, None].expand(L, cfg.n_features))
            new.impl = self.impl
            after = _calibration_pass(new, xl, yl, batch_size)
        finally:
            self.train(was_training)
        return JumpReLUCalibration(model=new, threshold=theta.tolist(), target_l0=targets, n_tokens=N,
                                   l0_before=before[0], l0_after=after[0], fvu_before=before[1], fvu_after=after[1])

    # ------------------------------------------------------ tensor parallel
    def feature_axes(self) -> dict:
        """{state_dict key: the axis that indexes features, or None when replicated}: how a tensor-
        parallel shard (F/tp features of every layer) slices and merges this model's state."""
        return {name: self._feature_axis(name) for name in self.state_dict()}

    def _feature_axis(self, name: str) -> Optional[int]:
        raise NotImplementedError

    # ---------------------------------------------------------- save / load
    def save_pretrained(self, path: Union[str, Path]) -> None:
        """Write ``config.json`` + ``model.safetensors`` into folder ``path`` (atomically; no pickle)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        digest = save_tensors(path / WEIGHTS_FILE, dict(self.state_dict()),
                              metadata={"format": "pt", "model_type": type(self).__name__})
        write_json(path / CONFIG_FILE, {"model_type": type(self).__name__, "format_version": FORMAT_VERSION,
                                        "config": self.cfg.to_dict(), "weights": WEIGHTS_FILE,
                                        "weights_sha256": digest})

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu", verify: bool = True):
        """Load a model written by ``save_pretrained``; a missing, corrupt or mismatched file is a
        clear error (CheckpointError, a ValueError), never silently used.

        Nothing is allocated before the checks: config.json (size-capped) is type-checked, the
        weights file must lie inside the folder (no absolute paths, no ``..``, no links leading out),
        its SHA-256 must match the one config.json records, and the names, shapes and dtypes in its
        safetensors header must be those the config implies (checked against a model built on the
        meta device). ``verify=False`` skips the SHA-256 — the only way to load a folder whose
        config.json records none; the header checks still apply.
        """
        from fastclt.interop._io import inside, read_config
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"path: {path} is not a folder written by save_pretrained")
        meta = read_config(path / CONFIG_FILE, "config.json")
        if "config" not in meta:
            raise CheckpointError(f"config.json: {path / CONFIG_FILE} has no 'config' object")
        if meta.get("model_type") != cls.__name__:
            raise CheckpointError(f"config.json: model_type {meta.get('model_type')!r} cannot be loaded as "
                                  f"{cls.__name__}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"config.json: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}")
        try:
            cfg = cls.config_class.from_dict(meta["config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json: {path / CONFIG_FILE}: 'config' is not a valid "
                                  f"{cls.config_class.__name__} ({e})") from e
        weights = inside(path, meta.get("weights", WEIGHTS_FILE), "config.json: 'weights'")
        digest = meta.get("weights_sha256")
        if verify:
            if digest is None:
                raise CheckpointError(f"config.json: {path / CONFIG_FILE} records no weights_sha256, so "
                                      f"{weights.name} cannot be verified; pass verify=False to load it anyway")
            if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
                raise CheckpointError(f"config.json: 'weights_sha256' is {digest!r}, expected 64 hex digits")
        with torch.device("meta"):  # the names, shapes and dtypes the config implies, without memory
            expected = cls(cfg).state_dict()
        _check_header(read_header(weights, "weights")[0], expected, str(weights))
        tensors = load_tensors(weights, digest if verify else None, device=device)
        model = cls(cfg).to(device)
        model.load_checked_state(tensors, source=str(weights))
        return model

    def load_checked_state(self, tensors: dict, source: str = "state") -> None:
        """Load ``tensors`` after checking names, shapes and dtypes against this model's config."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{source}: does not match the config: missing {missing}, unexpected {unexpected}")
        for name, ref in expected.items():
            got = tensors[name]
            if tuple(got.shape) != tuple(ref.shape):
                raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(got.shape)}, the config "
                                      f"implies {tuple(ref.shape)}")
            if got.dtype != ref.dtype:
                raise CheckpointError(f"{source}: tensor {name!r} has dtype {got.dtype}, the config "
                                      f"implies {ref.dtype}")
        self.load_state_dict(tensors, strict=True)

    # ------------------------------------------------------------ overrides
    def _shape_msg(self, width: int) -> str:
        return f"[B, {self.n_layers}, {width}]"

    def _mask_shape_msg(self) -> str:
        return f"[{self.n_layers}, {self.cfg.n_features}]"

    def _unlayered_shape(self, t: torch.Tensor):
        return t.shape

    def _layered(self, t, name: str):
        return t

    def _unlayered(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def _layered_codes(self, codes):
        return codes

    def _unlayered_codes(self, codes):
        return codes


def _check_header(found: dict, expected: dict, source: str) -> None:
    """A safetensors header ({name: (shape, dtype name)}, ``read_header``) holds exactly the tensors
    of ``expected`` (a state dict, e.g. on the meta device) with their shapes and dtypes."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: does not match the config: missing {missing}, unexpected {unexpected}")
    for name, ref in expected.items():
        shape, dt = found[name]
        if tuple(shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(shape)}, the config implies "
                                  f"{tuple(ref.shape)}")
        if _ST_NAMES.get(dt) != ref.dtype:
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {dt}, the config implies {ref.dtype}")


_ST_NAMES = {"F32": torch.float32, "BF16": torch.bfloat16, "F64": torch.float64, "F16": torch.float16,
             "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool, "U8": torch.uint8}


@dataclass
class JumpReLUCalibration:
    """What ``calibrate_jumprelu`` returns: the JumpReLU ``model``, its per-layer ``threshold`` θ_l,
    the ``target_l0`` per layer, and per-layer L0 and FVU of the TopK/BatchTopK model (``*_before``)
    and of the JumpReLU model (``*_after``) on the ``n_tokens`` calibration tokens (FVU: None
    when no targets were given)."""

    model: SparseDictionary
    threshold: list
    target_l0: list
    n_tokens: int
    l0_before: list
    l0_after: list
    fvu_before: Optional[list]
    fvu_after: Optional[list]

    def summary(self) -> dict:
        """The numbers as a JSON-ready dict (the model left out)."""
        return {k: getattr(self, k) for k in ("n_tokens", "threshold", "target_l0", "l0_before", "l0_after",
                                              "fvu_before", "fvu_after")}


def _calibration_pass(model: SparseDictionary, x: torch.Tensor, y: Optional[torch.Tensor], batch_size: int):
    """(L0 per layer, FVU per layer in the data's space or None) of ``model`` over x, y: [N, L, d]."""
    L = model.n_layers
    l0 = torch.zeros(L, dtype=torch.float64)
    sq = torch.zeros(L, dtype=torch.float64)
    s1 = torch.zeros(L, model.d_out, dtype=torch.float64)
    s2 = torch.zeros(L, dtype=torch.float64)
    N = x.shape[0]
    for i in range(0, N, batch_size):
        xb = x[i:i + batch_size]
        xn = model._normalize(xb, "in")
        codes, _ = model._encode_n(xn)
        l0 += torch.stack([(c.value > 0).sum() for c in codes]).double().cpu()
        if y is not None:
            yb = y[i:i + batch_size].double()
            y_hat = model._denormalize_out(model._decode_n(codes, xn, bias=True)).double()
            sq += (yb - y_hat).pow(2).sum((0, 2)).cpu()
            s1 += yb.sum(0).cpu()
            s2 += yb.pow(2).sum((0, 2)).cpu()
    fvu = None
    if y is not None:
        tv = (s2 - s1.pow(2).sum(1) / N).clamp_min(1e-30)
        fvu = (sq / tv).tolist()
    return (l0 / N).tolist(), fvu


def _thresholds_for_counts(model: SparseDictionary, x: torch.Tensor, counts: list, batch_size: int) -> torch.Tensor:
    """θ [L] in the parameter dtype: per layer, a cut with exactly counts[l] pre-activations above it
    (see ``calibrate_jumprelu``), from a running top-(n + 1) of the positive pre-activations."""
    W_enc, b_enc, _ = model._enc_layers()
    pre_bias = model._pre_bias()
    dt = model.param_dtype
    L = model.n_layers
    best = [torch.empty(0, dtype=dt, device=model.device) for _ in range(L)]
    for i in range(0, x.shape[0], batch_size):
        xn = model._normalize(x[i:i + batch_size], "in")
        for l in range(L):
            keep = counts[l] + 1
            h = ops.preacts(xn[:, l].to(dt), W_enc[l].to(dt), b_enc[l].to(dt),
                            None if pre_bias is None else pre_bias.to(dt)).flatten()
            floor = best[l].min() if best[l].numel() >= keep else 0
            cand = torch.cat([best[l], h[h > floor]])
            best[l] = cand.topk(keep).values if cand.numel() > keep else cand
    theta = torch.zeros(L, dtype=dt)
    for l, n in enumerate(counts):
        v = best[l].sort(descending=True).values.cpu()
        if v.numel() <= n:  # fewer positive pre-activations than wanted: every one of them fires
            continue
        if n == 0:
            theta[l] = v[0]
            continue
        hi, lo = v[n - 1], v[n]
        mid = ((hi.double() + lo.double()) / 2).to(dt)
        # the midpoint rounded to the parameter dtype may land on hi (adjacent values): cut at lo
        theta[l] = mid if lo <= mid < hi else lo
    return theta.to(model.device)
