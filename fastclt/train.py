"""Train a sparse dictionary (CLT, PLT or SAE) on transformer activations.

    # anywhere, no flags: a small CLT on built-in synthetic activations (about a minute on 2 CPU
    # cores); ends by reporting how well it recovered the planted features (mmcs)
    python -m fastclt.train
    # 1 GPU
    python -m fastclt.train --config run.yaml
    # 1 node, 8 GPUs: features sharded 4 ways (tensor parallel), 2 data-parallel replicas
    torchrun --standalone --nproc_per_node=8 -m fastclt.train --config run.yaml --train.tp 4
    # 2 nodes × 8 GPUs (run on every node; NODE_RANK 0 and 1)
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
             --rdzv_endpoint=$MASTER_HOST:29500 -m fastclt.train --config run.yaml --train.tp 8
    # CPU, 2 processes over gloo
    torchrun --standalone --nproc_per_node=2 -m fastclt.train --train.device cpu --train.tp 2

``--help`` lists every option and its default (fastclt.training.config). The output folder
(``--out_dir``) receives config.yaml/config.json, metrics.jsonl, checkpoints/, model/ (the merged
save_pretrained model, its config recording the LM, blocks and input hook of the data), summary.json
and summary.png (+ replacement.png). With an LM at hand (data.source hf, or shards with eval.lm) the
replacement model is evaluated (fastclt.eval: KL, CE recovered, …) every train.eval_every steps and
at the end. Re-running the same command resumes from the newest intact checkpoint there.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

import fastclt
from fastclt.checkpoint import CheckpointError
from fastclt.models import MODEL_KINDS
from fastclt.training import checkpointing as ckpt
from fastclt.training.config import ConfigError, RunConfig, help_text, load_config
from fastclt.training.data import Prefetcher, make_source, share_batch
from fastclt.training.metrics import MetricsLogger, step_flops, write_summary
from fastclt.training.parallel import (Layout, TensorParallel, allreduce_grads, clip_grad_norm, gather_full_state,
                                       init_distributed, shard_state)

__all__ = ["main", "train"]


def lr_at(step: int, t) -> float:
    """Linear warm-up over lr_warmup_steps, then cosine/linear decay to lr·lr_min_ratio at t.steps."""
    if t.lr_warmup_steps and step <= t.lr_warmup_steps:
        return t.lr * step / t.lr_warmup_steps
    if t.lr_decay == "none":
        return t.lr
    span = max(t.steps - t.lr_warmup_steps, 1)
    frac = min(max(step - t.lr_warmup_steps, 0) / span, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if t.lr_decay == "cosine" else 1 - frac
    return t.lr * (t.lr_min_ratio + (1 - t.lr_min_ratio) * shape)


def sparsity_at(step: int, t, coef: float) -> float:
    """λ ramps linearly from 0 over sparsity_warmup_steps."""
    if not t.sparsity_warmup_steps:
        return coef
    return coef * min(step / t.sparsity_warmup_steps, 1.0)


class _Signals:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits at the end of the step."""

    def __init__(self) -> None:
        self.flag = False
        self.old = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def __exit__(self, *exc) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _device(cfg: RunConfig) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but torch.cuda.is_available() is False")
    return torch.device(want)


def _say(layout: Layout, msg: str) -> None:
    if layout.is_main:
        print(msg, flush=True)


def train(cfg: RunConfig) -> dict:
    """Run the configured training; return the summary dict (rank 0; {} elsewhere)."""
    device = _device(cfg)
    owns_pg = not dist.is_initialized()
    layout = init_distributed(cfg.train.tp, device.type)
    try:
        if device.type == "cuda":
            device = torch.device("cuda", layout.local_rank)
        return _Run(cfg, layout, device).run()
    finally:
        if owns_pg and dist.is_initialized():
            dist.destroy_process_group()


