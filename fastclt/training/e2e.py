"""Training a dictionary *through* its language model: the objectives ``kl``, ``kl+fvu`` and ``ce``.

The dictionary is spliced into the frozen LM (``fastclt.replacement.Splice`` with ``as_trained``:
each spliced MLP output — for an SAE its hooked activation — is the dictionary's, computed in the
same forward pass from the spliced inputs), and the loss is read at the LM's output. On a batch of
token sequences ids [N, T], with p the clean and q the spliced next-token distribution at each of
the N·T positions:

    kl        mean over positions of KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)
    kl+fvu    kl + fvu_coef · Σ_l FVU_l, FVU_l = ‖y_l − ŷ_l‖² / ‖y_l − ȳ_l‖² in the dictionary's
              normalised space, y_l the MLP output the LM computes from its (spliced) input in the
              same pass (a target: no gradient flows into it)
    ce        mean next-token cross-entropy of q over the N·(T − 1) positions 0 … T − 2

plus, as for reconstruction training, λ · the sparsity penalty (ReLU/JumpReLU), λ_p · the
pre-activation loss (JumpReLU) and AuxK (TopK/BatchTopK, fitting y_l − ŷ_l with the dead features)
— the terms of ``SparseDictionary.penalties`` on the spliced pass's codes.

Gradients reach the dictionary through the LM's activations; the LM's parameters are frozen
(``requires_grad`` False: they receive no gradient). ``lm_checkpoint`` recomputes each block's
sub-modules (attention, norms, MLP) in the backward pass instead of keeping their intermediate
activations (``torch.utils.checkpoint``, non-reentrant): what the backward keeps per block is then
about the inputs of those modules. The splice's hooks sit on the module boundaries, outside the
recomputed regions, so each runs once per forward pass. BatchTopK selects over the N·T tokens of a
forward pass (its JumpReLU statistics update in train mode, as in reconstruction training); a CLT
with ``batchtopk_across_layers`` cannot be spliced as trained. The dictionary runs whole in each
process: data parallelism works (each rank its own sequences, gradients averaged), tensor
parallelism of the dictionary does not.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastclt import ops
from fastclt.lm import HookPaths, _container, find_paths, lm_block_count
from fastclt.models.base import LossOutput
from fastclt.replacement import Splice

__all__ = ["OBJECTIVES", "SplicedObjective", "checkpoint_blocks", "freeze", "lm_logits"]

OBJECTIVES = ("reconstruction", "kl", "kl+fvu", "ce")


def freeze(lm: nn.Module) -> nn.Module:
    """``lm`` with every parameter's ``requires_grad`` off (it then gets no gradient); returns it."""
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm


