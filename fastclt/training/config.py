"""The trainer's configuration: ``model`` (a CLTConfig / SAEConfig / MOLTConfig), ``train``, ``data``, ``eval``,
``checkpoint``, ``log`` and ``out_dir``.

Sources, later ones winning: the defaults here < ``--config FILE.yaml`` (yaml.safe_load, nested
sections) < command-line ``--section.key value`` (or ``--key value`` when the key names one field
of one section). Values on the command line are parsed as YAML scalars (``true``, ``1e-3``,
``null``, ``[0, 1]``). Everything is validated before any work starts; errors name the field.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from fastclt.config import CONFIG_KINDS, CLTConfig

__all__ = ["ConfigError", "RunConfig", "TrainSection", "DataSection", "EvalSection", "CheckpointSection",
           "LogSection", "load_config", "help_text", "RUN_CONTROL_KEYS"]


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


# Defaults of the trainer's model (differ from CLTConfig's, so that a bare run is small).
MODEL_DEFAULTS = dict(n_layers=4, d_in=32, d_out=32, n_features=128, activation="batchtopk", k=4)
MODEL_KINDS = tuple(CONFIG_KINDS)  # clt, sae, molt


@dataclass
class TrainSection:
    """Optimisation."""
    steps: int = 500                  # total optimizer steps (the LR and λ schedules span these)
    max_steps: Optional[int] = None   # stop after this step (a simulated preemption; schedules unchanged)
    batch_size: int = 512             # tokens per micro-batch per data-parallel rank
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 3e-3                  # Adam learning rate (peak)
    lr_warmup_steps: int = 50         # linear LR warm-up from 0
    lr_decay: str = "cosine"          # cosine | linear | none (to lr·lr_min_ratio at the last step)
    lr_min_ratio: float = 0.1         # final LR as a fraction of train.lr
    beta1: float = 0.9                # Adam β1
    beta2: float = 0.999              # Adam β2
    adam_eps: float = 1e-8            # Adam ε
    clip_grad: float = 1.0            # max global gradient norm (0: off)
    sparsity_warmup_steps: int = 200  # λ ramps linearly from 0 over these steps (ReLU/JumpReLU)
    dead_tokens: int = 50_000         # a feature is dead after this many tokens without firing (AuxK)
    init_samples: int = 4096          # tokens used by initialize_from_data (b_dec, normalisation)
    init_fire_rate: Optional[float] = None  # JumpReLU: set b_enc so each feature fires on this fraction
    tp: int = 1                       # tensor-parallel size (features sharded); dp = world / tp
    device: str = "auto"              # auto | cpu | cuda
    autocast: str = "auto"            # auto (bf16 on CUDA, off on CPU) | bf16 | none
    seed: int = 0                     # model init and data order (dp ranks offset it)
    impl: str = "auto"                # auto (Triton/CUDA kernels on GPUs, C++ kernels on CPUs) | cuda | triton | cpu | reference
    eval_batches: int = 8             # batches for the final summary
    eval_every: int = 0               # steps between replacement-model evaluations (section eval), also at step 0; 0: at the end only
    calibrate_jumprelu: bool = False  # TopK/BatchTopK: also save model_jumprelu/, thresholds set on held-out batches
    calibrate_batches: int = 16       # batches of the stream after training that calibrate_jumprelu uses


@dataclass
class DataSection:
    """Where activations come from."""
    source: str = "synthetic"         # synthetic | shards | hf
    # synthetic: a CLT-shaped generative model with planted features (fastclt.training.synthetic)
    n_true: int = 64                  # planted features per source layer
    true_l0: float = 3.0              # mean active planted features per token per layer
    noise: float = 0.02               # Gaussian noise std (per coordinate, relative to the signal)
    # shards: a folder written by `python -m fastclt.extract` (manifest.json + safetensors/.npy)
    path: Optional[str] = None        # shards folder (with manifest.json)
    shuffle: bool = True              # shards: seeded shard and token order per epoch; hf: the shuffle buffer (false: stream order)
    prefetch: int = 4                 # batches prepared ahead in a background thread (pinned memory)
    # hf: on-the-fly extraction from a local Hugging Face causal LM (also used by fastclt.extract)
    model: Optional[str] = None       # local folder (nothing is downloaded)
    layers: Optional[list] = None     # block indices (default: the first model.n_layers blocks)
    input_hook: Optional[str] = None  # x = mlp_in (MLP input) | resid_mid (pre-MLP norm input); default mlp_in (shards: theirs)
    tokens: str = "random"            # random | text file | .jsonl/.json/.parquet/.csv/.arrow/save_to_disk folder (datasets) | .npy ids
    text_field: str = "text"          # dataset column holding the text
    ctx_len: int = 64                 # tokens per sequence
    prepend_bos: bool = False         # every sequence starts with the LM's BOS token
    exclude_bos: bool = True          # drop positions holding the BOS token (their activations are outliers)
    seqs_per_forward: int = 8         # sequences per LM forward pass
    buffer_batches: int = 8           # hf with shuffle: micro-batches of tokens in the seeded shuffle buffer
    hf_dtype: str = "float32"         # dtype of the host model (float32 | bfloat16)


@dataclass
class EvalSection:
    """The replacement model (fastclt.eval: KL, CE recovered, FVU, L0) at train.eval_every and at the end."""
    lm: Optional[str] = None          # local LM folder for data.source shards (hf: data.model is used)
    tokens: Optional[str] = None      # token source (default: data.tokens for hf, the shards' recorded one)
    n_seqs: int = 16                  # sequences: the corpus's last ones (random: another seed); 0 = no evaluation
    ctx_len: Optional[int] = None     # tokens per sequence (default: data.ctx_len / the shards')
    batch_size: int = 4               # sequences per forward pass
    per_layer: bool = True            # also splice / ablate each layer alone (2 more passes per layer)


@dataclass
class CheckpointSection:
    """Checkpoints (per-rank safetensors + JSON, atomic, SHA-256 verified)."""
    every: int = 500                  # steps between checkpoints (0: only at the end / on signals)
    keep: int = 2                     # checkpoints kept
    resume: str = "auto"              # auto (newest intact one in out_dir) | never (error if any) | PATH


@dataclass
class LogSection:
    """Metrics (rank 0): metrics.jsonl, progress bar, summary.json / summary.png."""
    every: int = 1                    # steps between JSONL lines (and progress-bar updates)
    progress: bool = True             # tqdm bar (rank 0)
    wandb: bool = False               # log to Weights & Biases when installed
    tensorboard: bool = False         # log to TensorBoard when installed
    plot: bool = True                 # summary.png (needs matplotlib)
    project: str = "fastclt"          # wandb project


MODEL_HELP = {
    "kind": "clt (CLT; n_layers 1 = per-layer transcoder) | sae (on the first layer's input) | molt (MOLTs)",
    "activation": "topk | batchtopk | jumprelu | relu",
    "k": "active features per token per layer (TopK), their batch mean (BatchTopK)",
    "normalization": "none | mean_std | sqrt_d (statistics from the first batches)",
    "threshold_init": "JumpReLU θ at the start",
    "jumprelu_bandwidth": "JumpReLU straight-through bandwidth ε",
    "sparsity": "tanh | l1 (ReLU/JumpReLU penalty)",
    "sparsity_coef": "λ after its warm-up (train.sparsity_warmup_steps)",
    "preact_coef": "λ_p of the pre-activation loss (JumpReLU)",
    "k_aux": "AuxK features per token (default d_out/2)",
    "auxk_coef": "AuxK weight",
    "nonfinite": "NaN/Inf in activations: error | skip | ignore",
    "dtype": "parameter dtype (float32 master weights; bf16 autocast on CUDA)",
    "n_layers": "layers covered (CLT)",
    "d_in": "input width",
    "d_out": "target width (CLT)",
    "n_features": "features per layer (sharded over train.tp)",
    "decoder_tying": "none | per_source | per_target (CLT)",
    "batchtopk_across_layers": "BatchTopK over all layers together (CLT)",
    "skip_connection": "W_skip per layer (CLT)",
    "cross_layer": "false: a per-layer transcoder set (L independent transcoders; decoder_tying none)",
    "unit_norm_decoder": "SAE: unit-norm decoder rows",
    "matryoshka_prefixes": "Matryoshka prefix ends [m_1, ..., n_features] (SAE, CLT)",
    "matryoshka_weights": "loss weight of each prefix (default 1/G each)",
    "ranks": "MOLT: rank of each rank group (default 512, 256, ... scaled to the width)",
    "rank_counts": "MOLT: transforms per rank group (default N, 2N, 4N, ...; sum n_features)",
    "output_bias": "MOLT: a per-layer output bias",
}
# Model fields the trainer records from its data source (the LM, its blocks, the input hook), not options.
RECORDED_MODEL_FIELDS = {"lm_name": "data.model", "lm_layers": "data.layers", "input_hook": "data.input_hook"}

SECTIONS = {"train": TrainSection, "data": DataSection, "eval": EvalSection, "checkpoint": CheckpointSection,
            "log": LogSection}

# Fields that may differ between a run and its resumption (everything else must match).
RUN_CONTROL_KEYS = {"train.max_steps", "train.device", "train.impl", "train.eval_batches", "train.eval_every",
                    "train.calibrate_jumprelu", "train.calibrate_batches",
                    "eval.lm", "eval.tokens", "eval.n_seqs", "eval.ctx_len", "eval.batch_size", "eval.per_layer",
                    "data.prefetch",
                    "checkpoint.every", "checkpoint.keep", "checkpoint.resume", "log.every", "log.progress",
                    "log.wandb", "log.tensorboard", "log.plot", "log.project", "out_dir"}


@dataclass
class RunConfig:
    model: dict = field(default_factory=dict)  # kind ("clt" | "sae" | "molt") + CLTConfig/SAEConfig/MOLTConfig fields
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    out_dir: str = "runs/default"

    @property
    def kind(self) -> str:
        return self.model.get("kind", "clt")

    def model_config(self):
        """The CLTConfig / SAEConfig / MOLTConfig of the FULL (unsharded) model."""
        kw = {k: v for k, v in self.model.items() if k != "kind"}
        cls = CONFIG_KINDS.get(self.kind, CLTConfig)
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.{e}") from e

    def to_dict(self) -> dict:
        d = {"model": dict(self.model), "out_dir": self.out_dir}
        for name in SECTIONS:
            d[name] = dataclasses.asdict(getattr(self, name))
        return d

    def fingerprint(self) -> dict:
        """The settings a checkpoint must agree with to be resumed."""
        flat = _flatten(self.to_dict())
        return {k: v for k, v in flat.items() if k not in RUN_CONTROL_KEYS}

    def save(self, out_dir: Path) -> None:
        from fastclt.checkpoint import atomic_write, write_json
        d = self.to_dict()
        write_json(out_dir / "config.json", d)

        def _w(tmp):
            with open(tmp, "w") as f:
                yaml.safe_dump(d, f, sort_keys=False)
        atomic_write(out_dir / "config.yaml", _w)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k in ("model", *SECTIONS):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _model_fields() -> dict:
    """{name: default} over every model kind's config, with the trainer's defaults."""
    out = {"kind": "clt"}
    for cls in CONFIG_KINDS.values():
        for f in dataclasses.fields(cls):
            if f.name not in out and f.name not in RECORDED_MODEL_FIELDS:
                out[f.name] = f.default
    out.update(MODEL_DEFAULTS)
    return out


def _coerce(key: str, value: Any, ftype) -> Any:
    """Check ``value`` against a dataclass field's type; errors name ``key``."""
    origin = typing.get_origin(ftype)
    args = typing.get_args(ftype)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        ftype = [a for a in args if a is not type(None)][0]
        origin = typing.get_origin(ftype)
    if ftype is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if ftype is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if ftype is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if ftype is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if ftype is list or origin is list:
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        if isinstance(value, str):
            try:
                value = [int(v) for v in value.split(",") if v.strip()]
            except ValueError as e:
                raise ConfigError(f"{key}: expected a list of integers like [0, 1, 2], got {value!r}") from e
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise ConfigError(f"{key}: expected a list of integers like [0, 1, 2], got {value!r}")
    return value


