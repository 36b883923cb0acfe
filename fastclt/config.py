"""Model configurations (docs/DESIGN.md §10): ``CLTConfig``, ``SAEConfig`` and ``MOLTConfig``.

Both are plain dataclasses validated on construction; every error names the field and what was
expected. ``to_dict`` / ``from_dict`` round-trip through JSON (``config.json`` of a saved model).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from fastclt.names import ACTIVATIONS, NORMALIZATIONS, SELECTIONS, SPARSITY_KINDS, TYINGS

__all__ = ["CLTConfig", "SAEConfig", "MOLTConfig", "CONFIG_KINDS", "ACTIVATIONS", "TYINGS", "NORMALIZATIONS",
           "INPUT_HOOKS"]

THRESHOLD_PARAMS = ("raw", "log")
RECONSTRUCTION = ("mse", "fvu")
NONFINITE = ("error", "skip", "ignore")
DTYPES = ("float32", "bfloat16", "float64")
INPUT_HOOKS = ("mlp_in", "resid_mid")


def _choice(name: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def _nonneg_float(name: str, value: Any, strictly_positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    if value != value or value < 0 or (strictly_positive and value == 0):
        raise ValueError(f"{name}: expected a {'positive' if strictly_positive else 'non-negative'} number, "
                         f"got {value}")


@dataclass
class _DictionaryConfig:
    """Fields shared by every dictionary (see CLTConfig for their meaning)."""

    activation: str = "jumprelu"
    k: int = 16
    normalization: str = "none"
    threshold_init: float = 0.05
    init_fire_rate: Optional[float] = 0.01
    threshold_param: str = "raw"
    jumprelu_bandwidth: float = 0.05
    sparsity: str = "tanh"
    sparsity_coef: float = 1e-3
    sparsity_c: float = 1.0
    preact_coef: float = 0.0
    reconstruction_loss: str = "mse"
    k_aux: Optional[int] = None
    auxk_coef: float = 1 / 32
    nonfinite: str = "error"
    dtype: str = "float32"
    # What the dictionary was trained on (recorded by the trainer; read by fastclt.replacement):
    lm_name: Optional[str] = None
    lm_layers: Optional[list] = None
    input_hook: str = "mlp_in"

    def _validate_common(self, n_features: int, d_for_kaux: int) -> None:
        _positive_int("n_features", n_features)
        _choice("activation", self.activation, ACTIVATIONS)
        _positive_int("k", self.k)
        if self.activation in SELECTIONS and self.k > n_features:
            raise ValueError(f"k: expected 1 <= k <= n_features={n_features}, got {self.k}")
        _choice("normalization", self.normalization, NORMALIZATIONS)
        _nonneg_float("threshold_init", self.threshold_init, strictly_positive=self.threshold_param == "log")
        if self.init_fire_rate is not None:
            _nonneg_float("init_fire_rate", self.init_fire_rate, strictly_positive=True)
            if not self.init_fire_rate < 1:
                raise ValueError(f"init_fire_rate: expected a fraction in (0, 1) or None, got {self.init_fire_rate}")
        _choice("threshold_param", self.threshold_param, THRESHOLD_PARAMS)
        _nonneg_float("jumprelu_bandwidth", self.jumprelu_bandwidth, strictly_positive=True)
        _choice("sparsity", self.sparsity, SPARSITY_KINDS)
        _nonneg_float("sparsity_coef", self.sparsity_coef)
        _nonneg_float("sparsity_c", self.sparsity_c, strictly_positive=True)
        _nonneg_float("preact_coef", self.preact_coef)
        _choice("reconstruction_loss", self.reconstruction_loss, RECONSTRUCTION)
        if self.k_aux is not None:
            _positive_int("k_aux", self.k_aux)
            if self.k_aux > n_features:
                raise ValueError(f"k_aux: expected 1 <= k_aux <= n_features={n_features}, got {self.k_aux}")
        _nonneg_float("auxk_coef", self.auxk_coef)
        _choice("nonfinite", self.nonfinite, NONFINITE)
        _choice("dtype", self.dtype, DTYPES)
        self._validate_lm_metadata()

    def _validate_lm_metadata(self) -> None:
        if self.lm_name is not None and (not isinstance(self.lm_name, str) or not self.lm_name):
            raise TypeError(f"lm_name: expected a non-empty string (a local path or model name) or None, "
                            f"got {self.lm_name!r}")
        _choice("input_hook", self.input_hook, INPUT_HOOKS)
        if self.lm_layers is None:
            return
        n = self._n_dictionary_layers()
        layers = self.lm_layers
        if isinstance(layers, tuple):
            layers = self.lm_layers = list(layers)
        if not isinstance(layers, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in layers):
            raise TypeError(f"lm_layers: expected a list of {n} ints (the LM block of each dictionary layer), "
                            f"got {layers!r}")
        if len(layers) != n:
            raise ValueError(f"lm_layers: expected {n} LM block indices (one per dictionary layer), got {len(layers)}")
        if layers[0] < 0 or any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"lm_layers: expected strictly increasing block indices >= 0, got {layers}")

    def _validate_matryoshka(self) -> None:
        """Matryoshka prefix ends m_1 < … < m_G = n_features and their loss weights (docs/DESIGN.md §15)."""
        p, w = self.matryoshka_prefixes, self.matryoshka_weights
        if p is None:
            if w is not None:
                raise ValueError("matryoshka_weights: given without matryoshka_prefixes (the prefix ends they weight)")
            return
        if isinstance(p, tuple):
            p = self.matryoshka_prefixes = list(p)
        if not isinstance(p, list) or not p or any(isinstance(v, bool) or not isinstance(v, int) for v in p):
            raise TypeError(f"matryoshka_prefixes: expected a non-empty list of ints [m_1, ..., m_G] (prefix ends of "
                            f"the feature index), got {p!r}")
        if p[0] < 1 or any(b <= a for a, b in zip(p, p[1:])):
            raise ValueError(f"matryoshka_prefixes: expected strictly increasing prefix ends >= 1, got {p}")
        if p[-1] != self.n_features:
            raise ValueError(f"matryoshka_prefixes: the last prefix end must be n_features={self.n_features} (the "
                             f"full dictionary), got {p[-1]}")
        if w is None:
            return
        if isinstance(w, tuple):
            w = self.matryoshka_weights = list(w)
        if not isinstance(w, list) or len(w) != len(p):
            raise ValueError(f"matryoshka_weights: expected a list of {len(p)} numbers (one per prefix), got {w!r}")
        for v in w:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"matryoshka_weights: expected finite numbers >= 0, got {w}")
        if not any(v > 0 for v in w):
            raise ValueError(f"matryoshka_weights: expected at least one positive weight, got {w}")
        self.matryoshka_weights = [float(v) for v in w]

    @property
    def matryoshka_loss_weights(self) -> Optional[list]:
        """The weight w_g of each prefix's reconstruction loss (default 1/G each), or None."""
        p = getattr(self, "matryoshka_prefixes", None)
        if p is None:
            return None
        w = self.matryoshka_weights
        return list(w) if w is not None else [1.0 / len(p)] * len(p)

    @property
    def effective_k_aux(self) -> int:
        """k_aux, defaulting to half the output width (at most n_features)."""
        if self.k_aux is not None:
            return self.k_aux
        return max(1, min(self._aux_width() // 2, self.n_features))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise TypeError(f"config: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass
class CLTConfig(_DictionaryConfig):
    """Cross-layer transcoder (``n_layers=1``: a per-layer transcoder). docs/DESIGN.md §2–§5, §10.

    n_layers, d_in, d_out, n_features (per layer): sizes.
    activation: "jumprelu" | "relu" | "topk" | "batchtopk"; k: active features per token per layer
        (TopK), or their batch average (BatchTopK); batchtopk_across_layers: select k·B·L over all layers.
    decoder_tying: "none" (one decoder per source→target pair) | "per_source" | "per_target".
    feature_affine: per-target offset/scale g_t of tied decoders. skip_connection: W_skip per layer.
    normalization: "none" | "mean_std" | "sqrt_d" (statistics from ``initialize_from_data``).
    threshold_init / threshold_param ("raw" θ ≥ 0 or "log θ") / jumprelu_bandwidth ε: JumpReLU.
    init_fire_rate: ReLU/JumpReLU start — ``initialize_from_data`` sets b_enc so that each feature
        fires on this fraction of the sample (initial density; L0 ≈ init_fire_rate · F per layer);
        None leaves b_enc at 0 (docs/DESIGN.md §5).
    sparsity ("tanh" | "l1"), sparsity_coef λ, sparsity_c c: the sparsity penalty (ReLU/JumpReLU).
    preact_coef λ_p: the pre-activation loss (JumpReLU). reconstruction_loss: Σ_l "mse" or "fvu".
    k_aux (default d_out/2), auxk_coef: AuxK (TopK/BatchTopK, when a dead mask is given).
    nonfinite: NaN/Inf in x or y → "error", "skip" (drop those tokens, counted) or "ignore".
    dtype: parameter dtype.
    cross_layer: True — every source layer s writes to every target t ≥ s; False — a set of L
        independent per-layer transcoders (source l writes only target l; decoder_tying must be
        "none"; W_dec is one [L, F, d_out] parameter).
    lm_name: the language model (a local folder or a model name) the dictionary was trained on.
    lm_layers: the LM block index of each dictionary layer (n_layers of them, strictly increasing).
    input_hook: what x_l is — "mlp_in" (the MLP module's input, after the pre-MLP norm) or
        "resid_mid" (the residual stream before that norm). The target is always the MLP module's
        output. The trainer records these three from its data source; ``fastclt.replacement``
        splices the dictionary back at these places.
    matryoshka_prefixes: nested dictionaries — increasing prefix ends m_1 < … < m_G = n_features of
        each source layer's feature index; prefix g reconstructs from features i < m_g alone and the
        loss is Σ_g w_g · (reconstruction loss of prefix g) (docs/DESIGN.md §15). None: a plain model.
    matryoshka_weights: w_g per prefix (default 1/G each).
    """

    n_layers: int = 1
    d_in: int = 768
    d_out: int = 768
    n_features: int = 4096
    decoder_tying: str = "none"
    batchtopk_across_layers: bool = False
    feature_affine: bool = False
    skip_connection: bool = False
    cross_layer: bool = True
    matryoshka_prefixes: Optional[list] = None
    matryoshka_weights: Optional[list] = None

    def __post_init__(self) -> None:
        _positive_int("n_layers", self.n_layers)
        _positive_int("d_in", self.d_in)
        _positive_int("d_out", self.d_out)
        self._validate_common(self.n_features, self.d_out)
        _choice("decoder_tying", self.decoder_tying, TYINGS)
        for name in ("batchtopk_across_layers", "feature_affine", "skip_connection", "cross_layer"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if not self.cross_layer and self.decoder_tying != "none":
            raise ValueError(f"decoder_tying: a per-layer transcoder set (cross_layer=False) has one decoder per "
                             f"layer and no tying; expected 'none', got {self.decoder_tying!r}")
        if self.feature_affine and self.decoder_tying == "none":
            raise ValueError("feature_affine: only tied decoders (decoder_tying 'per_source' or 'per_target') take it")
        if self.batchtopk_across_layers and self.activation != "batchtopk":
            raise ValueError(f"batchtopk_across_layers: needs activation 'batchtopk', got {self.activation!r}")
        self._validate_matryoshka()

    def _aux_width(self) -> int:
        return self.d_out

    def _n_dictionary_layers(self) -> int:
        return self.n_layers


@dataclass
class SAEConfig(_DictionaryConfig):
    """Sparse autoencoder (docs/DESIGN.md §2): ``a = act(W_enc (x − b_dec) + b_enc)``, ``x̂ = W_decᵀ a + b_dec``.

    Fields as CLTConfig; d_in is both input and output width. The decoder rows are kept at unit
    norm by ``post_step()`` when ``unit_norm_decoder``. b_dec_init: "geometric_median" | "mean" |
    "zeros" (used by ``initialize_from_data``). lm_name / lm_layers (one block) / input_hook: as
    CLTConfig; an SAE reconstructs the input hook's activation. matryoshka_prefixes /
    matryoshka_weights: as CLTConfig.
    """

    d_in: int = 768
    n_features: int = 16384
    activation: str = "topk"
    k: int = 32
    unit_norm_decoder: bool = True
    b_dec_init: str = "geometric_median"
    matryoshka_prefixes: Optional[list] = None
    matryoshka_weights: Optional[list] = None

    def __post_init__(self) -> None:
        _positive_int("d_in", self.d_in)
        self._validate_common(self.n_features, self.d_in)
        _choice("b_dec_init", self.b_dec_init, ("geometric_median", "mean", "zeros"))
        if not isinstance(self.unit_norm_decoder, bool):
            raise TypeError(f"unit_norm_decoder: expected a bool, got {self.unit_norm_decoder!r}")
        self._validate_matryoshka()

    def _aux_width(self) -> int:
        return self.d_in

    def _n_dictionary_layers(self) -> int:
        return 1


@dataclass
class MOLTConfig(_DictionaryConfig):
    """Sparse mixture of linear transforms (MOLT), one per layer of ``n_layers`` MLP layers: input
    x_l (the MLP input, like a transcoder's) → the MLP output (docs/DESIGN.md §16):

        g_{l,i} = act(e_{l,i} · x_l + b_{l,i})          ŷ_l = Σ_i g_{l,i} · U_{l,i} (V_{l,i} x_l)  (+ b_dec[l])

    n_layers, d_in, d_out: sizes. n_features: T, transforms per layer (the gates are the "features").
    ranks: the rank of each rank group (transforms are ordered by group); default r_0, r_0/2, …,
        r_0/16 with r_0 the largest power of two <= 2/3 · min(d_in, d_out) (512 at d = 768).
    rank_counts: transforms per group, summing to n_features; default N, 2N, 4N, … (proportional to
        1 : 2 : 4 : …, the first group taking what the rounding leaves), i.e. N = T / 31 for 5 groups.
    output_bias: a per-layer output bias b_dec.
    activation: the gate φ — "jumprelu" (value-passing, g = z · 1[z > θ]), "topk", "batchtopk" or
        "relu"; k, threshold_*, jumprelu_bandwidth as CLTConfig. init_fire_rate: as CLTConfig, the
        fraction of (token, gate) pairs open after ``initialize_from_data`` (default 0.02). sparsity / sparsity_coef /
        sparsity_c: the penalty on g_i · ‖U_i V_i‖_F (tanh or L1). preact_coef, k_aux / auxk_coef,
        normalization, reconstruction_loss, nonfinite, dtype, lm_name / lm_layers / input_hook: as
        CLTConfig.
    """

    n_layers: int = 1
    d_in: int = 768
    d_out: int = 768
    n_features: int = 992
    ranks: Optional[list] = None
    rank_counts: Optional[list] = None
    output_bias: bool = True
    init_fire_rate: Optional[float] = 0.02

    def __post_init__(self) -> None:
        _positive_int("n_layers", self.n_layers)
        _positive_int("d_in", self.d_in)
        _positive_int("d_out", self.d_out)
        self._validate_common(self.n_features, self.d_out)
        if not isinstance(self.output_bias, bool):
            raise TypeError(f"output_bias: expected a bool, got {self.output_bias!r}")
        width = min(self.d_in, self.d_out)
        ranks = self.ranks
        if ranks is not None:
            if isinstance(ranks, tuple):
                ranks = self.ranks = list(ranks)
            if not isinstance(ranks, list) or not ranks or any(isinstance(r, bool) or not isinstance(r, int)
                                                               for r in ranks):
                raise TypeError(f"ranks: expected a non-empty list of ints (the rank of each group), got {ranks!r}")
            bad = [r for r in ranks if not 1 <= r <= width]
            if bad:
                raise ValueError(f"ranks: every rank must be in [1, min(d_in, d_out)={width}] (a transform of "
                                 f"d_out x d_in has no higher rank), got {bad}")
        n_groups = len(self.group_ranks)
        counts = self.rank_counts
        if counts is not None:
            if isinstance(counts, tuple):
                counts = self.rank_counts = list(counts)
            if (not isinstance(counts, list) or any(isinstance(c, bool) or not isinstance(c, int) or c < 0
                                                    for c in counts)):
                raise TypeError(f"rank_counts: expected a list of ints >= 0 (transforms per rank group), "
                                f"got {counts!r}")
            if len(counts) != n_groups:
                raise ValueError(f"rank_counts: expected {n_groups} counts (one per rank group), got {len(counts)}")
            if sum(counts) != self.n_features:
                raise ValueError(f"rank_counts: must sum to n_features={self.n_features}, got {sum(counts)}")

    @property
    def group_ranks(self) -> list:
        """The rank of each group (``ranks``, or the default r_0, r_0/2, …, r_0/16)."""
        if self.ranks is not None:
            return list(self.ranks)
        r0 = 1 << max(0, (max(1, (2 * min(self.d_in, self.d_out)) // 3)).bit_length() - 1)
        return sorted({max(1, r0 >> j) for j in range(5)}, reverse=True)

    @property
    def rank_groups(self) -> tuple:
        """((count, rank), ...) of the non-empty groups, in the order the transforms are stored."""
        ranks = self.group_ranks
        counts = self.rank_counts
        if counts is None:
            G, T = len(ranks), self.n_features
            total = (1 << G) - 1
            counts = [T * (1 << j) // total for j in range(G)]
            counts[0] += T - sum(counts)
        return tuple((int(c), int(r)) for c, r in zip(counts, ranks) if c > 0)

    @property
    def total_rank(self) -> int:
        """R = Σ_i r_i: rows of each layer's packed U [R, d_out] and V [R, d_in]."""
        return sum(c * r for c, r in self.rank_groups)

    def step_flops(self, tokens: int, l0: float) -> float:
        """Counted FLOPs of a training step on ``tokens`` tokens with ``l0`` active transforms per
        token per layer (of mean rank): the gate GEMM 2·T·d_in and per active transform
        2·r̄·(d_in + d_out), each per layer; backward ≈ 2 × forward."""
        mean_rank = self.total_rank / self.n_features
        per_token = 2.0 * self.n_features * self.d_in + 2.0 * l0 * mean_rank * (self.d_in + self.d_out)
        return 3.0 * tokens * self.n_layers * per_token

    def _aux_width(self) -> int:
        return self.d_out

    def _n_dictionary_layers(self) -> int:
        return self.n_layers


# The model kinds (the trainer's ``model.kind``) and their configurations.
CONFIG_KINDS = {"clt": CLTConfig, "sae": SAEConfig, "molt": MOLTConfig}
