"""Where a dictionary reads and writes inside a transformers causal LM.

Every transformer block of the supported families has an MLP branch
``resid_mid → norm → mlp → [post_norm] → + resid_mid``:

    family                        mlp                      norm (pre-MLP)                 post_norm
    GPT-2                         transformer.h.{i}.mlp    transformer.h.{i}.ln_2         —
    Llama / Mistral / Qwen2 / …   model.layers.{i}.mlp     …post_attention_layernorm      —
    Gemma-2 / Gemma-3             model.layers.{i}.mlp     …pre_feedforward_layernorm     …post_feedforward_layernorm
    GPT-NeoX / Pythia             gpt_neox.layers.{i}.mlp  …post_attention_layernorm      —

The hooks (``fastclt.config.INPUT_HOOKS``):
    mlp_in     the mlp module's input (after the pre-MLP norm)
    resid_mid  the pre-MLP norm's input: the residual stream the MLP branch reads
    MLP output the mlp module's output — for Gemma-2 *before* its post-feedforward norm, which the
               LM then applies to whatever the mlp module returned (a spliced ŷ included)
Any other architecture: give ``HookPaths`` (dotted module paths with ``{i}`` for the block).
Nothing is downloaded: ``load_lm`` reads a local folder only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

__all__ = ["HookPaths", "BlockSites", "KNOWN_PATHS", "find_paths", "resolve_sites", "hidden_size", "load_lm",
           "lm_block_count"]


@dataclass(frozen=True)
class HookPaths:
    """Dotted paths of one block's modules, with ``{i}`` standing for the block index.

    mlp: the MLP module (its input is ``mlp_in``, its output the MLP output); norm: the pre-MLP
    norm (its input is ``resid_mid``; needed for that hook and for SAEs on it); post_norm: a norm
    the block applies to the MLP output before adding it to the residual stream (Gemma-2), if any.
    """

    mlp: str
    norm: Optional[str] = None
    post_norm: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("mlp", "norm", "post_norm"):
            value = getattr(self, name)
            if value is None and name != "mlp":
                continue
            if not isinstance(value, str) or "{i}" not in value:
                raise ValueError(f"paths.{name}: expected a dotted module path containing '{{i}}' for the block "
                                 f"index (e.g. 'model.layers.{{i}}.mlp'), got {value!r}")

    @classmethod
    def coerce(cls, value) -> "HookPaths":
        if isinstance(value, HookPaths):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"mlp", "norm", "post_norm"})
            if unknown or "mlp" not in value:
                raise ValueError(f"paths: expected keys mlp (required), norm, post_norm; got {sorted(value)}")
            return cls(**value)
        raise TypeError(f"paths: expected a HookPaths or a dict of dotted module paths, got {type(value).__name__}")


KNOWN_PATHS = (
    HookPaths("transformer.h.{i}.mlp", "transformer.h.{i}.ln_2"),
    # Gemma-2/3 before Llama: they also have a post_attention_layernorm, but after attention
    HookPaths("model.layers.{i}.mlp", "model.layers.{i}.pre_feedforward_layernorm",
              "model.layers.{i}.post_feedforward_layernorm"),
    HookPaths("model.layers.{i}.mlp", "model.layers.{i}.post_attention_layernorm"),
    HookPaths("gpt_neox.layers.{i}.mlp", "gpt_neox.layers.{i}.post_attention_layernorm"),
)


@dataclass
class BlockSites:
    """The modules of one block: mlp, norm (pre-MLP) and post_norm (None where absent)."""

    block: int
    mlp: nn.Module
    norm: Optional[nn.Module]
    post_norm: Optional[nn.Module]


def _get(root: nn.Module, path: str) -> Optional[nn.Module]:
    obj = root
    for part in path.split("."):
        if isinstance(obj, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            i = int(part)
            if i >= len(obj):
                return None
            obj = obj[i]
        else:
            obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def _container(lm: nn.Module, paths: HookPaths):
    """The ModuleList of blocks: the path before '.{i}'."""
    prefix = paths.mlp.split("{i}")[0].rstrip(".")
    blocks = _get(lm, prefix) if prefix else None
    return blocks if isinstance(blocks, (nn.ModuleList, nn.Sequential)) else None


def find_paths(lm: nn.Module) -> HookPaths:
    """The ``KNOWN_PATHS`` entry that matches ``lm`` (every module present in block 0)."""
    for paths in KNOWN_PATHS:
        if _container(lm, paths) is None:
            continue
        if all(_get(lm, p.format(i=0)) is not None for p in (paths.mlp, paths.norm, paths.post_norm) if p):
            return paths
    raise ValueError(f"lm: {type(lm).__name__} is not a known family (GPT-2 transformer.h[i].mlp, Llama/Qwen2/"
                     f"Mistral/Gemma-2 model.layers[i].mlp, GPT-NeoX gpt_neox.layers[i].mlp); pass paths="
                     f"HookPaths(mlp='...{{i}}...', norm='...{{i}}...') with its module paths")


def lm_block_count(lm: nn.Module, paths: Optional[HookPaths] = None) -> int:
    paths = find_paths(lm) if paths is None else HookPaths.coerce(paths)
    blocks = _container(lm, paths)
    if blocks is None:
        raise ValueError(f"paths.mlp: {paths.mlp!r} does not lead to a list of blocks in {type(lm).__name__}")
    return len(blocks)


def resolve_sites(lm: nn.Module, layers, paths: Optional[Union[HookPaths, dict]] = None,
                  need_norm: bool = False) -> list:
    """BlockSites of each block in ``layers`` (errors name the missing module)."""
    paths = find_paths(lm) if paths is None else HookPaths.coerce(paths)
    n_blocks = lm_block_count(lm, paths)
    bad = [l for l in layers if not 0 <= l < n_blocks]
    if bad:
        raise ValueError(f"layers: {bad} out of range; the LM has {n_blocks} blocks")
    if need_norm and paths.norm is None:
        raise ValueError("paths.norm: the resid_mid hook needs the pre-MLP norm's module path")
    sites = []
    for i in layers:
        mods = {}
        for name in ("mlp", "norm", "post_norm"):
            p = getattr(paths, name)
            mods[name] = None if p is None else _get(lm, p.format(i=i))
            if p is not None and mods[name] is None:
                raise ValueError(f"paths.{name}: no module at {p.format(i=i)!r} in {type(lm).__name__}")
        sites.append(BlockSites(i, mods["mlp"], mods["norm"], mods["post_norm"]))
    return sites


def hidden_size(lm: nn.Module) -> Optional[int]:
    """The residual width of a transformers LM (None when its config does not say)."""
    cfg = getattr(lm, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    return None


def load_lm(path, device: Union[str, torch.device] = "cpu", dtype: str = "float32") -> nn.Module:
    """A transformers causal LM from a local folder (``local_files_only``), in eval mode on ``device``."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise ImportError("transformers is needed to load a language model: pip install transformers "
                          "(the fastclt[hf] extra)") from e
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"lm: {path} is not a folder (nothing is downloaded; give a local model folder)")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
    if dtype not in dtypes:
        raise ValueError(f"dtype: expected one of {tuple(dtypes)}, got {dtype!r}")
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    lm = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **{key: dtypes[dtype]})
    return lm.to(device).eval()
