"""The trainer's configuration: ``model`` (``kind`` + the fields of a CLTConfig / SAEConfig / MOLTConfig),
``train``, ``data``, ``eval``, ``checkpoint``, ``log`` and ``out_dir``.

Sources, later ones winning: the defaults here < ``--config FILE.yaml`` (nested sections) <
command-line ``--section.key value`` (or ``--key value`` when the key names one field of one
section). The command line is parsed by jsonargparse from these dataclasses (values are YAML:
``true``, ``1e-3``, ``null``, ``[0, 1]``; the help text is each field's docstring); ``load_config``
adds the ``--key`` shorthand and turns the parser's complaints into errors that name the field.
Everything is validated before any work starts (``validate``).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml

from fastclt.config import CONFIG_KINDS

__all__ = ["ConfigError", "RunConfig", "ModelSection", "TrainSection", "DataSection", "EvalSection",
           "CheckpointSection", "LogSection", "load_config", "build_parser", "validate",
           "RUN_CONTROL_KEYS"]


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


MODEL_KINDS = tuple(CONFIG_KINDS)  # clt, sae, molt


@dataclass
class ModelSection:
    """The dictionary: the fields of fastclt.CLTConfig (kind clt), SAEConfig (kind sae) or MOLTConfig (kind molt)

    An SAE reads the first layer's input. A field left at null takes the kind's default; fields of
    the other kinds must stay null."""
    kind: str = "clt"
    """clt (a cross-layer transcoder; n_layers 1 = a per-layer transcoder) | sae | molt (MOLTs)"""
    n_layers: Optional[int] = None
    """layers covered (CLT, MOLT; default 4; an SAE has one)"""
    d_in: int = 32
    """input width"""
    d_out: Optional[int] = None
    """target width (CLT, MOLT; default d_in)"""
    n_features: int = 128
    """features per layer (sharded over train.tp)"""
    activation: str = "batchtopk"
    """topk | batchtopk | jumprelu | relu"""
    k: int = 4
    """active features per token per layer (TopK), their batch mean (BatchTopK)"""
    normalization: str = "none"
    """none | mean_std | sqrt_d (statistics from the first train.init_samples tokens)"""
    threshold_init: float = 0.05
    """JumpReLU θ at the start"""
    init_fire_rate: Optional[float] = None
    """ReLU/JumpReLU start: b_enc set so each feature fires on this fraction of the first train.init_samples
    tokens (default 0.01; MOLT 0.02); 0: b_enc stays 0"""
    threshold_param: str = "raw"
    """JumpReLU θ learned as raw θ >= 0 | log θ"""
    jumprelu_bandwidth: float = 0.05
    """JumpReLU straight-through bandwidth ε"""
    sparsity: str = "tanh"
    """tanh | l1 (the ReLU/JumpReLU penalty)"""
    sparsity_coef: float = 1e-3
    """λ after its warm-up (train.sparsity_warmup_steps)"""
    sparsity_c: float = 1.0
    """c of the tanh penalty"""
    preact_coef: float = 0.0
    """λ_p of the pre-activation loss (JumpReLU)"""
    reconstruction_loss: str = "mse"
    """mse | fvu, summed over layers"""
    k_aux: Optional[int] = None
    """AuxK features per token (default: half the output width)"""
    auxk_coef: float = 1 / 32
    """AuxK weight"""
    nonfinite: str = "error"
    """NaN/Inf in activations: error | skip | ignore"""
    dtype: str = "float32"
    """parameter dtype: float32 | bfloat16 | float64 (bf16 autocast on CUDA keeps fp32 master weights)"""
    decoder_tying: Optional[str] = None
    """CLT: none | per_source | per_target (default none)"""
    batchtopk_across_layers: Optional[bool] = None
    """CLT: BatchTopK over all layers together (default false)"""
    feature_affine: Optional[bool] = None
    """CLT with a tied decoder: per-target offset and scale (default false)"""
    skip_connection: Optional[bool] = None
    """CLT: W_skip per layer (default false)"""
    cross_layer: Optional[bool] = None
    """CLT: false = a per-layer transcoder set, L independent transcoders (default true)"""
    unit_norm_decoder: Optional[bool] = None
    """SAE: unit-norm decoder rows (default true)"""
    b_dec_init: Optional[str] = None
    """SAE: geometric_median | mean | zeros (default geometric_median)"""
    matryoshka_prefixes: Optional[List[int]] = None
    """SAE, CLT: Matryoshka prefix ends [m_1, ..., n_features] (default: none, a plain dictionary)"""
    matryoshka_weights: Optional[List[float]] = None
    """SAE, CLT: loss weight of each Matryoshka prefix (default 1/G each)"""
    ranks: Optional[List[int]] = None
    """MOLT: rank of each rank group (default r_0, r_0/2, ..., r_0/16 with r_0 <= 2/3 of the width)"""
    rank_counts: Optional[List[int]] = None
    """MOLT: transforms per rank group (default N, 2N, 4N, ...; they sum to n_features)"""
    output_bias: Optional[bool] = None
    """MOLT: a per-layer output bias (default true)"""

    def config_class(self):
        if self.kind not in CONFIG_KINDS:
            raise ConfigError(f"model.kind: expected one of {MODEL_KINDS}, got {self.kind!r}")
        return CONFIG_KINDS[self.kind]

    def config_kwargs(self) -> dict:
        """The CLTConfig / SAEConfig / MOLTConfig keyword arguments: the fields of this kind that are set, with the
        trainer's defaults for n_layers (4) and d_out (d_in). A field of the other kind that is set
        is an error, except SAE values that say what an SAE is anyway (n_layers 1, d_out = d_in)."""
        own = {f.name for f in dataclasses.fields(self.config_class())}
        kw = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "kind" or v is None:
                continue
            if f.name in own:
                kw[f.name] = None if (f.name, v) == ("init_fire_rate", 0) else v
            elif not (self.kind == "sae" and (f.name, v) in (("n_layers", 1), ("d_out", self.d_in))):
                other = {"sae": "an SAE", "molt": "a MOLT"}.get(self.kind, "a CLT") + f" (model.kind {self.kind})"
                raise ConfigError(f"model.{f.name}: {v!r} is not an option of {other}")
        if self.kind != "sae":
            kw.setdefault("n_layers", 4)
            kw.setdefault("d_out", self.d_in)
        return kw

    def resolved(self) -> dict:
        """Every field, those of this kind filled in (the explicit defaults of the config class);
        two sections that build the same model resolve alike."""
        cfg = self.config_class()(**self.config_kwargs())
        out = {"kind": self.kind}
        for f in dataclasses.fields(self):
            if f.name != "kind":
                out[f.name] = getattr(cfg, f.name, None)
        return out


@dataclass
class TrainSection:
    """Optimisation"""
    steps: int = 500
    """total optimizer steps (the LR and λ schedules span these)"""
    max_steps: Optional[int] = None
    """stop after this step (a simulated preemption; schedules unchanged)"""
    batch_size: int = 512
    """tokens per micro-batch per data-parallel rank"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    lr: float = 3e-3
    """Adam learning rate (peak)"""
    lr_warmup_steps: int = 50
    """linear LR warm-up from 0"""
    lr_decay: str = "cosine"
    """cosine | linear | none (to lr·lr_min_ratio at the last step)"""
    lr_min_ratio: float = 0.1
    """final LR as a fraction of train.lr"""
    beta1: float = 0.9
    """Adam β1"""
    beta2: float = 0.999
    """Adam β2"""
    adam_eps: float = 1e-8
    """Adam ε"""
    optimizer_moments: str = "float32"
    """dtype of Adam's two moments: float32 (torch's fused Adam; its moments take the parameters' dtype) |
    bfloat16 (fastclt.training.optim.Adam: half the optimizer's memory, the update computed in fp32, the
    moments stored with seeded stochastic rounding). Fixed for a run: a checkpoint resumes with its own"""
    clip_grad: float = 1.0
    """max global gradient norm (0: off)"""
    sparsity_warmup_steps: int = 200
    """λ ramps linearly from 0 over these steps (ReLU/JumpReLU)"""
    dead_tokens: int = 50_000
    """a feature is dead after this many tokens without firing (AuxK)"""
    init_samples: int = 4096
    """tokens used by initialize_from_data (b_dec, normalisation)"""
    init_fire_rate: Optional[float] = None
    """ReLU/JumpReLU: set b_enc so each feature fires on this fraction of the init sample (None: the
    model section's init_fire_rate)"""
    tp: int = 1
    """tensor-parallel size (features sharded); dp = world size / tp"""
    device: str = "auto"
    """auto | cpu | cuda"""
    autocast: str = "auto"
    """auto (bf16 on CUDA, off on CPU) | bf16 | none"""
    seed: int = 0
    """model init and data order (dp ranks offset it)"""
    impl: str = "auto"
    """auto (Triton/CUDA kernels on GPUs, C++ kernels on CPUs) | cuda | triton | cpu | reference"""
    eval_batches: int = 8
    """batches for the final summary"""
    eval_every: int = 0
    """steps between replacement-model evaluations (section eval), also at step 0; 0: at the end only"""
    calibrate_jumprelu: bool = False
    """TopK/BatchTopK: also save model_jumprelu/, thresholds set on held-out batches"""
    calibrate_batches: int = 16
    """batches of the stream after training that calibrate_jumprelu uses"""
    objective: str = "reconstruction"
    """reconstruction (of the MLP outputs) | kl | kl+fvu | ce: the dictionary spliced into the frozen LM of
    data.source hf, trained on the LM's next-token KL to the clean LM, KL + fvu_coef·FVU, or cross-entropy
    (batch_size tokens = whole sequences of data.ctx_len; docs/TRAINING_THROUGH_LM.md)"""
    fvu_coef: float = 1.0
    """objective kl+fvu: the weight of the FVU summed over layers"""
    lm_checkpoint: bool = True
    """objectives kl/kl+fvu/ce: recompute the LM blocks' modules in the backward (activation checkpointing)"""
    cuda_graph: bool = False
    """capture the step's forward and backward in a CUDA graph once and replay it (one launch instead of
    hundreds: for small shapes, where launching dominates). Needs CUDA, train.tp 1, grad_accum 1, the
    reconstruction objective, TopK or per-layer BatchTopK and model.nonfinite error; the selections run
    their sync-free references; steps while a feature may be dead (AuxK) run eagerly
    (fastclt/training/graphed.py)"""
    init_from: Optional[str] = None
    """a trained model folder (save_pretrained, e.g. runs/x/model): start from its weights instead of
    initialising from data (e.g. reconstruction pre-training, then objective kl)"""