class _Run:
    def __init__(self, cfg: RunConfig, layout: Layout, device: torch.device) -> None:
        self.cfg, self.layout, self.device = cfg, layout, device
        self.out = Path(cfg.out_dir)
        self.mcfg = cfg.model_config()
        self.cls = MODEL_KINDS[cfg.kind]

    # ------------------------------------------------------------------ helpers
    def barrier(self) -> None:
        if self.layout.distributed:
            dist.barrier()

    def _agree(self, *flags: bool) -> list:
        """Each flag OR-ed over all ranks (one small all-reduce), so that every rank takes the same branch."""
        if not self.layout.distributed:
            return [bool(f) for f in flags]
        t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def _build(self):
        cfg, lay = self.cfg, self.layout
        torch.manual_seed(cfg.train.seed)
        with torch.device(self.device):  # the full model, built alike on every rank: each shard is its slice
            full = self.cls(self.mcfg)
        src = self.source
        n_init = -(-cfg.train.init_samples // cfg.train.batch_size)
        # the same sample on every rank and for every layout: the first micro-batches of the stream
        # (synthetic: negative batch numbers, never seen in training)
        x, y = share_batch(src, lay, src.init_sample(n_init), n_init * cfg.train.batch_size, self.device,
                           full.param_dtype)
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError("data: the activations contain NaN or Inf (first batches used to initialise the model)")
        if cfg.kind == "sae":
            full.initialize_from_data(x[:, 0], fire_rate=cfg.train.init_fire_rate)
        else:
            full.initialize_from_data(x, y, fire_rate=cfg.train.init_fire_rate)
        self.axes = full.feature_axes()
        if lay.tp == 1:
            model = full
        else:
            kw = {"n_features": self.mcfg.n_features // lay.tp}
            if self.mcfg.activation in ("topk", "batchtopk"):
                kw["k_aux"] = self.mcfg.effective_k_aux
            with torch.device(self.device):
                model = self.cls(self.mcfg.replace(**kw))
            model.load_state_dict(shard_state(full.state_dict(), self.axes, lay.tp, lay.tp_rank))
            model.tp = TensorParallel(lay.tp_group, lay.tp, lay.tp_rank)
        del full
        # auto: the Triton/CUDA kernels on GPUs, the C++ kernels on CPUs (the references where a
        # kernel is not built or does not take the dtype)
        model.impl = cfg.train.impl
        return model.to(self.device)

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict:
        cfg, lay, t = self.cfg, self.layout, self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        self.source = make_source(cfg, lay, self.device)
        # the dictionary records what it reads and writes: the LM, its blocks, the input hook
        self.lm_meta = self.source.lm_metadata()
        try:
            self.mcfg = self.mcfg.replace(**self.lm_meta)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"data.layers: {e}") from e
        self.evaluator = _Evaluator(cfg, self.source, self.device) if lay.is_main else None
        model = self.model = self._build()
        params = list(model.named_parameters())
        self.param_names = [n for n, _ in params]
        sharded = [p for n, p in params if lay.tp > 1 and self.axes.get(n) is not None]
        replicated = [p for n, p in params if not (lay.tp > 1 and self.axes.get(n) is not None)]
        # fused Adam on CUDA and on the CPU (one pass over each parameter: ~20× faster than the
        # default foreach path on a CPU); the default where this torch has no fused kernel for it
        kw = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps)
        try:
            opt = torch.optim.Adam([p for _, p in params], fused=True, **kw)
        except (RuntimeError, ValueError, TypeError):
            opt = torch.optim.Adam([p for _, p in params], **kw)
        L_local = model.n_layers
        F_local = model.cfg.n_features
        since_fired = torch.zeros(L_local, F_local, dtype=torch.int64, device=self.device)
        step, micro, tokens_seen = 0, 0, 0
        fp = cfg.fingerprint()

        # ---- resume
        if cfg.checkpoint.resume == "never" and ckpt.find_checkpoints(self.out, complete_only=False):
            raise ConfigError(f"checkpoint.resume: never, but {ckpt.checkpoint_dir(self.out)} holds checkpoints of an "
                              f"earlier run; use another out_dir or delete that folder to start over")
        if cfg.checkpoint.resume != "never":
            auto = cfg.checkpoint.resume == "auto"
            cands = ckpt.find_checkpoints(self.out) if auto else [Path(cfg.checkpoint.resume)]
            for folder in cands:
                err = None
                try:
                    tensors, info = ckpt.load_checkpoint(folder, lay, fp, self.device)
                except ckpt.ConfigMismatch:
                    raise
                except CheckpointError as e:
                    err = str(e)
                if err is not None and not lay.is_main:
                    print(f"warning (rank {lay.rank}): {err}", file=sys.stderr, flush=True)
                if self._agree(err is not None)[0]:
                    _say(lay, f"warning: checkpoint {folder} is unusable ({err or 'corrupt on another rank'}); "
                              f"trying the previous one")
                    if lay.is_main and cfg.checkpoint.resume == "auto":  # out of the rotation, kept for inspection
                        folder.rename(folder.with_name(folder.name + ".corrupt"))
                    self.barrier()
                    continue
                extra = ckpt.restore(tensors, model, opt, self.param_names, self.device)
                since_fired = extra["tokens_since_fired"].to(self.device)
                if getattr(self.source, "stateful", False):
                    self.source.load_state_dict({k[5:]: v for k, v in extra.items() if k.startswith("data.")})
                step, micro, tokens_seen = info["state"]["step"], info["state"]["micro"], info["state"]["tokens"]
                _say(lay, f"resumed from {folder} (step {step})")
                break

        if lay.is_main:  # after the resume check: a refused run leaves the folder as it was
            cfg.save(self.out)
        pref = self.pref = Prefetcher(self.source, micro, self.device, model.param_dtype, cfg.data.prefetch, lay)
        logger = MetricsLogger(self.out, cfg, lay.is_main, t.steps, step)
        use_autocast = t.autocast == "bf16" or (t.autocast == "auto" and self.device.type == "cuda")
        tokens_per_step = t.batch_size * t.grad_accum * lay.dp
        stop_at = min(t.steps, t.max_steps) if t.max_steps is not None else t.steps
        t0 = time.perf_counter()
        t_log, steps_since_log = t0, 0
        start_step = step
        lam0 = self.mcfg.sparsity_coef
        if t.eval_every and step == 0 and self.mcfg.activation != "batchtopk":
            self._evaluate(0, logger)  # the baseline (a BatchTopK model has no thresholds before training)
        model.train()
        try:
            with _Signals() as sig:
                while step < stop_at:
                    step += 1
                    lr = lr_at(step, t)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    lam = sparsity_at(step, t, lam0)
                    dead = since_fired >= t.dead_tokens
                    dead_arg = None
                    if self.mcfg.activation in ("topk", "batchtopk"):
                        dead_arg = dead[0] if cfg.kind == "sae" else dead
                    fired = torch.zeros_like(dead)
                    for _ in range(t.grad_accum):
                        x, y = pref.get()
                        micro += 1
                        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_autocast):
                            if cfg.kind == "sae":
                                out = model.loss(x[:, 0], None, dead_mask=dead_arg, sparsity_coef=lam)
                            else:
                                out = model.loss(x, y, dead_mask=dead_arg, sparsity_coef=lam)
                        (out.loss / t.grad_accum).backward()
                        fired |= out.fired
                    if lay.dp > 1:  # the same dead mask on every replica
                        f8 = fired.to(torch.uint8)
                        dist.all_reduce(f8, op=dist.ReduceOp.MAX, group=lay.dp_group)
                        fired = f8.bool()
                    since_fired += tokens_per_step
                    since_fired[fired] = 0
                    tokens_seen += tokens_per_step
                    allreduce_grads([p for _, p in params], lay)
                    if cfg.kind == "sae":
                        model.project_decoder_grads()
                    gnorm = clip_grad_norm(sharded, replicated, t.clip_grad, lay)
                    loss_val = float(out.loss.detach())
                    bad = not math.isfinite(loss_val) or not math.isfinite(float(gnorm))
                    stop, bad = self._agree(sig.flag, bad)
                    if bad:
                        raise FloatingPointError(
                            f"step {step}: the loss or gradient is not finite (loss={loss_val}, grad_norm="
                            f"{float(gnorm)}); the last good checkpoint in {ckpt.checkpoint_dir(self.out)} is "
                            f"kept — lower train.lr or check the activations")
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    model.post_step()
                    steps_since_log += 1
                    if step % cfg.log.every == 0 or step == stop_at:
                        now = time.perf_counter()
                        tps = tokens_per_step * steps_since_log / max(now - t_log, 1e-9)
                        rec = self._record(out, step, tokens_seen, lr, lam, since_fired, gnorm, tps)
                        logger.log(rec)
                        logger.progress(steps_since_log, rec["loss"], tps)
                        t_log, steps_since_log = now, 0
                    if t.eval_every and step % t.eval_every == 0 and step < t.steps and not stop:
                        self._evaluate(step, logger)
                    if stop or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == stop_at:
                        self._save(step, micro, tokens_seen, opt, since_fired)
                    if stop:
                        logger.close()
                        _say(lay, f"\nstopped by a signal at step {step}; checkpoint saved, rerun to resume")
                        return {}
            elapsed = time.perf_counter() - t0
            if step < t.steps:  # max_steps reached: a simulated preemption
                logger.close()
                _say(lay, f"stopped at train.max_steps={step}; checkpoint saved, rerun to resume")
                return {}
            return self._finish(pref, since_fired, tokens_seen, elapsed, step - start_step, tokens_per_step, logger)
        finally:
            logger.close()
            pref.close()

    # ------------------------------------------------------------------ pieces
    def _record(self, out, step, tokens, lr, lam, since_fired, gnorm, tps) -> dict:
        m = dict(out.metrics)
        dead = (since_fired >= self.cfg.train.dead_tokens).float().sum()
        if self.layout.tp > 1:
            dist.all_reduce(dead, group=self.layout.tp_group)
        names = sorted(k for k, v in m.items() if isinstance(v, float))
        if self.layout.dp > 1:  # average the replicas' metrics
            v = torch.tensor([m[k] for k in names], dtype=torch.float64, device=self.device)
            dist.all_reduce(v, group=self.layout.dp_group)
            m = dict(zip(names, (v / self.layout.dp).tolist()))
        rec = {"step": step, "tokens": tokens, "lr": lr, "sparsity_coef": lam}
        rec.update({k: m[k] for k in names})
        rec["dead_fraction"] = float(dead) / (since_fired.numel() * self.layout.tp)
        rec["grad_norm"] = float(gnorm)
        rec["tokens_per_s"] = tps
        rec["tflops"] = step_flops(self.mcfg, self.cfg.kind, 1, m.get("l0", 0.0)) * tps / 1e12
        return rec

    def _save(self, step, micro, tokens, opt, since_fired) -> None:
        extra = {"tokens_since_fired": since_fired}
        extra.update({f"data.{k}": v for k, v in (self.pref.state() or {}).items()})
        full_config = self.cfg.to_dict()
        full_config["model"].update(self.lm_meta)  # merge_checkpoint rebuilds the model's config from it
        ckpt.save_checkpoint(self.out, step, self.model, opt, self.param_names, extra,
                             {"step": step, "micro": micro, "tokens": tokens}, self.layout, self.cfg.fingerprint(),
                             full_config, self.cfg.checkpoint.keep, self.barrier)

    def _full_model(self, state: dict):
        full = self.cls(self.mcfg)
        full.load_checked_state(state, source="merged shards")
        full.impl = self.cfg.train.impl
        return full

    @torch.no_grad()
    def _evaluate(self, step: int, logger, state: Optional[dict] = None, gathered: bool = False) -> Optional[dict]:
        """The replacement model on rank 0 (every rank joins the state gather unless ``gathered``: the
        merged ``state`` is at hand, None on ranks other than tp rank 0); None without an LM."""
        active = self._agree(self.evaluator is not None and self.evaluator.active)[0]
        if not active:
            return None
        if not gathered:
            state = gather_full_state(self.model, self.layout)
        m = None
        if self.layout.is_main:
            m = self.evaluator.run(self._full_model(state).to(self.device))
            logger.log({"step": step, **_eval_record(m)})
            logger.note(kl=f"{m['kl']:.4g}", ce_rec=f"{m['ce_recovered']:.3f}")
        self.barrier()
        return m

    @torch.no_grad()
    def _finish(self, pref, since_fired, tokens_seen, elapsed, steps_run, tokens_per_step, logger) -> dict:
        cfg, lay = self.cfg, self.layout
        model = self.model
        model.eval()
        fvu, l0, n = None, None, 0
        use_autocast = cfg.train.autocast == "bf16" or (cfg.train.autocast == "auto" and self.device.type == "cuda")
        for _ in range(cfg.train.eval_batches):
            x, y = pref.get()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_autocast):
                out = model.loss(x[:, 0], None) if cfg.kind == "sae" else model.loss(x, y)
            f, z = out.per_layer["fvu"].float().cpu(), out.per_layer["l0"].float().cpu()
            fvu = f if fvu is None else fvu + f
            l0 = z if l0 is None else l0 + z
            n += 1
        # every rank draws them (an LM source broadcasts batches across tp ranks); rank 0 uses them
        cal_batches = [pref.get() for _ in range(cfg.train.calibrate_batches)] if cfg.train.calibrate_jumprelu else None
        dead = (since_fired >= cfg.train.dead_tokens).float().sum()
        if lay.tp > 1:
            dist.all_reduce(dead, group=lay.tp_group)
        if lay.dp > 1 and hasattr(model, "cut_mean"):
            # BatchTopK → JumpReLU statistics are per replica during training; pool them for the export
            for name, mean in (("cut_mean", True), ("feature_cut_sum", False), ("feature_cut_count", False)):
                buf = getattr(model, name)
                dist.all_reduce(buf, group=lay.dp_group)
                if mean:
                    buf /= lay.dp
        state = gather_full_state(model, lay)
        replacement = self._evaluate(cfg.train.steps, logger, state, gathered=True)
        logger.close()
        summary = {}
        if lay.is_main:
            full = self._full_model(state)
            full.save_pretrained(self.out / "model")
            summary = {"steps": cfg.train.steps, "tokens": tokens_seen,
                       "tokens_per_s": tokens_per_step * steps_run / max(elapsed, 1e-9),
                       "dead_fraction": float(dead) / (since_fired.numel() * lay.tp),
                       "world": lay.world, "tp": lay.tp, "dp": lay.dp, "device": str(self.device)}
            if n:
                summary.update({"fvu": float(fvu.mean() / n), "l0": float(l0.mean() / n),
                                "fvu_per_layer": (fvu / n).tolist(), "l0_per_layer": (l0 / n).tolist()})
            flops_per_token = step_flops(self.mcfg, cfg.kind, 1, summary.get("l0", 0.0))
            summary["tflops"] = flops_per_token * summary["tokens_per_s"] / 1e12
            if cfg.data.source == "synthetic" and hasattr(full, "decoder_weight"):  # a MOLT has no decoder rows
                from fastclt.training.synthetic import mmcs
                m, per = mmcs(full, self.source.gen)
                summary["mmcs"], summary["mmcs_per_layer"] = m, per
            if replacement is not None:
                summary["replacement"] = replacement
            if cfg.train.calibrate_jumprelu:
                summary["calibration"] = self._calibrate(full, cal_batches)
            write_summary(self.out, summary, cfg.log.plot)
            line = (f"done: {summary['tokens']:,} tokens, {summary['tokens_per_s']:,.0f} tok/s, "
                    f"FVU {summary.get('fvu', float('nan')):.4f}, L0 {summary.get('l0', float('nan')):.2f}, "
                    f"dead {summary['dead_fraction']:.3f}")
            if "mmcs" in summary:
                line += f", mmcs {summary['mmcs']:.3f} (planted features recovered: mean max cosine similarity)"
            if replacement is not None:
                line += (f", replacement model: KL {replacement['kl']:.4g}, CE recovered "
                         f"{replacement['ce_recovered']:.3f}")
            print(line + f"\nmodel: {self.out / 'model'}  summary: {self.out / 'summary.json'}", flush=True)
        self.barrier()
        return summary

    def _calibrate(self, full, batches: list) -> dict:
        """TopK/BatchTopK → JumpReLU with per-layer thresholds set on ``batches`` (the train.calibrate_batches
        batches of the stream after the evaluation ones, not trained on), saved to model_jumprelu/; its numbers."""
        from fastclt.calibrate import calibrate_and_save
        x, y = (torch.cat(t) for t in zip(*batches))
        sae = self.cfg.kind == "sae"
        cal = calibrate_and_save(full.to(self.device), x[:, 0] if sae else x, None if sae else y,
                                 self.out / "model_jumprelu", batch_size=self.cfg.train.batch_size)
        print(f"JumpReLU copy (L0 {[round(v, 2) for v in cal.l0_after]}, FVU "
              f"{[round(v, 4) for v in cal.fvu_after]}): {self.out / 'model_jumprelu'}", flush=True)
        return cal.summary()


