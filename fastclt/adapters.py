"""Transcoder adapters: a sparse branch added to every MLP of a frozen base model, trained so that
the base model behaves like a reference model (e.g. its fine-tuned sibling) — the difference
between the two models' MLP computations, read as sparse features.

    mlp'_l(x) = mlp_l(x) + W_dec[l]ᵀ act(W_enc[l] x + b_enc[l])        x: the MLP's input

One ReLU (or JumpReLU) transcoder per MLP — a per-layer transcoder set (``CrossLayerTranscoder``
with ``cross_layer=False``, no normalisation), spliced in ``mode="add"`` (``fastclt.replacement``).
Its decoder starts at zero, so the adapted model starts exactly at the base model; the base
model's parameters are frozen and only the adapters train.

    python -m fastclt.adapters --base BASE_DIR --reference REF_DIR --data corpus.txt \\
        --n_features 4096 --steps 2000 --out_dir runs/adapters
    # re-running the same command resumes from the newest intact checkpoint in out_dir

Losses on a batch of token sequences (N·T positions; p_ref the reference model's next-token
distribution, q the adapted model's):

    kl        mean over positions of KL(p_ref ‖ q), weighted by kl_coef
    bridge    for n_cutoffs cutoffs k drawn without replacement from {0, …, L} (L blocks): the
              hidden state entering block k of one model continued through the other model's
              blocks k … L − 1 and its final norm and unembedding, compared with p_ref by the
              same KL — adapted → reference ("a2r": the adapted model's blocks 0 … k − 1, then the
              reference's; skipped at k = 0, where no adapter takes part) and reference → adapted
              ("r2a": the reference's blocks 0 … k − 1 — at k = 0 its embedding — then the adapted
              model's; skipped at k = L); bridge = Σ over the cutoffs and directions / n_cutoffs,
              weighted by bridge_coef. The cutoffs of a step are a pure function of (seed, step,
              micro-batch), so a resumed run draws the same ones.
    nmse      optional: per layer, mean (o_l − r_l)² / (mean r_l² + 1e-8) with o_l the adapted MLP
              output (base + adapter) and r_l the reference's MLP output on the same tokens, averaged
              over layers, weighted by nmse_coef
    sparsity  Σ_l mean over tokens Σ_i penalty(a_{l,i} ‖W_dec[l, i]‖) — penalty the identity (l1)
              or tanh(c ·) — weighted by sparsity_coef (linear warm-up over sparsity_warmup_steps)

Saving (``AdaptedModel.save_pretrained``): the base model as a standard transformers folder
(config.json, model.safetensors, the tokenizer when given) plus ``adapters/`` (the transcoder set's
config.json and model.safetensors); ``AdaptedModel.from_pretrained`` gives it back with the adapters
attached, ``generate`` working with them on or off (``disabled()``, ``enable()`` / ``disable()``).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastclt.config import CLTConfig
from fastclt.lm import HookPaths, _get, find_paths, hidden_size, lm_block_count
from fastclt.models import CrossLayerTranscoder
from fastclt.replacement import Splice, _first_tensor, _with_input
from fastclt.training.e2e import checkpoint_blocks, freeze, lm_logits

__all__ = ["new_adapters", "AdaptedModel", "AdapterObjective", "train_adapters", "main", "ADAPTERS_DIR"]

ADAPTERS_DIR = "adapters"
ACTIVATIONS = ("relu", "jumprelu")
DIRECTIONS = ("both", "a2r", "r2a")
# The final norm before the unembedding, per family (the hidden state "entering block L").
FINAL_NORMS = ("transformer.ln_f", "model.norm", "gpt_neox.final_layer_norm")


def new_adapters(lm: nn.Module, n_features: int, activation: str = "relu", *, sparsity: str = "l1",
                 sparsity_coef: float = 1e-3, sparsity_c: float = 1.0, threshold_init: float = 0.05,
                 jumprelu_bandwidth: float = 0.05, seed: int = 0) -> CrossLayerTranscoder:
    """A fresh adapter set for every block of ``lm``: encoder rows uniform in ±1/√d, encoder bias
    zero, decoder and its bias zero (the adapted model starts exactly at the base model)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    d = hidden_size(lm)
    if d is None:
        raise ValueError(f"lm: its config names no hidden size (hidden_size / n_embd / d_model); "
                         f"{type(lm).__name__} is not a transformers causal LM")
    L = lm_block_count(lm)
    cfg = CLTConfig(n_layers=L, d_in=d, d_out=d, n_features=n_features, activation=activation, cross_layer=False,
                    sparsity=sparsity, sparsity_coef=sparsity_coef, sparsity_c=sparsity_c,
                    threshold_init=threshold_init, jumprelu_bandwidth=jumprelu_bandwidth,
                    lm_layers=list(range(L)), input_hook="mlp_in", normalization="none")
    device = next(lm.parameters()).device
    model = CrossLayerTranscoder(cfg).to(device)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(d)
        model.W_enc.copy_(torch.rand(model.W_enc.shape, generator=g, dtype=torch.float64).mul(2 * bound)
                          .sub(bound).to(model.W_enc.dtype))
        model.b_enc.zero_()
        model.W_dec.zero_()
        model.b_dec.zero_()
    return model