@dataclass
class DataSection:
    """Activations: synthetic (planted features) | shards (python -m fastclt.extract) | hf (on the fly)

    hf extracts them from a local Hugging Face causal LM while training."""
    source: str = "synthetic"
    """synthetic | shards | hf"""
    n_true: int = 64
    """synthetic: planted features per source layer"""
    true_l0: float = 3.0
    """synthetic: mean active planted features per token per layer"""
    noise: float = 0.02
    """synthetic: Gaussian noise std (per coordinate, relative to the signal)"""
    path: Optional[str] = None
    """shards: the folder (with manifest.json)"""
    verify: bool = False
    """shards: check every shard's SHA-256 against the manifest before training (reads all the data)"""
    shuffle: bool = True
    """shards: seeded shard and token order per epoch; hf: the shuffle buffer (false: stream order)"""
    prefetch: int = 4
    """batches prepared ahead in a background thread (pinned memory)"""
    model: Optional[str] = None
    """hf: the LM's local folder (nothing is downloaded)"""
    layers: Optional[List[int]] = None
    """hf: block indices, e.g. [0, 1, 2] (default: the first model.n_layers blocks)"""
    input_hook: Optional[str] = None
    """x = mlp_in (MLP input) | resid_mid (pre-MLP norm input); default mlp_in (shards: theirs)"""
    tokens: str = "random"
    """random | text file | .jsonl/.json/.parquet/.csv/.arrow/save_to_disk folder (datasets) | .npy ids"""
    text_field: str = "text"
    """dataset column holding the text"""
    ctx_len: int = 64
    """tokens per sequence"""
    prepend_bos: bool = False
    """every sequence starts with the LM's BOS token"""
    exclude_bos: bool = True
    """drop positions holding the BOS token (their activations are outliers)"""
    seqs_per_forward: int = 8
    """sequences per LM forward pass"""
    buffer_batches: int = 8
    """hf with shuffle: micro-batches of tokens in the seeded shuffle buffer"""
    hf_dtype: str = "float32"
    """dtype of the host model (float32 | bfloat16)"""