def lm_logits(lm: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The LM's logits [N, T, V] for ids [N, T] (no KV cache)."""
    out = lm(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


@contextlib.contextmanager
def checkpoint_blocks(lm: nn.Module, paths: Optional[HookPaths] = None, enabled: bool = True):
    """While the block runs: every direct sub-module of every transformer block of ``lm`` (attention,
    norms, MLP) recomputes its forward in the backward pass (non-reentrant activation checkpointing)
    instead of keeping its intermediate tensors. Hooks registered on those modules stay outside the
    recomputed region (they run once). The modules' own ``forward`` is restored on exit."""
    if not enabled:
        yield
        return
    paths = find_paths(lm) if paths is None else HookPaths.coerce(paths)
    lm_block_count(lm, paths)  # (a clear error when the paths lead nowhere)
    wrapped = []
    try:
        for block in _container(lm, paths):
            for child in block.children():
                if "forward" in child.__dict__:
                    continue  # already wrapped (a module shared between blocks)
                child.forward = _checkpointed(child.forward)
                wrapped.append(child)
        yield
    finally:
        for child in wrapped:
            del child.forward


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


class SplicedObjective:
    """The loss of ``model`` spliced into ``lm`` (see the module docstring) for one batch of ids.

    objective: "kl" | "kl+fvu" | "ce". fvu_coef: the FVU weight of "kl+fvu". lm_checkpoint:
    activation checkpointing of the LM's blocks. autocast: run both LM passes and the dictionary
    under bf16 autocast (log-probabilities in fp32). The LM is frozen here (``freeze``) and run in
    eval mode (dropout off). ``loss`` returns a ``LossOutput`` like ``model.loss``: parts kl, ce,
    fvu (Σ_l FVU_l), the objective and the penalties; per_layer fvu, mse and l0."""

    def __init__(self, model, lm: nn.Module, objective: str = "kl", *, fvu_coef: float = 1.0,
                 lm_checkpoint: bool = True, autocast: bool = False, paths=None) -> None:
        if objective not in OBJECTIVES[1:]:
            raise ValueError(f"objective: expected one of {OBJECTIVES[1:]}, got {objective!r}")
        if isinstance(fvu_coef, bool) or not isinstance(fvu_coef, (int, float)) or not fvu_coef >= 0:
            raise ValueError(f"fvu_coef: expected a non-negative number, got {fvu_coef!r}")
        cfg = model.cfg
        self.model, self.lm, self.objective, self.fvu_coef = model, freeze(lm), objective, float(fvu_coef)
        self.lm_checkpoint, self.autocast = bool(lm_checkpoint), bool(autocast)
        self.device = model.device
        need_pre = cfg.activation == "jumprelu" and cfg.preact_coef > 0
        self.splice = Splice(model, lm, paths=paths, as_trained=True, collect=True, need_preacts=need_pre)

    def loss(self, ids: torch.Tensor, dead_mask: Optional[torch.Tensor] = None, *,
             sparsity_coef: Optional[float] = None, preact_coef: Optional[float] = None) -> LossOutput:
        model, cfg = self.model, self.model.cfg
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(f"ids: expected int64 token ids [N, T] with T >= 2, got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
        lam = cfg.sparsity_coef if sparsity_coef is None else sparsity_coef
        lam_p = cfg.preact_coef if preact_coef is None else preact_coef
        lm, dev = self.lm, self.device.type
        was = lm.training
        lm.eval()
        try:
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.autocast):
                with torch.no_grad():
                    lp_clean = lm_logits(lm, ids).float().log_softmax(-1)
                with self.splice, checkpoint_blocks(lm, self.splice.paths, self.lm_checkpoint):
                    lq = lm_logits(lm, ids).float().log_softmax(-1)
                got = self.splice.collected
                self.splice.collected = {}
        finally:
            lm.train(was)
        n = ids.numel()
        kl = F.kl_div(lq, lp_clean, log_target=True, reduction="sum") / n
        ce = F.nll_loss(lq[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        L = model.n_layers
        layers = [got[l] for l in range(L)]
        codes = [c["codes"] for c in layers]
        xn = torch.stack([c["xn"] for c in layers], 1)
        yn = torch.stack([c["yn"] for c in layers], 1).to(torch.float32 if xn.dtype != torch.float64 else xn.dtype)
        y_hat = torch.stack([c["y_hat"].to(yn.dtype) for c in layers], 1)
        sq = ops.squared_error(yn, y_hat)  # [L] (ŷ carries the gradient, y is a target)
        tv = ops.total_variance(yn).clamp_min(1e-12)
        fvu_l = sq / tv
        parts = {"kl": kl, "ce": ce, "fvu": fvu_l.sum()}
        if self.objective == "ce":
            total = ce
        elif self.objective == "kl":
            total = kl
        else:
            total = kl + self.fvu_coef * fvu_l.sum()
        hs = [c["preacts"] for c in layers] if "preacts" in layers[0] else None
        for term in model.penalties(codes, hs, xn.detach(), yn, y_hat.detach(), dead_mask, lam, lam_p, parts):
            total = total + term
        fired, l0 = model.code_stats(codes)
        return LossOutput(loss=total, codes=codes, y_hat=y_hat.detach(), fired=fired, n_tokens=xn.shape[0],
                          skipped_tokens=0, parts=parts,
                          per_layer={"mse": (sq / max(xn.shape[0], 1)).detach(), "fvu": fvu_l.detach(), "l0": l0})