def _set(cfg: RunConfig, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) == 1:
        if key == "out_dir":
            cfg.out_dir = _coerce(key, value, str)
            return
        hits = [s for s, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
        if key in _model_fields():
            hits.append("model")
        if len(hits) != 1:
            where = f"is in several sections {hits}" if hits else "is not a known option"
            raise ConfigError(f"{key}: {where}; write it as section.key (see --help)")
        parts = [hits[0], key]
    if len(parts) != 2:
        raise ConfigError(f"{key}: expected section.key, e.g. train.lr")
    section, name = parts
    if section == "model":
        fields = _model_fields()
        if name in RECORDED_MODEL_FIELDS:
            raise ConfigError(f"model.{name}: recorded by the trainer from the data source; set "
                              f"{RECORDED_MODEL_FIELDS[name]} (data.source hf) or write the shards with it")
        if name not in fields:
            raise ConfigError(f"model.{name}: not a model option; known: {sorted(fields)}")
        cfg.model[name] = value
        return
    if section not in SECTIONS:
        raise ConfigError(f"{key}: unknown section {section!r}; expected one of {['model', *SECTIONS]}")
    ftypes = {f.name: f.type for f in dataclasses.fields(SECTIONS[section])}
    if name not in ftypes:
        raise ConfigError(f"{key}: unknown option; {section} has {sorted(ftypes)}")
    hints = typing.get_type_hints(SECTIONS[section])
    setattr(getattr(cfg, section), name, _coerce(key, value, hints[name]))


def _parse_scalar(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return _number(value)


def _number(value: Any) -> Any:
    """YAML 1.1 reads '1e-3' as a string; take it as the number it means."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(argv: list) -> RunConfig:
    """argv (without the program name) → a validated RunConfig."""
    cfg = RunConfig(model=dict(MODEL_DEFAULTS))
    pairs = []
    i = 0
    config_file = None
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"{arg}: expected --key value (see --help)")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{key}: missing a value")
            text = argv[i + 1]
            i += 2
        key = key.replace("-", "_")
        if key == "config":
            config_file = text
        else:
            pairs.append((key, _parse_scalar(text)))
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config: file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path} is not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config: {path} must hold a mapping of sections, got {type(data).__name__}")
        for section, body in data.items():
            if section == "out_dir":
                _set(cfg, "out_dir", body)
            elif isinstance(body, dict):
                for k, v in body.items():
                    if isinstance(v, str) and k not in ("path", "model", "tokens", "lm"):
                        v = _number(v)
                    _set(cfg, f"{section}.{k}", v)
            else:
                raise ConfigError(f"{section}: expected a section mapping (model, train, data, eval, checkpoint, log) "
                                  f"or out_dir, got {body!r}")
    for key, value in pairs:
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def _pos(key: str, v, zero_ok: bool = False) -> None:
    if v is None or v < 0 or (v == 0 and not zero_ok):
        raise ConfigError(f"{key}: expected a {'non-negative' if zero_ok else 'positive'} value, got {v!r}")


def validate(cfg: RunConfig) -> None:
    """Check every field (and their combinations); raise ConfigError naming the first bad one."""
    if cfg.kind not in MODEL_KINDS:
        raise ConfigError(f"model.kind: expected one of {MODEL_KINDS}, got {cfg.kind!r}")
    if cfg.kind == "sae":
        for k in ("n_layers", "d_out", "decoder_tying", "batchtopk_across_layers", "feature_affine", "skip_connection",
                  "cross_layer"):
            if k in cfg.model and k not in MODEL_DEFAULTS:
                raise ConfigError(f"model.{k}: not an SAE option (model.kind sae)")
        for k in ("n_layers", "d_out"):
            cfg.model.pop(k, None)
    own = {f.name for f in dataclasses.fields(CONFIG_KINDS[cfg.kind])}
    for k in cfg.model:
        if k != "kind" and k not in own:
            raise ConfigError(f"model.{k}: not an option of model.kind {cfg.kind}")
    mc = cfg.model_config()
    if cfg.train.tp > 1 and (cfg.kind == "molt" or getattr(mc, "matryoshka_prefixes", None)):
        raise ConfigError(f"train.tp: {'a MOLT' if cfg.kind == 'molt' else 'a Matryoshka model'} trains without "
                          f"tensor parallelism (train.tp = 1; data parallelism works), got {cfg.train.tp}")
    t, d, c, lg = cfg.train, cfg.data, cfg.checkpoint, cfg.log
    for key in ("steps", "batch_size", "grad_accum", "tp", "dead_tokens", "init_samples", "eval_batches", "eval_every"):
        _pos(f"train.{key}", getattr(t, key), zero_ok=key in ("eval_batches", "eval_every"))
    if t.max_steps is not None:
        _pos("train.max_steps", t.max_steps)
    _pos("train.lr", t.lr)
    _pos("train.lr_warmup_steps", t.lr_warmup_steps, zero_ok=True)
    _pos("train.sparsity_warmup_steps", t.sparsity_warmup_steps, zero_ok=True)
    _pos("train.clip_grad", t.clip_grad, zero_ok=True)
    _pos("train.adam_eps", t.adam_eps)
    if not 0 <= t.lr_min_ratio <= 1:
        raise ConfigError(f"train.lr_min_ratio: expected a fraction in [0, 1], got {t.lr_min_ratio}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(t, key) < 1:
            raise ConfigError(f"train.{key}: expected a value in [0, 1), got {getattr(t, key)}")
    _pos("train.calibrate_batches", t.calibrate_batches)
    if t.calibrate_jumprelu and mc.activation not in ("topk", "batchtopk"):
        raise ConfigError(f"train.calibrate_jumprelu: converts TopK/BatchTopK models, not {mc.activation!r}")
    if t.init_fire_rate is not None:
        if mc.activation != "jumprelu":
            raise ConfigError(f"train.init_fire_rate: only JumpReLU models use it, not {mc.activation!r}")
        if not 0 < t.init_fire_rate < 1:
            raise ConfigError(f"train.init_fire_rate: expected a fraction in (0, 1), got {t.init_fire_rate}")
    for key, options in (("lr_decay", ("cosine", "linear", "none")), ("device", ("auto", "cpu", "cuda")),
                         ("autocast", ("auto", "bf16", "none")),
                         ("impl", ("auto", "cuda", "triton", "cpu", "reference"))):
        if getattr(t, key) not in options:
            raise ConfigError(f"train.{key}: expected one of {options}, got {getattr(t, key)!r}")
    if mc.n_features % t.tp:
        raise ConfigError(f"model.n_features: {mc.n_features} is not divisible by train.tp={t.tp}")
    f_local = mc.n_features // t.tp
    if mc.activation in ("topk", "batchtopk") and mc.k > f_local:
        raise ConfigError(f"model.k: {mc.k} exceeds the {f_local} features of one tensor-parallel shard "
                          f"(n_features / train.tp)")
    if mc.activation in ("topk", "batchtopk") and mc.effective_k_aux > f_local:
        raise ConfigError(f"model.k_aux: {mc.effective_k_aux} exceeds the {f_local} features of one "
                          f"tensor-parallel shard; set model.k_aux")
    if d.source not in ("synthetic", "shards", "hf"):
        raise ConfigError(f"data.source: expected one of ('synthetic', 'shards', 'hf'), got {d.source!r}")
    _pos("data.n_true", d.n_true)
    _pos("data.true_l0", d.true_l0)
    _pos("data.noise", d.noise, zero_ok=True)
    _pos("data.ctx_len", d.ctx_len)
    _pos("data.prefetch", d.prefetch, zero_ok=True)
    _pos("data.seqs_per_forward", d.seqs_per_forward)
    _pos("data.buffer_batches", d.buffer_batches)
    if d.input_hook is not None and d.input_hook not in ("mlp_in", "resid_mid"):
        raise ConfigError(f"data.input_hook: expected mlp_in or resid_mid, got {d.input_hook!r}")
    if d.prepend_bos and d.ctx_len < 2:
        raise ConfigError("data.ctx_len: a sequence with a prepended BOS needs ctx_len >= 2")
    if d.source == "synthetic" and d.true_l0 > d.n_true:
        raise ConfigError(f"data.true_l0: {d.true_l0} exceeds data.n_true={d.n_true}")
    if d.source == "shards":
        if not d.path:
            raise ConfigError("data.path: data.source shards needs the folder written by python -m fastclt.extract")
        if not (Path(d.path) / "manifest.json").is_file():
            raise ConfigError(f"data.path: {d.path} has no manifest.json (write shards with python -m fastclt.extract)")
    if d.source == "hf":
        if not d.model:
            raise ConfigError("data.model: data.source hf needs a local Hugging Face model folder")
        if not Path(d.model).is_dir():
            raise ConfigError(f"data.model: {d.model} is not a folder (nothing is downloaded; give a local path)")
        if d.tokens != "random" and not Path(d.tokens).exists():
            raise ConfigError(f"data.tokens: {d.tokens} is neither 'random' nor an existing file or dataset folder")
    if d.hf_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"data.hf_dtype: expected float32 or bfloat16, got {d.hf_dtype!r}")
    if d.layers is not None:
        n_layers = 1 if cfg.kind == "sae" else mc.n_layers
        if len(d.layers) != n_layers:
            raise ConfigError(f"data.layers: {len(d.layers)} layers given but the model has {n_layers}")
        if d.layers[0] < 0 or any(b <= a for a, b in zip(d.layers, d.layers[1:])):
            raise ConfigError(f"data.layers: expected strictly increasing block indices >= 0, got {d.layers}")
    e = cfg.eval
    _pos("eval.n_seqs", e.n_seqs, zero_ok=True)
    _pos("eval.batch_size", e.batch_size)
    if e.ctx_len is not None:
        _pos("eval.ctx_len", e.ctx_len)
        if e.ctx_len < 2:
            raise ConfigError(f"eval.ctx_len: next-token losses need at least 2 tokens per sequence, got {e.ctx_len}")
    if e.lm is not None:
        if d.source != "shards":
            raise ConfigError(f"eval.lm: only data.source shards takes it (hf evaluates on data.model; synthetic "
                              f"data has no LM), got data.source {d.source}")
        if not Path(e.lm).is_dir():
            raise ConfigError(f"eval.lm: {e.lm} is not a folder (nothing is downloaded; give a local LM folder)")
    if e.tokens is not None and e.tokens != "random" and not Path(e.tokens).exists():
        raise ConfigError(f"eval.tokens: {e.tokens} is neither 'random' nor an existing file or dataset folder")
    _pos("checkpoint.every", c.every, zero_ok=True)
    _pos("checkpoint.keep", c.keep)
    if c.resume not in ("auto", "never") and not Path(c.resume).is_dir():
        raise ConfigError(f"checkpoint.resume: {c.resume} is neither auto, never, nor a checkpoint folder")
    _pos("log.every", lg.every)
    if not cfg.out_dir:
        raise ConfigError("out_dir: expected a folder path")


def help_text() -> str:
    lines = ["usage: [torchrun --nproc_per_node=N] python -m fastclt.train [--config FILE.yaml] "
             "[--section.key VALUE ...]",
             "",
             "Options (section.key  default  — meaning). A key that names one field may be given without its",
             "section (--max_steps 5). Values are YAML scalars: true/false, 1e-3, null, [0, 1].",
             "", f"  {'--config FILE.yaml':<36} {'None':<12} nested sections model/train/data/checkpoint/log, out_dir",
             f"  {'--out_dir DIR':<36} {RunConfig().out_dir!r:<12} config, metrics, checkpoints, model/, summary",
             "",
             "model (fastclt.CLTConfig fields; model.kind sae: fastclt.SAEConfig on the first layer's input; "
             "model.kind molt: fastclt.MOLTConfig):"]
    for name, default in _model_fields().items():
        lines.append(f"  {'--model.' + name:<36} {default!r:<12} {MODEL_HELP.get(name, '')}".rstrip())
    for section, cls in SECTIONS.items():
        lines.append("")
        lines.append(f"{section}: {cls.__doc__.strip() if cls.__doc__ else ''}")
        src = _comments(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {'--' + section + '.' + f.name:<36} {default!r:<12} {src.get(f.name, '')}".rstrip())
    lines += ["", "Token source of data.source hf (and python -m fastclt.extract): data.tokens random draws seeded",
              "token ids; a text file is tokenized with the model folder's tokenizer; .jsonl/.json/.parquet/.csv/",
              ".arrow files and save_to_disk folders are read with the datasets library (column data.text_field,",
              "or input_ids); a .npy holds token ids (1-D: a stream, 2-D: one sequence per row). See docs/TRAINING.md."]
    return "\n".join(lines)


def _comments(cls) -> dict:
    import inspect
    out = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return out
    for line in src.splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith(("#", '"')):
            name = line.split(":")[0].strip()
            out[name] = line.split("#", 1)[1].strip()
    return out