@dataclass
class EvalSection:
    """Replacement-model evaluation (KL, CE recovered, FVU, L0) every train.eval_every steps and at the end"""
    lm: Optional[str] = None
    """local LM folder for data.source shards (hf: data.model is used)"""
    tokens: Optional[str] = None
    """token source (default: data.tokens for hf, the shards' recorded one)"""
    n_seqs: int = 16
    """sequences: the corpus's last ones (random: another seed); 0 = no evaluation"""
    ctx_len: Optional[int] = None
    """tokens per sequence (default: data.ctx_len / the shards')"""
    batch_size: int = 4
    """sequences per forward pass"""
    per_layer: bool = True
    """also splice / ablate each layer alone (2 more passes per layer)"""


@dataclass
class CheckpointSection:
    """Checkpoints (per-rank safetensors + JSON, atomic, SHA-256 verified)"""
    every: int = 500
    """steps between checkpoints (0: only at the end / on signals)"""
    keep: int = 2
    """checkpoints kept"""
    resume: str = "auto"
    """auto (newest intact one in out_dir) | never (error if any) | PATH (that one, or an error)"""
    start_over: bool = False
    """when every checkpoint in out_dir is unusable: set them aside (.corrupt) and train from step 0
    (default: refuse)"""


@dataclass
class LogSection:
    """Metrics (rank 0): metrics.jsonl, progress bar, summary.json / summary.png"""
    every: int = 1
    """steps between JSONL lines (and progress-bar updates)"""
    progress: bool = True
    """tqdm bar (rank 0)"""
    wandb: bool = False
    """log to Weights & Biases when installed"""
    tensorboard: bool = False
    """log to TensorBoard when installed"""
    plot: bool = True
    """summary.png (needs matplotlib)"""
    project: str = "fastclt"
    """wandb project"""