class AdaptedModel(nn.Module):
    """A transformers causal LM with an adapter set added to its MLPs (hooks; the LM is not modified
    otherwise). ``lm``: the base model; ``adapters``: a per-layer ``CrossLayerTranscoder`` with one
    layer per block (``new_adapters``). Calls, ``generate`` included, go to the LM with the adapters
    on unless ``disable()``-d or inside ``with model.disabled():``."""

    def __init__(self, lm: nn.Module, adapters: CrossLayerTranscoder, paths=None) -> None:
        super().__init__()
        if not isinstance(adapters, CrossLayerTranscoder) or adapters.cfg.cross_layer:
            raise TypeError(f"adapters: expected a per-layer CrossLayerTranscoder (cross_layer False), got "
                            f"{type(adapters).__name__}")
        n = lm_block_count(lm, paths)
        if adapters.n_layers != n:
            raise ValueError(f"adapters: {adapters.n_layers} layers, but the LM has {n} blocks (one adapter per MLP)")
        self.lm, self.adapters = lm, adapters
        self.splice = Splice(adapters, lm, paths=paths, mode="add", as_trained=True)
        self.splice.attach()

    @property
    def enabled(self) -> bool:
        return bool(self.splice.handles)

    def enable(self) -> None:
        if not self.enabled:
            self.splice.attach()

    def disable(self) -> None:
        self.splice.remove()

    @contextlib.contextmanager
    def disabled(self):
        """The base model alone for the duration of the block."""
        was = self.enabled
        self.disable()
        try:
            yield self
        finally:
            if was:
                self.enable()

    def forward(self, *args, **kwargs):
        return self.lm(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.lm.generate(*args, **kwargs)

    def save_pretrained(self, path, tokenizer=None) -> None:
        """``path``: the base model's transformers folder (+ the tokenizer when given) and ``adapters/``.
        Written into a temporary folder renamed into place (an interrupted save leaves the old one)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.lm.save_pretrained(tmp)  # (safetensors: the default of every supported transformers)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        self.adapters.save_pretrained(tmp / ADAPTERS_DIR)
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: str = "float32", paths=None) -> "AdaptedModel":
        """The adapted model saved by ``save_pretrained`` (a local folder; the adapters' SHA-256 is checked)."""
        from fastclt.lm import load_lm
        path = Path(path)
        if not (path / ADAPTERS_DIR / "config.json").is_file():
            raise ValueError(f"path: {path} holds no {ADAPTERS_DIR}/config.json (not saved by "
                             f"AdaptedModel.save_pretrained)")
        lm = freeze(load_lm(path, device, dtype))
        adapters = CrossLayerTranscoder.from_pretrained(path / ADAPTERS_DIR, device=device)
        return cls(lm, adapters, paths)


# ---------------------------------------------------------------------- hidden states between models
def _final_norm(lm: nn.Module) -> nn.Module:
    for p in FINAL_NORMS:
        m = _get(lm, p)
        if m is not None:
            return m
    raise ValueError(f"lm: no final norm found in {type(lm).__name__} (looked for {FINAL_NORMS})")


def _entries(lm: nn.Module, paths: HookPaths) -> list:
    """The modules whose input is the hidden state entering block k, k = 0 … L (L: the final norm)."""
    from fastclt.lm import _container
    return list(_container(lm, paths)) + [_final_norm(lm)]


@contextlib.contextmanager
def _capture(entries: list, store: dict):
    """store[k] = the hidden state entering entries[k] during the forward passes of the block."""
    def hook(k):
        def fn(module, args, kwargs):
            store[k] = _first_tensor(args, kwargs)[0]
        return fn
    handles = [m.register_forward_pre_hook(hook(k), with_kwargs=True) for k, m in enumerate(entries)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _inject(module: nn.Module, value: torch.Tensor):
    """``module``'s hidden-state input replaced by ``value`` during the block."""
    def fn(mod, args, kwargs):
        _, where = _first_tensor(args, kwargs)
        return _with_input(args, kwargs, where, value)
    h = module.register_forward_pre_hook(fn, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


def _kl(lp_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_ref ‖ softmax(logits))."""
    lq = logits.float().log_softmax(-1)
    return F.kl_div(lq, lp_ref, log_target=True, reduction="sum") / lp_ref.shape[:-1].numel()


class AdapterObjective:
    """The adapters' loss (see the module docstring) on batches of token ids [N, T]."""

    def __init__(self, adapted: AdaptedModel, reference: nn.Module, *, kl_coef: float = 1.0,
                 bridge_coef: float = 2.0, n_cutoffs: int = 1, directions: str = "both", nmse_coef: float = 0.0,
                 lm_checkpoint: bool = False, autocast: bool = False, seed: int = 0) -> None:
        if directions not in DIRECTIONS:
            raise ValueError(f"directions: expected one of {DIRECTIONS}, got {directions!r}")
        for name, v in (("kl_coef", kl_coef), ("bridge_coef", bridge_coef), ("nmse_coef", nmse_coef)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or not math.isfinite(v):
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        L = adapted.adapters.n_layers
        if isinstance(n_cutoffs, bool) or not isinstance(n_cutoffs, int) or not 0 <= n_cutoffs <= L + 1:
            raise ValueError(f"n_cutoffs: expected an int in [0, {L + 1}] (cutoffs are drawn from 0 … {L}), "
                             f"got {n_cutoffs!r}")
        base = adapted.lm
        if type(reference) is not type(base):
            raise ValueError(f"reference: a {type(reference).__name__}, but the base model is a "
                             f"{type(base).__name__}; both must have the same architecture")
        n_ref = lm_block_count(reference)
        if n_ref != L or hidden_size(reference) != hidden_size(base):
            raise ValueError(f"reference: {n_ref} blocks of width {hidden_size(reference)}, the base model "
                             f"{L} of width {hidden_size(base)}; both must have the same architecture")
        if reference.config.vocab_size != base.config.vocab_size:
            raise ValueError(f"reference: vocabulary of {reference.config.vocab_size} tokens, the base model's "
                             f"{base.config.vocab_size}; both must share the tokenizer")
        self.adapted, self.reference = adapted, freeze(reference)
        freeze(base)
        self.kl_coef, self.bridge_coef, self.nmse_coef = float(kl_coef), float(bridge_coef), float(nmse_coef)
        self.n_cutoffs, self.directions, self.seed = n_cutoffs, directions, seed
        self.lm_checkpoint, self.autocast = bool(lm_checkpoint), bool(autocast)
        paths = adapted.splice.paths
        self.base_paths, self.ref_paths = paths, find_paths(reference)
        self.base_entries, self.ref_entries = _entries(base, paths), _entries(reference, self.ref_paths)
        self.ref_mlps = [_get(reference, self.ref_paths.mlp.format(i=i)) for i in range(L)]
        self.splice = Splice(adapted.adapters, base, paths=paths, mode="add", as_trained=True, collect=True)

    def cutoffs(self, step: int, micro: int) -> list:
        """The cutoffs of a micro-batch: n_cutoffs of 0 … L without replacement, from (seed, step, micro)."""
        L = self.adapted.adapters.n_layers
        return sorted(random.Random(f"{self.seed}/{step}/{micro}").sample(range(L + 1), self.n_cutoffs))

    def loss(self, ids: torch.Tensor, sparsity_coef: Optional[float] = None, cutoffs: Optional[list] = None) -> dict:
        """{"loss": the scalar to backpropagate, "kl", "bridge", "nmse", "sparsity" (floats or tensors),
        "l0": [L] mean active features per token, "fired": [L, F] bool}."""
        ad = self.adapted
        model, cfg = ad.adapters, ad.adapters.cfg
        lam = cfg.sparsity_coef if sparsity_coef is None else sparsity_coef
        L = model.n_layers
        cutoffs = [] if cutoffs is None else list(cutoffs)
        base, ref, dev = ad.lm, self.reference, model.device.type
        flags = [(m, m.training) for m in (base, ref)]
        was_on = ad.enabled
        ad.disable()  # this objective's own splice (collecting) stands in for the model's
        try:
            base.eval()
            ref.eval()
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.autocast):
                h_ref, r_out = {}, {}
                with torch.no_grad(), _capture(self.ref_entries, h_ref), self._grab(self.ref_mlps, r_out):
                    lp_ref = lm_logits(ref, ids).float().log_softmax(-1)
                h_ad = {}
                with self.splice, checkpoint_blocks(base, self.base_paths, self.lm_checkpoint), \
                        _capture(self.base_entries, h_ad):
                    kl = _kl(lp_ref, lm_logits(base, ids))
                got = self.splice.collected
                self.splice.collected = {}
                terms = []
                for k in cutoffs:
                    if k > 0 and self.directions in ("both", "a2r"):
                        with _inject(self.ref_entries[k], h_ad[k]), \
                                checkpoint_blocks(ref, self.ref_paths, self.lm_checkpoint):
                            terms.append(_kl(lp_ref, lm_logits(ref, ids)))
                    if k < L and self.directions in ("both", "r2a"):
                        with self.splice, _inject(self.base_entries[k], h_ref[k].detach()), \
                                checkpoint_blocks(base, self.base_paths, self.lm_checkpoint):
                            terms.append(_kl(lp_ref, lm_logits(base, ids)))
                        self.splice.collected = {}
        finally:
            for m, was in flags:
                m.train(was)
            if was_on:
                ad.enable()
        total = self.kl_coef * kl
        out = {"kl": kl.detach()}
        if cutoffs:
            bridge = sum(terms) / len(cutoffs) if terms else kl.new_zeros(())
            total = total + self.bridge_coef * bridge
            out["bridge"] = bridge.detach()
        if self.nmse_coef > 0:
            per = []
            for l in range(L):
                o, r = got[l]["out"].float(), r_out[l].float().reshape(got[l]["out"].shape)
                per.append((o - r).pow(2).mean() / (r.pow(2).mean() + 1e-8))
            nmse = torch.stack(per).mean()
            total = total + self.nmse_coef * nmse
            out["nmse"] = nmse.detach()
        codes = [got[l]["codes"] for l in range(L)]
        if lam > 0:
            from fastclt import ops
            sp = ops.sparsity_loss(codes, model.decoder_norms(), cfg.sparsity, cfg.sparsity_c)
            total = total + lam * sp
            out["sparsity"] = sp.detach()
        fired, l0 = model.code_stats(codes)
        out.update(loss=total, l0=l0, fired=fired)
        return out

    @staticmethod
    @contextlib.contextmanager
    def _grab(mlps: list, store: dict):
        def hook(l):
            def fn(module, args, output):
                store[l] = output[0] if isinstance(output, tuple) else output
            return fn
        handles = [m.register_forward_hook(hook(l)) for l, m in enumerate(mlps)]
        try:
            yield store
        finally:
            for h in handles:
                h.remove()


@torch.no_grad()
def evaluate_adapters(adapted: AdaptedModel, reference: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> dict:
    """KL(p_ref ‖ q) of the adapted model and of the base model alone (adapters off), mean over all
    positions, and the adapters' L0 per layer, on ids [N, T]."""
    device = next(adapted.lm.parameters()).device
    L = adapted.adapters.n_layers
    kl = kl_base = 0.0
    l0 = torch.zeros(L, dtype=torch.float64)
    rec = Splice(adapted.adapters, adapted.lm, paths=adapted.splice.paths, mode="add", as_trained=True,
                 record_stats=True)
    flags = [(m, m.training) for m in (adapted.lm, reference)]
    was_on = adapted.enabled
    adapted.disable()
    try:
        adapted.lm.eval()
        reference.eval()
        for i in range(0, ids.shape[0], batch_size):
            b = ids[i:i + batch_size].to(device)
            lp_ref = lm_logits(reference, b).float().log_softmax(-1)
            kl_base += float(_kl(lp_ref, lm_logits(adapted.lm, b))) * b.numel()
            with rec:
                kl += float(_kl(lp_ref, lm_logits(adapted.lm, b))) * b.numel()
    finally:
        for m, was in flags:
            m.train(was)
        if was_on:
            adapted.enable()
    l0 = rec.stats()["l0"]
    n = ids.numel()
    return {"kl_to_reference": kl / n, "kl_base_to_reference": kl_base / n, "l0": sum(l0) / L, "l0_per_layer": l0}


# ---------------------------------------------------------------------- training
def _fingerprint(a: argparse.Namespace) -> dict:
    """What a checkpoint must agree with to be resumed (run-control options may change)."""
    control = {"max_steps", "device", "out_dir", "resume", "checkpoint_every", "keep", "log_every", "progress",
               "eval_every", "eval_seqs", "impl"}
    return {f"adapters.{k}": v for k, v in sorted(vars(a).items()) if k not in control}


class _Log:
    """What fastclt.training.metrics.MetricsLogger reads of a run configuration."""

    def __init__(self, a) -> None:
        from types import SimpleNamespace
        self.log = SimpleNamespace(progress=a.progress, wandb=False, tensorboard=False, project="fastclt")
        self._a = a

    def to_dict(self) -> dict:
        return dict(vars(self._a))


def train_adapters(a: argparse.Namespace) -> dict:
    """The adapter training run of the command line's options ``a`` (see ``main``); its summary."""
    from fastclt.checkpoint import CheckpointError, write_json
    from fastclt.lm import load_lm
    from fastclt.tokens import TokenSource, bos_token_id
    from fastclt.training import checkpointing as ckpt
    from fastclt.training.metrics import MetricsLogger
    from fastclt.training.parallel import Layout
    from fastclt.training.rundir import RunLock
    device = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    busy = lock.acquire()
    if busy is not None:
        raise ValueError(f"out_dir: {out} is in use by another run ({busy}); wait for it to end or use another out_dir")
    logger = None
    try:
        ckpt.remove_stale_files(out)
        base = freeze(load_lm(a.base, device, a.lm_dtype))
        reference = freeze(load_lm(a.reference, device, a.lm_dtype))
        torch.manual_seed(a.seed)
        adapters = new_adapters(base, a.n_features, a.activation, sparsity=a.sparsity, sparsity_coef=a.sparsity_coef,
                                sparsity_c=a.sparsity_c, threshold_init=a.threshold_init, seed=a.seed)
        adapters.impl = a.impl
        adapted = AdaptedModel(base, adapters)
        autocast = a.autocast == "bf16" or (a.autocast == "auto" and device.type == "cuda")
        obj = AdapterObjective(adapted, reference, kl_coef=a.kl_coef, bridge_coef=a.bridge_coef,
                               n_cutoffs=a.n_cutoffs, directions=a.directions, nmse_coef=a.nmse_coef,
                               lm_checkpoint=a.lm_checkpoint, autocast=autocast, seed=a.seed)
        tok = None
        if a.data != "random" and not a.data.endswith(".npy"):
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(a.base, local_files_only=True)
        vocab = base.config.vocab_size
        bos = bos_token_id(base.config, tok)
        src = TokenSource(a.data, a.ctx_len, vocab_size=vocab, tokenizer=tok, seed=a.seed, prepend_bos=a.prepend_bos,
                          bos_id=bos, text_field=a.text_field)
        if a.eval_seqs:
            total = src.n_sequences
            if total is None:
                held = TokenSource("random", a.ctx_len, vocab_size=vocab, seed=a.seed + 1, prepend_bos=a.prepend_bos,
                                   bos_id=bos)
                eval_ids = held.sequences(0, a.eval_seqs)
            else:
                n = min(a.eval_seqs, total)
                eval_ids = src.sequences(total - n, n)
        params = list(adapters.named_parameters())
        names, plist = [n for n, _ in params], [p for _, p in params]
        opt = torch.optim.Adam(plist, lr=a.lr, betas=(a.beta1, a.beta2))
        layout, fp = Layout(), _fingerprint(a)
        step = micro = tokens = 0
        if a.resume != "never":
            folders = [Path(a.resume)] if a.resume != "auto" else ckpt.find_checkpoints(out)
            for folder in folders:
                try:
                    tensors, state = ckpt.load_checkpoint(folder, layout, fp, device, resolve=False)
                except CheckpointError as e:
                    if a.resume != "auto":
                        raise
                    print(f"warning: checkpoint {folder} is unusable ({e}); trying the previous one", flush=True)
                    continue
                ckpt.restore(tensors, adapters, opt, names, device)
                step, micro, tokens = state["step"], state["micro"], state["tokens"]
                print(f"resumed from {folder} (step {step})", flush=True)
                break
        elif ckpt.find_checkpoints(out, complete_only=False):
            raise ValueError(f"resume: never, but {ckpt.checkpoint_dir(out)} holds checkpoints; use another out_dir")
        write_json(out / "config.json", vars(a))
        logger = MetricsLogger(out, _Log(a), True, a.steps, step)
        stop_at = min(a.steps, a.max_steps) if a.max_steps else a.steps

        def evaluate(at: int) -> dict:
            m = evaluate_adapters(adapted, reference, eval_ids, a.batch_size)
            rec = {"step": at, "eval/kl_to_reference": m["kl_to_reference"],
                   "eval/kl_base_to_reference": m["kl_base_to_reference"], "eval/l0": m["l0"]}
            rec.update({f"eval/layer{l}/l0": v for l, v in enumerate(m["l0_per_layer"])})
            logger.log(rec)
            logger.note(kl_ref=f"{m['kl_to_reference']:.4g}")
            return m

        if a.eval_seqs and a.eval_every and step == 0:
            evaluate(0)
        t0, tok_step = time.perf_counter(), a.batch_size * a.ctx_len * a.grad_accum
        adapters.train()
        while step < stop_at:
            step += 1
            lr = a.lr * min(1.0, step / a.lr_warmup_steps) if a.lr_warmup_steps else a.lr
            for g in opt.param_groups:
                g["lr"] = lr
            lam = a.sparsity_coef * (min(1.0, step / a.sparsity_warmup_steps) if a.sparsity_warmup_steps else 1.0)
            parts: dict = {}
            for _ in range(a.grad_accum):
                ids = src.sequences(micro * a.batch_size, a.batch_size).to(device)
                r = obj.loss(ids, lam, obj.cutoffs(step, micro))
                micro += 1
                (r["loss"] / a.grad_accum).backward()
                for k in ("loss", "kl", "bridge", "nmse", "sparsity"):
                    if k in r:
                        parts[k] = parts.get(k, 0.0) + float(r[k].detach()) / a.grad_accum
            tokens += tok_step
            gnorm = torch.nn.utils.clip_grad_norm_(plist, a.clip_grad if a.clip_grad > 0 else float("inf"))
            if not (math.isfinite(parts["loss"]) and math.isfinite(float(gnorm))):
                raise FloatingPointError(f"step {step}: the loss or gradient is not finite (loss={parts['loss']}); "
                                         f"lower --lr")
            opt.step()
            opt.zero_grad(set_to_none=True)
            adapters.post_step()
            if step % a.log_every == 0 or step == stop_at:
                rec = {"step": step, "tokens": tokens, "lr": lr, "sparsity_coef": lam, **parts,
                       "grad_norm": float(gnorm), "l0": float(r["l0"].float().mean())}
                rec.update({f"layer{l}/l0": float(v) for l, v in enumerate(r["l0"])})
                logger.log(rec)
            logger.progress(1, parts["loss"], tok_step / max(time.perf_counter() - t0, 1e-9))
            t0 = time.perf_counter()
            if a.eval_seqs and a.eval_every and step % a.eval_every == 0 and step < a.steps:
                evaluate(step)
            if (a.checkpoint_every and step % a.checkpoint_every == 0) or step == stop_at:
                ckpt.save_checkpoint(out, step, adapters, opt, names, {}, {"step": step, "micro": micro,
                                                                           "tokens": tokens},
                                     layout, fp, vars(a), a.keep, lambda flag: bool(flag))
        if step < a.steps:
            logger.close()
            print(f"stopped at --max_steps {step}; checkpoint saved, rerun to resume", flush=True)
            return {}
        summary = {"steps": step, "tokens": tokens}
        if a.eval_seqs:
            summary.update(evaluate(step))
        logger.close()
        adapted.save_pretrained(out / "model", tokenizer=tok)
        write_json(out / "summary.json", summary)
        if "kl_to_reference" in summary:
            print(f"done: KL(reference ‖ adapted) {summary['kl_to_reference']:.4g} (base alone "
                  f"{summary['kl_base_to_reference']:.4g}), L0 {summary['l0']:.2f}", flush=True)
        print(f"model: {out / 'model'}  (AdaptedModel.from_pretrained)", flush=True)
        return summary
    finally:
        if logger is not None:
            logger.close()
        lock.release()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastclt.adapters", description="Train transcoder adapters: a sparse "
                                "branch added to every MLP of a frozen base model so that it behaves like a "
                                "reference model (docs/TRAINING_THROUGH_LM.md).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--base", required=True, help="local transformers folder of the base model (frozen)")
    a("--reference", required=True, help="local transformers folder of the reference model (same architecture)")
    a("--data", required=True, help="token source: 'random', a text file, a dataset file/folder or a .npy of ids")
    a("--out_dir", default="runs/adapters", help="metrics.jsonl, checkpoints/, model/, summary.json")
    a("--n_features", type=int, default=1024, help="adapter features per MLP")
    a("--activation", default="relu", choices=ACTIVATIONS)
    a("--threshold_init", type=float, default=0.05, help="JumpReLU θ at the start")
    a("--sparsity", default="l1", choices=("l1", "tanh"), help="penalty on the activations (× decoder norm)")
    a("--sparsity_coef", type=float, default=1e-3, help="its weight after the warm-up")
    a("--sparsity_c", type=float, default=1.0, help="c of the tanh penalty")
    a("--sparsity_warmup_steps", type=int, default=0, help="linear ramp of the sparsity weight from 0")
    a("--kl_coef", type=float, default=1.0, help="weight of KL(reference ‖ adapted)")
    a("--bridge_coef", type=float, default=2.0, help="weight of the bridging KL")
    a("--n_cutoffs", type=int, default=1, help="bridging cutoffs drawn per micro-batch (0: no bridging)")
    a("--directions", default="both", choices=DIRECTIONS, help="bridging directions")
    a("--nmse_coef", type=float, default=0.0, help="weight of the per-layer NMSE to the reference MLP outputs")
    a("--steps", type=int, default=1000, help="optimizer steps")
    a("--max_steps", type=int, default=None, help="stop after this step (resume later)")
    a("--batch_size", type=int, default=8, help="sequences per micro-batch")
    a("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--ctx_len", type=int, default=128, help="tokens per sequence")
    a("--prepend_bos", action="store_true", help="start every sequence with the BOS token")
    a("--text_field", default="text", help="dataset column holding the text")
    a("--lr", type=float, default=8e-4, help="Adam learning rate")
    a("--lr_warmup_steps", type=int, default=0, help="linear warm-up of the learning rate")
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=0.999)
    a("--clip_grad", type=float, default=1.0, help="max gradient norm (0: off)")
    a("--seed", type=int, default=0, help="adapter init, cutoffs, random tokens")
    a("--device", default="auto", help="auto | cpu | cuda")
    a("--lm_dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of both models")
    a("--autocast", default="auto", choices=("auto", "bf16", "none"), help="auto: bf16 on CUDA")
    a("--lm_checkpoint", action="store_true", help="activation checkpointing of the models' blocks")
    a("--impl", default="auto", help="kernels: auto | cuda | triton | cpu | reference")
    a("--checkpoint_every", type=int, default=500, help="steps between checkpoints (and at the end)")
    a("--keep", type=int, default=2, help="checkpoints kept")
    a("--resume", default="auto", help="auto (newest intact checkpoint in out_dir) | never | PATH")
    a("--log_every", type=int, default=1, help="steps between metrics.jsonl lines")
    a("--eval_every", type=int, default=0, help="steps between evaluations on held-out sequences (0: end only)")
    a("--eval_seqs", type=int, default=16, help="held-out sequences (the corpus's last; random: another seed)")
    a("--no_progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _check(a: argparse.Namespace) -> None:
    for key in ("n_features", "steps", "batch_size", "grad_accum", "log_every", "keep"):
        if getattr(a, key) < 1:
            raise ValueError(f"--{key}: expected a positive integer, got {getattr(a, key)}")
    for key in ("lr_warmup_steps", "sparsity_warmup_steps", "eval_every", "eval_seqs", "checkpoint_every"):
        if getattr(a, key) < 0:
            raise ValueError(f"--{key}: expected an integer >= 0, got {getattr(a, key)}")
    if a.max_steps is not None and a.max_steps < 1:
        raise ValueError(f"--max_steps: expected a positive integer, got {a.max_steps}")
    for key in ("lr", "sparsity_coef", "sparsity_c", "kl_coef", "bridge_coef", "nmse_coef", "clip_grad",
                "threshold_init"):
        v = getattr(a, key)
        strict = key in ("lr", "sparsity_c")
        if not math.isfinite(v) or v < 0 or (strict and v == 0):
            raise ValueError(f"--{key}: expected a finite {'positive' if strict else 'non-negative'} number, got {v}")
    if a.ctx_len < 2:
        raise ValueError(f"--ctx_len: next-token distributions need at least 2 tokens per sequence, got {a.ctx_len}")
    for key in ("base", "reference"):
        if not Path(getattr(a, key)).is_dir():
            raise ValueError(f"--{key}: {getattr(a, key)} is not a folder (nothing is downloaded; give a local "
                             f"transformers model folder)")
    if a.data != "random" and not Path(a.data).exists():
        raise ValueError(f"--data: {a.data} is neither 'random' nor an existing file or dataset folder")
    if a.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda, got {a.device!r}")
    if a.resume not in ("auto", "never") and not Path(a.resume, "meta.json").is_file():
        raise ValueError(f"--resume: {a.resume} is neither auto, never, nor a checkpoint folder (with meta.json)")


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        _check(a)
        train_adapters(a)
    except (ValueError, TypeError, OSError, ImportError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