def _eval_record(m: dict) -> dict:
    """The JSONL / wandb fields of an evaluation: eval/<metric> and eval/layer{l}/<metric>."""
    rec = {f"eval/{k}": m[k] for k in ("kl", "ce_clean", "ce_spliced", "ce_ablated", "ce_recovered",
                                       "top1_agreement", "fvu", "l0")}
    for e in m["per_layer"]:
        for k in ("kl", "ce_recovered", "fvu", "l0"):
            if e.get(k) is not None:
                rec[f"eval/layer{e['layer']}/{k}"] = e[k]
    return rec


class _Evaluator:
    """What rank 0 needs to evaluate the replacement model: the LM (data.source hf: the extractor's,
    used under its lock; shards: eval.lm) and the token ids of the evaluation sequences — the last
    eval.n_seqs sequences of a corpus, or a separately seeded random stream."""

    def __init__(self, cfg: RunConfig, source, device: torch.device) -> None:
        self.active = False
        e, d = cfg.eval, cfg.data
        if e.n_seqs == 0 or d.source == "synthetic" or (d.source == "shards" and e.lm is None):
            return
        from fastclt.lm import load_lm
        from fastclt.tokens import TokenSource, bos_token_id
        if d.source == "hf":
            ex = source.ex
            self.lm, self.lock, lm_path = ex.lm, ex.lock, Path(d.model)
            tokens, ctx_len, bos = e.tokens or d.tokens, e.ctx_len or d.ctx_len, d.prepend_bos
            text_field = d.text_field
        else:
            import threading
            m = source.manifest
            self.lm, self.lock, lm_path = load_lm(e.lm, device, d.hf_dtype), threading.Lock(), Path(e.lm)
            tokens = e.tokens or m.get("tokens")
            if tokens is None:
                raise ConfigError("eval.tokens: the shards record no token source; set eval.tokens")
            ctx_len, bos = e.ctx_len or m.get("ctx_len", d.ctx_len), bool(m.get("prepend_bos", False))
            text_field = m.get("text_field", d.text_field)
        tok = None
        if tokens != "random" and not str(tokens).endswith(".npy"):
            from fastclt.training.extract import _load_tokenizer
            tok = _load_tokenizer(lm_path)
        try:
            src = TokenSource(tokens, ctx_len, vocab_size=self.lm.config.vocab_size, tokenizer=tok,
                              seed=cfg.train.seed + 1, prepend_bos=bos, bos_id=bos_token_id(self.lm.config, tok),
                              text_field=text_field)
        except ValueError as err:
            raise ConfigError(f"eval.{err}") from err
        total = src.n_sequences
        n = e.n_seqs if total is None else min(e.n_seqs, total)
        self.ids = src.sequences(0 if total is None else total - n, n)
        self.batch_size, self.per_layer = e.batch_size, e.per_layer
        self.active = True

    def run(self, model) -> dict:
        from fastclt.eval import evaluate_replacement
        with self.lock:
            return evaluate_replacement(model, self.lm, self.ids, batch_size=self.batch_size, per_layer=self.per_layer)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(__doc__.split("``--help``")[0].rstrip())
        print()
        print(help_text())
        return 0
    try:
        cfg = load_config(argv)
        train(cfg)
    except (ConfigError, CheckpointError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