# Model fields the trainer records from its data source (the LM, its blocks, the input hook), not options.
RECORDED_MODEL_FIELDS = {"lm_name": "data.model", "lm_layers": "data.layers", "input_hook": "data.input_hook"}

SECTIONS = {"model": ModelSection, "train": TrainSection, "data": DataSection, "eval": EvalSection,
            "checkpoint": CheckpointSection, "log": LogSection}

# Fields that may differ between a run and its resumption (everything else must match).
RUN_CONTROL_KEYS = {"train.max_steps", "train.device", "train.impl", "train.eval_batches", "train.eval_every",
                    "train.calibrate_jumprelu", "train.calibrate_batches",
                    "eval.lm", "eval.tokens", "eval.n_seqs", "eval.ctx_len", "eval.batch_size", "eval.per_layer",
                    "data.prefetch", "data.verify",
                    "checkpoint.every", "checkpoint.keep", "checkpoint.resume", "checkpoint.start_over",
                    "log.every", "log.progress", "log.wandb", "log.tensorboard", "log.plot", "log.project", "out_dir"}


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    out_dir: str = "runs/default"

    @property
    def kind(self) -> str:
        return self.model.kind

    def model_config(self):
        """The CLTConfig / SAEConfig / MOLTConfig of the FULL (unsharded) model."""
        kw = self.model.config_kwargs()
        try:
            return self.model.config_class()(**kw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.{e}") from e

    def to_dict(self) -> dict:
        """Every section as plain values, the model section resolved (``ModelSection.resolved``)."""
        d = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        try:
            d["model"] = self.model.resolved()
        except (TypeError, ValueError):
            pass  # an invalid model section is reported by validate(); keep what was given
        d["out_dir"] = self.out_dir
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """The inverse of ``to_dict`` (no validation; unknown or recorded model keys are ignored)."""
        kw = {}
        for name, sec in SECTIONS.items():
            body = d.get(name) or {}
            known = {f.name for f in dataclasses.fields(sec)}
            kw[name] = sec(**{k: v for k, v in body.items() if k in known})
        return cls(**kw, out_dir=d.get("out_dir", cls.out_dir))

    def fingerprint(self) -> dict:
        """The settings a checkpoint must agree with to be resumed (resolved: an explicit default
        equals the default)."""
        flat = _flatten(self.to_dict())
        return {k: v for k, v in flat.items() if k not in RUN_CONTROL_KEYS}

    def save(self, out_dir: Path) -> None:
        from fastclt.checkpoint import atomic_write, write_json
        d = self.to_dict()
        write_json(out_dir / "config.json", d)

        def _w(tmp):
            with open(tmp, "w") as f:
                yaml.safe_dump(d, f, sort_keys=False, allow_unicode=True)
        atomic_write(out_dir / "config.yaml", _w)


def resolve_fingerprint(fp: dict) -> dict:
    """A stored fingerprint (flat ``section.key`` → value, possibly written by an older version that
    recorded only the model fields given) resolved like ``RunConfig.fingerprint``; as stored when it
    cannot be resolved."""
    nested: dict = {}
    for key, v in fp.items():
        section, _, name = key.partition(".")
        if name:
            nested.setdefault(section, {})[name] = v
        else:
            nested[key] = v
    try:
        return RunConfig.from_dict(nested).fingerprint()
    except (TypeError, ValueError):
        return fp


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k in SECTIONS:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ------------------------------------------------------------------------ the command line
USAGE = ("[torchrun --nproc_per_node=N] python -m fastclt.train [--config FILE.yaml] "
         "[--section.key VALUE ...]")
EPILOG = """A key that names one field may be given without its section (--max_steps 5). Values are YAML:
true/false, 1e-3, null, [0, 1]. --print_config prints the resolved configuration as YAML and exits.
Token source of data.source hf (and python -m fastclt.extract): data.tokens random draws seeded token
ids; a text file is tokenized with the model folder's tokenizer; .jsonl/.json/.parquet/.csv/.arrow files
and save_to_disk folders are read with the datasets library (column data.text_field, or input_ids); a
.npy holds token ids (1-D: a stream, 2-D: one sequence per row). See docs/TRAINING.md."""


def build_parser(description: str = ""):
    """The jsonargparse parser of the trainer: --config, one group per section, --out_dir."""
    import jsonargparse
    from jsonargparse import ActionConfigFile, ArgumentParser
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        """Keeps the epilog's line breaks."""

        def _fill_text(self, text, width, indent):
            return "\n".join(indent + line for line in text.splitlines())
    # print_config=None: jsonargparse's own --print_config (unresolved, unvalidated, exits the process)
    # is replaced by the trainer's (fastclt.train.main prints the resolved, validated configuration)
    p = ArgumentParser(prog="python -m fastclt.train", usage=USAGE, description=description, epilog=EPILOG,
                       exit_on_error=False, formatter_class=Formatter, print_config=None)
    p.add_argument("--config", action=ActionConfigFile,
                   help="YAML file with sections model/train/data/eval/checkpoint/log and out_dir")
    p.add_argument("--print_config", action="store_true",
                   help="print the resolved configuration as YAML and exit (nothing is trained)")
    for name, cls in SECTIONS.items():
        p.add_class_arguments(cls, name, sub_configs=False)
    p.add_argument("--out_dir", type=str, default=RunConfig.out_dir,
                   help="config, metrics, checkpoints, model/, summary (locked while a run writes there)")
    return p


def _fields() -> dict:
    return {name: {f.name for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}


def _expand(argv: list) -> list:
    """The shorthand and checks the parser does not do: ``--key`` naming one field → ``--section.key``
    (a section's name is the section: ``--model FILE.yaml``, not data.model); ``-`` in a key → ``_``;
    unknown sections and keys, and the model fields the trainer records, are errors naming them;
    ``--config`` goes first (the command line overrides the file)."""
    fields = _fields()
    first, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"{arg}: expected --key value (see --help)")
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if key == "print_config":
                rest.append("--print_config")
                i += 1
                continue
            if i + 1 >= len(argv):
                raise ConfigError(f"{key}: missing a value")
            text = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            first += ["--config", text]
            continue
        if key in SECTIONS:  # --section FILE.yaml (or an inline YAML mapping): that section, for jsonargparse
            if text and not text.lstrip().startswith("{") and not Path(text).is_file():
                raise ConfigError(f"{key}: file {text} does not exist (--{key} reads the {key} section from a "
                                  f"YAML file; a field of it is --{key}.NAME)")
            rest.append(f"--{key}={text}")
            continue
        if "." not in key and key != "out_dir":
            hits = [s for s, names in fields.items() if key in names]
            if len(hits) != 1:
                where = f"is in several sections {hits}" if hits else "is not a known option"
                raise ConfigError(f"{key}: {where}; write it as section.key (see --help)")
            key = f"{hits[0]}.{key}"
        if key != "out_dir":
            section, _, name = key.partition(".")
            if section not in fields:
                raise ConfigError(f"{key}: unknown section {section!r}; expected one of {list(SECTIONS)}")
            if section == "model" and name in RECORDED_MODEL_FIELDS:
                raise ConfigError(f"model.{name}: recorded by the trainer from the data source; set "
                                  f"{RECORDED_MODEL_FIELDS[name]} (data.source hf) or write the shards with it")
            if name not in fields[section]:
                raise ConfigError(f"{key}: unknown option; {section} has {sorted(fields[section])}")
        rest.append(f"--{key}={text}")  # one token: a value like -inf is not taken for an option
    return first + rest


def _parser_message(e: Exception) -> str:
    """jsonargparse's complaint as 'field: what was expected, what was given'."""
    msg = str(e).strip()
    m = re.match(r"Parser key \"([\w.]+)\":\s*(.*)", msg, re.S)
    if m:
        key, body = m.groups()
        given = re.search(r"Given value: (.*)", body)
        expected = re.search(r"Expected a <class '(\w+)'>\. Got value: (.*)", body)
        if expected:
            return f"{key}: expected {_a(expected.group(1))}, got {expected.group(2).strip()!r}"
        if given:
            types = re.search(r"Subtypes: \[(.*)\]", body)
            want = types.group(1) if types else "another type"
            want = re.sub(r"<class '(\w+)'>", r"\1", want).replace("typing.", "").replace("NoneType", "null")
            return f"{key}: expected one of [{want}], got {given.group(1).strip()!r}"
        return f"{key}: {' '.join(body.split())}"
    m = re.match(r"Group '(\w+)' does not accept option '(\w+)'", msg)
    if m:
        section, name = m.groups()
        if section == "model" and name in RECORDED_MODEL_FIELDS:
            return (f"model.{name}: recorded by the trainer from the data source; set "
                    f"{RECORDED_MODEL_FIELDS[name]} (data.source hf) or write the shards with it")
        return f"{section}.{name}: unknown option; {section} has {sorted(_fields().get(section, ()))}"
    m = re.match(r"Option '([\w.]+)' is not accepted", msg)
    if m:
        return f"config: {m.group(1)}: unknown section; expected one of {list(SECTIONS)} or out_dir"
    return "config: " + " ".join(msg.split())


def _a(type_name: str) -> str:
    return {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string"}.get(
        type_name, f"a {type_name}")


def load_config(argv: list) -> RunConfig:
    """argv (without the program name) → a validated RunConfig."""
    from jsonargparse import ArgumentError
    args = _expand(list(argv))
    for i, a in enumerate(args[:-1]):
        if a == "--config" and not Path(args[i + 1]).is_file():
            raise ConfigError(f"config: file {args[i + 1]} does not exist")
    parser = build_parser()
    try:
        ns = parser.parse_args(args)
    except ArgumentError as e:
        raise ConfigError(_parser_message(e)) from None
    sections = {}
    for name, cls in SECTIONS.items():
        body = ns.get(name)
        if not hasattr(body, "as_dict"):
            raise ConfigError(f"{name}: expected a section mapping (model, train, data, eval, checkpoint, log) "
                              f"or out_dir, got {body!r}")
        # (a section read from its own file carries that file's path as __path__)
        sections[name] = cls(**{k: v for k, v in body.as_dict().items() if k != "__path__"})
    cfg = RunConfig(**sections, out_dir=ns.get("out_dir"))
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------ validation
def _pos(key: str, v, zero_ok: bool = False) -> None:
    if v is None or v < 0 or (v == 0 and not zero_ok):
        raise ConfigError(f"{key}: expected a {'non-negative' if zero_ok else 'positive'} value, got {v!r}")


def _finite_floats(cfg: RunConfig) -> None:
    """No NaN or Inf in any number of any section (YAML spells them .nan and .inf)."""
    for name in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, name)):
            v = getattr(getattr(cfg, name), f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name}.{f.name}: expected a finite number, got {v}")


def validate(cfg: RunConfig) -> None:
    """Check every field (and their combinations); raise ConfigError naming the first bad one."""
    if not isinstance(cfg.model, ModelSection):
        raise ConfigError(f"model: expected a ModelSection, got {type(cfg.model).__name__}")
    if cfg.kind not in MODEL_KINDS:
        raise ConfigError(f"model.kind: expected one of {MODEL_KINDS}, got {cfg.kind!r}")
    _finite_floats(cfg)
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
        if mc.activation not in ("relu", "jumprelu"):
            raise ConfigError(f"train.init_fire_rate: only ReLU/JumpReLU models use it, not {mc.activation!r}")
        if not 0 < t.init_fire_rate < 1:
            raise ConfigError(f"train.init_fire_rate: expected a fraction in (0, 1), got {t.init_fire_rate}")
    for key, options in (("lr_decay", ("cosine", "linear", "none")), ("device", ("auto", "cpu", "cuda")),
                         ("autocast", ("auto", "bf16", "none")), ("optimizer_moments", ("float32", "bfloat16")),
                         ("impl", ("auto", "cuda", "triton", "cpu", "reference"))):
        if getattr(t, key) not in options:
            raise ConfigError(f"train.{key}: expected one of {options}, got {getattr(t, key)!r}")
    _validate_objective(cfg, mc)
    if t.cuda_graph:
        _validate_cuda_graph(cfg, mc)
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
    if d.verify and d.source != "shards":
        raise ConfigError(f"data.verify: checks the SHA-256 of shards (data.source shards), not of {d.source!r} data")
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
    if c.resume not in ("auto", "never"):
        from fastclt.training.checkpointing import is_checkpoint_folder
        if not is_checkpoint_folder(c.resume):
            raise ConfigError(f"checkpoint.resume: {c.resume} is neither auto, never, nor a checkpoint folder "
                              f"(checkpoints/step_XXXXXXXX with meta.json)")
    _pos("log.every", lg.every)
    if not cfg.out_dir:
        raise ConfigError("out_dir: expected a folder path")


OBJECTIVES = ("reconstruction", "kl", "kl+fvu", "ce")


def _validate_cuda_graph(cfg: RunConfig, mc) -> None:
    """train.cuda_graph: a step whose shapes are static and that reads nothing back from the device."""
    t = cfg.train
    why = "train.cuda_graph: a captured step"
    from fastclt.training.graphed import GRAPH_DEVICES
    if t.device != "auto" and t.device not in GRAPH_DEVICES:
        raise ConfigError(f"{why} runs on a CUDA device, not train.device {t.device}")
    if t.tp != 1:
        raise ConfigError(f"{why} keeps the selection on one device: train.tp must be 1, got {t.tp}")
    if t.grad_accum != 1:
        raise ConfigError(f"{why} writes each micro-batch's gradients anew: train.grad_accum must be 1, got "
                          f"{t.grad_accum}")
    if t.objective != "reconstruction":
        raise ConfigError(f"{why} trains the reconstruction objective, not {t.objective!r}")
    if mc.activation not in ("topk", "batchtopk"):
        raise ConfigError(f"{why} needs codes of a fixed size (TopK or BatchTopK); {mc.activation!r} codes vary "
                          f"from batch to batch")
    if getattr(mc, "batchtopk_across_layers", False):
        raise ConfigError(f"{why} needs each layer's share of the codes fixed: model.batchtopk_across_layers must be "
                          f"false (a selection across layers reads its layers' bounds back)")
    if mc.nonfinite != "error":
        raise ConfigError(f"{why} checks the batch with the loss after the step: model.nonfinite must be error, got "
                          f"{mc.nonfinite!r} (skipping tokens changes the batch's shape)")


def _validate_objective(cfg: RunConfig, mc) -> None:
    """train.objective and what the objectives that train through the LM need; train.init_from."""
    t, d = cfg.train, cfg.data
    if t.objective not in OBJECTIVES:
        raise ConfigError(f"train.objective: expected one of {OBJECTIVES}, got {t.objective!r}")
    _pos("train.fvu_coef", t.fvu_coef, zero_ok=True)
    if t.init_from is not None and not (Path(t.init_from) / "config.json").is_file():
        raise ConfigError(f"train.init_from: {t.init_from} is not a saved model folder (no config.json; give the "
                          f"model/ folder of a finished run)")
    if t.objective == "reconstruction":
        return
    what = f"train.objective {t.objective} (the dictionary spliced into the LM)"
    if d.source != "hf":
        raise ConfigError(f"data.source: {what} needs the LM at hand, data.source hf; got {d.source!r}")
    if t.tp != 1:
        raise ConfigError(f"train.tp: {what} runs the whole dictionary in each process; tensor parallelism is not "
                          f"supported (data parallelism is: torchrun with train.tp 1), got {t.tp}")
    if getattr(mc, "batchtopk_across_layers", False):
        raise ConfigError(f"model.batchtopk_across_layers: {what} encodes each layer when the LM reaches it; a "
                          f"selection over all layers at once is not possible")
    if t.calibrate_jumprelu:
        raise ConfigError(f"train.calibrate_jumprelu: calibrates on activation batches, which {what} does not "
                          f"draw; calibrate the saved model with fastclt.calibrate")
    if d.ctx_len < 2:
        raise ConfigError(f"data.ctx_len: {what} needs next-token distributions, at least 2 tokens per sequence")
    if t.batch_size % d.ctx_len:
        raise ConfigError(f"train.batch_size: {what} trains on whole sequences; {t.batch_size} tokens is not a "
                          f"multiple of data.ctx_len={d.ctx_len}")
