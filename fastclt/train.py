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
(``--out_dir``, locked by the run that writes there) receives config.yaml/config.json,
metrics.jsonl, checkpoints/, model/ (the merged save_pretrained model, its config recording the LM,
blocks and input hook of the data), summary.json and summary.png (+ replacement.png). With an LM at
hand (data.source hf, or shards with eval.lm) the replacement model is evaluated (fastclt.eval: KL,
CE recovered, …) every train.eval_every steps and at the end. Re-running the same command resumes
from the newest intact checkpoint there. Errors the trainer can name (configuration, data,
checkpoints, a full disk) are printed as ``error: field: …`` and exit with status 2.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from fastclt.checkpoint import CheckpointError
from fastclt.training import checkpointing as ckpt
from fastclt.training.config import ConfigError, RunConfig, build_parser, load_config
from fastclt.training.data import Prefetcher, make_source, share_batch
from fastclt.training import graphed
from fastclt.training.metrics import MetricsLogger, last_logged, step_flops, write_summary
from fastclt.training.parallel import (Layout, TensorParallel, allreduce_grads, clip_grad_norm, gather_full_state,
                                       init_distributed, shard_state, shutdown_distributed)
from fastclt.training.rundir import RunLock, die_with_parent, probe_writable

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
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:  # a torchrun worker: die with the launcher
        die_with_parent()
    with contextlib.ExitStack() as resources:  # what a run opens is closed here, in reverse order
        if not dist.is_initialized():
            resources.callback(shutdown_distributed)
        layout = init_distributed(cfg.train.tp, device.type)
        if device.type == "cuda":
            device = torch.device("cuda", layout.local_rank)
        return _Run(cfg, layout, device, resources).run()


@dataclass
class _Progress:
    """Where the run stands: optimizer steps, micro-batches consumed (the data position), tokens."""
    step: int = 0
    micro: int = 0
    tokens: int = 0


class _Run:
    """One training run, top to bottom (``run``): the out_dir is locked and checked; the data
    source, model and optimizer are built; a checkpoint is resumed; then steps (``_step``), each
    logged, evaluated and checkpointed on schedule; ``_finish`` writes the model and the summary.
    The resources it opens (run lock, prefetcher, metrics logger) are registered with
    ``resources`` and closed by ``train`` in one place, however the run ends."""

    def __init__(self, cfg: RunConfig, layout: Layout, device: torch.device, resources) -> None:
        self.cfg, self.layout, self.device, self.resources = cfg, layout, device, resources
        self.out = Path(cfg.out_dir)
        self.mcfg = cfg.model_config()
        self.cls = ckpt.model_class(self.mcfg)
        self.p = _Progress()
        self.pref = self.logger = None
        t = cfg.train
        self.tokens_per_step = t.batch_size * t.grad_accum * layout.dp
        self.stop_at = min(t.steps, t.max_steps) if t.max_steps is not None else t.steps
        self.autocast = t.autocast == "bf16" or (t.autocast == "auto" and device.type == "cuda")
        self.e2e = t.objective != "reconstruction"  # trained through the LM (fastclt.training.e2e)
        self.objective = None
        self._read: Optional[dict] = None  # values _step read for this step's log line (_record)
        self.graph = None  # train.cuda_graph: the captured forward and backward (StepGraph), made at first use
        if t.cuda_graph and device.type not in graphed.GRAPH_DEVICES:
            raise ConfigError(f"train.cuda_graph: captures the step on a CUDA device; this run is on {device.type} "
                              f"(set train.device cuda, or train.cuda_graph false)")

    def run(self) -> dict:
        self._open_out_dir()
        self._check_memory()
        self._open_source()
        self._build()
        self._resume()
        if self.p.step >= self.cfg.train.steps and self._agree(self.layout.is_main and self._finished())[0]:
            return self._report_finished()
        self._start()
        if not self._train():
            return {}
        return self._finish()

    # ------------------------------------------------------------------ collectives
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

    # ------------------------------------------------------------------ set-up
    def _open_out_dir(self) -> None:
        """Before anything else: out_dir exists and takes writes on every rank, and rank 0 holds its
        lock (a second writer is refused); then leftovers of a killed run's writes are removed."""
        lay, out = self.layout, self.out
        problem = busy = None
        try:
            out.mkdir(parents=True, exist_ok=True)
            if lay.is_main:
                lock = RunLock(out)
                busy = lock.acquire()
                if busy is None:
                    self.resources.callback(lock.release)
            if busy is None:  # (a refused run writes nothing into the other run's folder)
                probe_writable(out, lay.rank)
        except OSError as e:
            problem = e
        failed, locked = self._agree(problem is not None, busy is not None)
        if failed:
            why = f"{type(problem).__name__}: {problem}" if problem is not None else "not writable on another rank"
            raise ConfigError(f"out_dir: {out} cannot be written ({why}); give a writable folder")
        if locked:
            who = f" ({busy})" if busy else " (see rank 0)"
            raise ConfigError(f"out_dir: {out} is in use by another training run{who}; wait for it to end, stop "
                              f"it, or use another out_dir (two runs in one folder would corrupt each other)")
        if lay.is_main:
            n = ckpt.remove_stale_files(out)
            if n:
                print(f"removed {n} temporary file(s) left by an interrupted write in {out}", flush=True)
        self.barrier()

    def _check_memory(self) -> None:
        """Refuse, with numbers, a configuration whose tensors cannot fit: a lower bound of what one
        rank allocates (sizes from a model built on the meta device) against the memory available."""
        need = _memory_needed(self.cfg, self.mcfg, self.cls, self.layout, self.device)
        total = sum(need.values())  # (the parts of one phase of the run: they coexist)
        have, where = _memory_available(self.device)
        per_host = int(os.environ.get("LOCAL_WORLD_SIZE", self.layout.world)) if self.device.type == "cpu" else 1
        if per_host > 1:  # the ranks on one host share its memory
            total *= per_host
            where = f"{where} (shared by its {per_host} ranks)"
        if have is None or total <= have:
            return
        parts = ", ".join(f"{name} {_gib(b)}" for name, b in sorted(need.items(), key=lambda kv: -kv[1]))
        parts = f"per rank: {parts}" if per_host > 1 else parts
        largest = max(need, key=need.get)
        moments = (", or keep Adam's moments in bfloat16 (train.optimizer_moments bfloat16)"
                   if largest == "model, gradients and Adam state" and self.cfg.train.optimizer_moments == "float32"
                   else "")
        raise ConfigError(f"{_BLAME[largest]}: this run needs at least {_gib(total)} ({parts}) but "
                          f"{where} has {_gib(have)} available; lower model.n_features, train.batch_size or "
                          f"train.init_samples, or shard the features over more ranks (train.tp){moments}")

    def _open_source(self) -> None:
        cfg = self.cfg
        self.source = make_source(cfg, self.layout, self.device)
        # the dictionary records what it reads and writes: the LM, its blocks, the input hook
        self.lm_meta = self.source.lm_metadata()
        try:
            self.mcfg = self.mcfg.replace(**self.lm_meta)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"data.layers: {e}") from e
        self.evaluator = _Evaluator(cfg, self.source, self.device) if self.layout.is_main else None

    def _build(self) -> None:
        """The model (each tp rank: its shard of one full model, initialised from the data alike on
        every rank) and its Adam optimizer."""
        lay, t = self.layout, self.cfg.train
        torch.manual_seed(t.seed)
        with torch.device(self.device):  # the full model, built alike on every rank: each shard is its slice
            full = self.cls(self.mcfg)
        if t.init_from is not None:
            self._init_from(full, Path(t.init_from))
        else:
            src = self.source
            n_init = -(-t.init_samples // t.batch_size)
            # the same sample on every rank and for every layout: the first micro-batches of the stream
            # (synthetic: negative batch numbers, never seen in training)
            x, y = share_batch(src, lay, src.init_sample(n_init), n_init * t.batch_size, self.device,
                               full.param_dtype)
            if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
                raise ValueError("data: the activations contain NaN or Inf (first batches used to initialise the "
                                 "model)")
            full.initialize_from_data(*full.batch_inputs(x, y), fire_rate=t.init_fire_rate)
            del x, y
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
        model.impl = t.impl
        self.model = model.to(self.device)
        params = list(self.model.named_parameters())
        self.params = [p for _, p in params]
        self.param_names = [n for n, _ in params]
        self.sharded = [p for n, p in params if lay.tp > 1 and self.axes.get(n) is not None]
        self.replicated = [p for n, p in params if not (lay.tp > 1 and self.axes.get(n) is not None)]
        # fused Adam on CUDA and on the CPU (one pass over each parameter: ~20× faster than the
        # default foreach path on a CPU); the default where this torch has no fused kernel for it.
        # train.optimizer_moments bfloat16: fastclt's Adam with bf16 moments (torch's fused kernel
        # keeps them in the parameters' dtype), rounded stochastically with the same seed on every rank
        kw = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps)
        if t.optimizer_moments == "bfloat16":
            from fastclt.training.optim import Adam
            self.opt = Adam(self.params, moment_dtype=torch.bfloat16, rounding="stochastic", seed=t.seed, **kw)
        else:
            try:
                self.opt = torch.optim.Adam(self.params, fused=True, **kw)
            except (RuntimeError, ValueError, TypeError):
                self.opt = torch.optim.Adam(self.params, **kw)
        self.since_fired = torch.zeros(self.model.n_layers, self.model.cfg.n_features, dtype=torch.int64,
                                       device=self.device)
        # an upper bound of since_fired known on the host: while it is below dead_tokens no feature is
        # dead and AuxK needs no count of them (a device read); None: unknown
        self.silent_bound: Optional[int] = 0
        if self.e2e:
            from fastclt.training.e2e import SplicedObjective
            try:
                self.objective = SplicedObjective(self.model, self.source.ex.lm, t.objective, fvu_coef=t.fvu_coef,
                                                  lm_checkpoint=t.lm_checkpoint, autocast=self.autocast)
            except ValueError as e:
                raise ConfigError(f"train.objective: {e}") from e

    def _init_from(self, full, folder: Path) -> None:
        """train.init_from: the weights (and buffers) of a saved model of this configuration's shape."""
        from fastclt.eval import load_dictionary
        try:
            saved = load_dictionary(folder)
        except (ValueError, TypeError, OSError, CheckpointError) as e:
            raise ConfigError(f"train.init_from: {folder} cannot be loaded ({e})") from e
        if type(saved) is not type(full):
            raise ConfigError(f"train.init_from: {folder} holds a {type(saved).__name__}, but model.kind "
                              f"{self.cfg.kind} builds a {type(full).__name__}")
        ours, theirs = full.cfg.to_dict(), saved.cfg.to_dict()
        # the loss settings may change between the runs; what the weights mean may not
        free = {"sparsity", "sparsity_coef", "sparsity_c", "preact_coef", "reconstruction_loss", "k_aux", "auxk_coef",
                "nonfinite", "jumprelu_bandwidth", "threshold_init", "b_dec_init", "matryoshka_weights", "lm_name"}
        diff = sorted(k for k in set(ours) | set(theirs) if k not in free and ours.get(k) != theirs.get(k))
        if diff:
            shown = ", ".join(f"{k} {theirs.get(k)!r} there vs {ours.get(k)!r} here" for k in diff[:6])
            raise ConfigError(f"train.init_from: the model in {folder} differs from this run's ({shown}); give the "
                              f"model section (and data.layers / data.input_hook) of the run that trained it")
        state = {k: v.to(self.device) for k, v in saved.state_dict().items()}
        full.load_checked_state(state, source=f"train.init_from {folder}")

    # ------------------------------------------------------------------ resume
    def _resume(self) -> None:
        """checkpoint.resume auto: the newest usable checkpoint in out_dir (newer unusable ones are set
        aside as .corrupt; when none is usable, an error unless checkpoint.start_over); never: an
        error if out_dir has checkpoints; PATH: that checkpoint, or an error (nothing is changed)."""
        c, lay = self.cfg.checkpoint, self.layout
        if c.resume == "never":
            if ckpt.find_checkpoints(self.out, complete_only=False):
                raise ConfigError(f"checkpoint.resume: never, but {ckpt.checkpoint_dir(self.out)} holds checkpoints "
                                  f"of an earlier run; use another out_dir or delete that folder to start over")
            return
        if c.resume != "auto":
            why = self._load(Path(c.resume))
            if why is not None:
                raise CheckpointError(f"checkpoint.resume: {c.resume} cannot be resumed ({why}); nothing was "
                                      f"changed in {self.out}")
            return
        unusable = []
        for folder in ckpt.find_checkpoints(self.out):
            why = self._load(folder)
            if why is None:
                break
            _say(lay, f"warning: checkpoint {folder} is unusable ({why}); trying the previous one")
            unusable.append((folder, why))
        else:
            if unusable and not c.start_over:
                listed = "; ".join(f"{f.name}: {w}" for f, w in unusable)
                raise CheckpointError(f"checkpoint.resume: every checkpoint in {ckpt.checkpoint_dir(self.out)} is "
                                      f"unusable ({listed}); nothing was changed. Rerun with --checkpoint.start_over "
                                      f"true to set them aside and train from step 0")
        if lay.is_main:  # out of the rotation, kept for inspection
            for folder, _ in unusable:
                ckpt.set_aside(folder)
        self.barrier()

    def _load(self, folder: Path) -> Optional[str]:
        """Resume every rank from ``folder``: None when every rank could, else why not (this rank's
        reason, or that of another). A checkpoint of another configuration is an error on every rank."""
        lay = self.layout
        err = mismatch = None
        try:
            tensors, state = ckpt.load_checkpoint(folder, lay, self.cfg.fingerprint(), self.device)
        except ckpt.ConfigMismatch as e:
            mismatch = e
        except CheckpointError as e:
            err = str(e)
        bad, mismatched = self._agree(err is not None, mismatch is not None)
        if mismatched:
            raise mismatch if mismatch is not None else ckpt.ConfigMismatch(
                f"checkpoint {folder}: its configuration does not match this run on another rank")
        if bad:
            if err is not None and not lay.is_main:
                print(f"warning (rank {lay.rank}): {err}", file=sys.stderr, flush=True)
            return err or "corrupt on another rank"
        extra = ckpt.restore(tensors, self.model, self.opt, self.param_names, self.device)
        self.since_fired = extra["tokens_since_fired"].to(self.device)
        self.silent_bound = int(self.since_fired.max()) if self.since_fired.numel() else 0
        if getattr(self.source, "stateful", False):
            self.source.load_state_dict({k[5:]: v for k, v in extra.items() if k.startswith("data.")})
        self.p = _Progress(step=state["step"], micro=state["micro"], tokens=state["tokens"])
        _say(lay, f"resumed from {folder} (step {self.p.step})")
        return None

    def _finished(self) -> bool:
        """This out_dir holds the finished run (its model and summary): nothing to redo."""
        return (self.out / "summary.json").is_file() and (self.out / "model" / "config.json").is_file()

    def _report_finished(self) -> dict:
        summary = {}
        if self.layout.is_main:
            from fastclt.checkpoint import read_json
            summary = read_json(self.out / "summary.json", "summary.json")
            print(f"already finished: {self.out} holds the model of step {self.p.step} (train.steps) and its summary; "
                  f"raise train.steps, or use another out_dir, to train again", flush=True)
        self.barrier()
        return summary

    # ------------------------------------------------------------------ the loop
    def _start(self) -> None:
        """After the resume check (a refused run leaves the folder as it was): the configuration is
        saved, the prefetcher and the metrics logger opened."""
        cfg, lay = self.cfg, self.layout
        if lay.is_main:
            cfg.save(self.out)
        self.pref = Prefetcher(self.source, self.p.micro, self.device, self.model.param_dtype, cfg.data.prefetch, lay)
        self.resources.callback(self.pref.close)
        self.logger = MetricsLogger(self.out, cfg, lay.is_main, cfg.train.steps, self.p.step)
        self.resources.callback(self.logger.close)
        self.t_log, self.steps_since_log = time.perf_counter(), 0  # (the loop restarts both)

    def _train(self) -> bool:
        """Steps until train.steps: True when it got there, False when it stopped early (train.max_steps
        or a signal; a checkpoint was saved)."""
        t = self.cfg.train
        t0 = self.t_log = time.perf_counter()
        self.steps_since_log, start = 0, self.p.step
        if t.eval_every and self.p.step == 0 and (self.mcfg.activation != "batchtopk" or t.init_from is not None):
            self._evaluate(0)  # the baseline (a BatchTopK model has no thresholds before training)
        self.model.train()
        with _Signals() as sig:
            while self.p.step < self.stop_at:
                if self._advance(sig):
                    self.logger.close()
                    _say(self.layout, f"\nstopped by a signal at step {self.p.step}; checkpoint saved, rerun to resume")
                    return False
        self.elapsed, self.steps_run = time.perf_counter() - t0, self.p.step - start
        if self.p.step < t.steps:  # max_steps reached: a simulated preemption
            self.logger.close()
            _say(self.layout, f"stopped at train.max_steps={self.p.step}; checkpoint saved, rerun to resume")
            return False
        return True

    def _advance(self, sig) -> bool:
        """One turn of the loop: the step, its metrics line, and the evaluation and checkpoint due
        after it. True when a signal arrived (the checkpoint is then saved)."""
        cfg, t = self.cfg, self.cfg.train
        out, gnorm, lr, lam, stop = self._step(sig)
        self._log(out, gnorm, lr, lam)
        step = self.p.step
        if t.eval_every and step % t.eval_every == 0 and step < t.steps and not stop:
            self._evaluate(step)
        if stop or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == self.stop_at:
            self._save()
        return stop

    def _step(self, sig):
        """One optimizer step: grad_accum micro-batches forward and backward, dead-feature counts,
        gradients reduced and clipped, Adam. Returns (last LossOutput, grad norm, lr, λ, stop) — stop:
        a signal arrived on some rank (every rank stops after this step)."""
        t, lay, model, p = self.cfg.train, self.layout, self.model, self.p
        p.step += 1
        lr = lr_at(p.step, t)
        for g in self.opt.param_groups:
            g["lr"] = lr
        lam = sparsity_at(p.step, t, self.mcfg.sparsity_coef)
        dead_arg = self.since_fired >= t.dead_tokens if self.mcfg.activation in ("topk", "batchtopk") else None
        none_dead = (dead_arg is not None and self.objective is None and lay.tp == 1
                     and self.silent_bound is not None and self.silent_bound < t.dead_tokens)
        dead_counts = [0] * self.model.n_layers if none_dead else None  # AuxK then reads nothing
        fired = None
        input_checks = []  # the micro-batches' NaN/Inf checks, read with the loss and gradient norm below
        for _ in range(t.grad_accum):
            batch = self.pref.get()
            p.micro += 1
            try:
                out = self._graphed(batch, dead_arg, lam) if none_dead and t.cuda_graph else None
                if out is None:
                    out = self._loss(batch, dead_arg, lam, dead_counts)
                    (out.loss / t.grad_accum if t.grad_accum > 1 else out.loss).backward()
            except Exception:
                if self.objective is None and self.mcfg.nonfinite == "error":
                    self.model.check_batch(*batch)  # NaN/Inf in the batch: the loss's error, not a kernel's
                raise
            fired = out.fired if fired is None else fired | out.fired
            if out.input_check is not None:
                input_checks.append(out.input_check)
        if lay.dp > 1:  # the same dead mask on every replica
            f8 = fired.to(torch.uint8)
            dist.all_reduce(f8, op=dist.ReduceOp.MAX, group=lay.dp_group)
            fired = f8.bool()
        self.since_fired += self.tokens_per_step
        self.since_fired.masked_fill_(fired, 0)  # (no boolean indexing: nothing waits for the device)
        if self.silent_bound is not None:
            self.silent_bound += self.tokens_per_step
        p.tokens += self.tokens_per_step
        allreduce_grads(self.params, lay)
        model.project_decoder_grads()
        gnorm = clip_grad_norm(self.sharded, self.replicated, t.clip_grad, lay)
        # one transfer for every check (each float() of a device scalar waits for the device): the
        # loss, the gradient norm and the inputs' sums (a NaN or Inf in x or y makes its sum non-finite);
        # at a logging step of a single process, the metrics with them (_record then reads nothing)
        head = torch.stack([out.loss.detach().float(), gnorm.float()])
        checks = torch.cat([head] + [c.sums for c in input_checks])
        if self._logs_at(p.step) and not lay.distributed:
            packed = out.packed_metrics()
            dead = (self.since_fired >= t.dead_tokens).sum()
            vals = torch.cat([checks.double(), packed.double(),
                              torch.stack([dead.double(), self.since_fired.max().double()])]).tolist()
            n, m = checks.numel(), packed.numel()
            bad = not all(math.isfinite(v) for v in vals[:n])
            out.unpack_metrics(vals[n:n + m])
            self._read = {"dead": vals[n + m], "longest": vals[n + m + 1], "gnorm": vals[1]}
        else:
            bad = not bool(torch.isfinite(checks).all())
        stop, bad = self._agree(sig.flag, bad)
        if bad:  # (rare: the exact checks may read from the device again)
            for c in input_checks:  # the model's own ValueError for NaN/Inf in x or y
                c.raise_if_nonfinite()
            # finite inputs whose sum overflowed are no error: then only the loss and norm decide
            bad = self._agree(not bool(torch.isfinite(head).all()))[0]
        if bad:
            loss_val = float(out.loss.detach())
            raise FloatingPointError(
                f"step {p.step}: the loss or gradient is not finite (loss={loss_val}, grad_norm={float(gnorm)}); "
                f"the last good checkpoint in {ckpt.checkpoint_dir(self.out)} is kept — lower train.lr or check "
                f"the activations")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        model.post_step()
        return out, gnorm, lr, lam, stop

    def _loss(self, batch: tuple, dead_mask, lam, dead_counts=None):
        """The LossOutput of one micro-batch: the reconstruction loss of (x, y), or the objective through
        the LM on ``(ids,)`` (under the LM's lock: the evaluation uses the same LM)."""
        if self.objective is None:
            x, y = batch
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                return self.model.batch_loss(x, y, dead_mask=dead_mask, sparsity_coef=lam, defer_input_check=True,
                                             dead_counts=dead_counts)
        with self.source.ex.lock:
            return self.objective.loss(batch[0], dead_mask, sparsity_coef=lam)

    def _graphed(self, batch: tuple, dead_mask: torch.Tensor, lam: float):
        """train.cuda_graph: the micro-batch's LossOutput from the captured forward and backward, or None
        for a batch of another shape than the captured one (the caller then steps eagerly). Called only
        while no feature can be dead (AuxK has nothing to select). λ weighs the ReLU/JumpReLU
        penalties only, which a graphed model does not have: its ramp changes nothing here."""
        x, y = batch
        if self.graph is None:
            model, dev, autocast = self.model, self.device.type, self.autocast
            zeros = [0] * model.n_layers

            def forward_backward(x, y, dead_mask):
                # (autocast's weight cache off: a captured step recomputes its casts at each replay)
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
                    out = model.batch_loss(x, y, dead_mask=dead_mask, sparsity_coef=lam, defer_input_check=True,
                                           dead_counts=zeros)
                out.loss.backward()
                return out
            self.graph = graphed.StepGraph(forward_backward, self.params, model, capture=self.device.type == "cuda")
        if not self.graph.matches(x, y, dead_mask):
            return None
        return self.graph.run(x, y, dead_mask)

    def _logs_at(self, step: int) -> bool:
        """Whether step ``step`` logs: every log.every steps and the last one."""
        return step % self.cfg.log.every == 0 or step == self.stop_at

    def _log(self, out, gnorm, lr, lam) -> None:
        """Every log.every steps and at the last one: a metrics line and the progress bar."""
        self.steps_since_log += 1
        step = self.p.step
        if not self._logs_at(step):
            return
        now = time.perf_counter()
        tps = self.tokens_per_step * self.steps_since_log / max(now - self.t_log, 1e-9)
        rec = self._record(out, step, lr, lam, gnorm, tps)
        self.logger.log(rec)
        self.logger.progress(self.steps_since_log, rec["loss"], tps)
        self.t_log, self.steps_since_log = now, 0

    def _record(self, out, step, lr, lam, gnorm, tps) -> dict:
        m = dict(out.metrics)
        read, self._read = self._read, None
        if read is not None:  # read by _step with its checks
            dead, gnorm, longest = read["dead"], read["gnorm"], read["longest"]
        else:
            dead = (self.since_fired >= self.cfg.train.dead_tokens).sum().float()
            if self.layout.tp > 1:
                dist.all_reduce(dead, group=self.layout.tp_group)
            # one transfer for all three; the largest since_fired (exact in fp64) renews the host's bound
            dead, gnorm, longest = torch.stack([dead.double(), gnorm.detach().double(),
                                                self.since_fired.max().double()]).tolist()
        if self.layout.tp == 1:
            self.silent_bound = int(longest)
        names = sorted(k for k, v in m.items() if isinstance(v, float))
        if self.layout.dp > 1:  # average the replicas' metrics
            v = torch.tensor([m[k] for k in names], dtype=torch.float64, device=self.device)
            dist.all_reduce(v, group=self.layout.dp_group)
            m = dict(zip(names, (v / self.layout.dp).tolist()))
        rec = {"step": step, "tokens": self.p.tokens, "lr": lr, "sparsity_coef": lam}
        rec.update({k: m[k] for k in names})
        rec["dead_fraction"] = float(dead) / (self.since_fired.numel() * self.layout.tp)
        rec["grad_norm"] = float(gnorm)
        rec["tokens_per_s"] = tps
        rec["tflops"] = step_flops(self.mcfg, 1, m.get("l0", 0.0)) * tps / 1e12
        return rec

    def _save(self) -> None:
        extra = {"tokens_since_fired": self.since_fired}
        extra.update({f"data.{k}": v for k, v in (self.pref.state() or {}).items()})
        full_config = self.cfg.to_dict()
        full_config["model"].update(self.lm_meta)  # merge_checkpoint rebuilds the model's config from it
        ckpt.save_checkpoint(self.out, self.p.step, self.model, self.opt, self.param_names, extra,
                             {"step": self.p.step, "micro": self.p.micro, "tokens": self.p.tokens}, self.layout,
                             self.cfg.fingerprint(), full_config, self.cfg.checkpoint.keep,
                             lambda flag: self._agree(flag)[0])

    # ------------------------------------------------------------------ evaluation and the end
    def _full_model(self, state: dict):
        full = self.cls(self.mcfg)
        full.load_checked_state(state, source="merged shards")
        full.impl = self.cfg.train.impl
        return full

    @torch.no_grad()
    def _evaluate(self, step: int, state: Optional[dict] = None, gathered: bool = False) -> Optional[dict]:
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
            self.logger.log({"step": step, **_eval_record(m)})
            self.logger.note(kl=f"{m['kl']:.4g}", ce_rec=f"{m['ce_recovered']:.3f}")
        self.barrier()
        return m

    @torch.no_grad()
    def _finish(self) -> dict:
        """Held-out FVU/L0, the merged model (model/), the final evaluation, the JumpReLU calibration,
        summary.json/png — on rank 0; every rank joins the collectives."""
        cfg, lay, model = self.cfg, self.layout, self.model
        model.eval()
        fvu, l0, n = None, None, 0
        for _ in range(cfg.train.eval_batches):
            out = self._loss(self.pref.get(), None, None)
            f, z = out.per_layer["fvu"].float().cpu(), out.per_layer["l0"].float().cpu()
            fvu = f if fvu is None else fvu + f
            l0 = z if l0 is None else l0 + z
            n += 1
        # every rank draws them (an LM source broadcasts batches across tp ranks); rank 0 uses them
        cal_batches = ([self.pref.get() for _ in range(cfg.train.calibrate_batches)] if cfg.train.calibrate_jumprelu
                       else None)
        dead = (self.since_fired >= cfg.train.dead_tokens).float().sum()
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
        replacement = self._evaluate(cfg.train.steps, state, gathered=True)
        self.logger.close()
        summary = {}
        if lay.is_main:
            full = self._full_model(state)
            full.save_pretrained(self.out / "model")
            # a rerun that only finishes (killed after the last checkpoint) timed no step: the last logged rate
            tps = (self.tokens_per_step * self.steps_run / max(self.elapsed, 1e-9) if self.steps_run
                   else last_logged(self.out, "tokens_per_s"))
            summary = {"steps": cfg.train.steps, "tokens": self.p.tokens, "tokens_per_s": tps,
                       "dead_fraction": float(dead) / (self.since_fired.numel() * lay.tp),
                       "world": lay.world, "tp": lay.tp, "dp": lay.dp, "device": str(self.device)}
            if n:
                summary.update({"fvu": float(fvu.mean() / n), "l0": float(l0.mean() / n),
                                "fvu_per_layer": (fvu / n).tolist(), "l0_per_layer": (l0 / n).tolist()})
            if tps is not None:
                summary["tflops"] = step_flops(self.mcfg, 1, summary.get("l0", 0.0)) * tps / 1e12
            if cfg.data.source == "synthetic" and hasattr(full, "decoder_weight"):  # a MOLT has no decoder rows
                from fastclt.training.synthetic import mmcs
                m, per = mmcs(full, self.source.gen)
                summary["mmcs"], summary["mmcs_per_layer"] = m, per
            if replacement is not None:
                summary["replacement"] = replacement
            if cfg.train.calibrate_jumprelu:
                summary["calibration"] = self._calibrate(full, cal_batches)
            write_summary(self.out, summary, cfg.log.plot)
            rate = f"{tps:,.0f} tok/s" if tps is not None else "tok/s not measured"
            line = (f"done: {summary['tokens']:,} tokens, {rate}, "
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
        xs, ys = (full.batch_inputs(x, y) + (None,))[:2]  # an SAE: (x, None)
        cal = calibrate_and_save(full.to(self.device), xs, ys, self.out / "model_jumprelu",
                                 batch_size=self.cfg.train.batch_size)
        print(f"JumpReLU copy (L0 {[round(v, 2) for v in cal.l0_after]}, FVU "
              f"{[round(v, 4) for v in cal.fvu_after]}): {self.out / 'model_jumprelu'}", flush=True)
        return cal.summary()


# What a memory estimate's largest part is named after, in the refusal.
_BLAME = {"model, gradients and Adam state": "model.n_features", "the full model and its shard": "model.n_features",
          "initialisation sample": "train.init_samples", "micro-batches in flight": "train.batch_size",
          "dense pre-activations": "train.batch_size"}


def _memory_needed(cfg: RunConfig, mcfg, cls, layout: Layout, device: torch.device) -> dict:
    """A lower bound of what one rank holds at once, in bytes by part: the larger of the start (the
    full model, its shard under tp, the initialisation sample) and training (parameters, gradients,
    Adam state, the micro-batches in flight, one layer's dense pre-activations where they exist).
    Parameter sizes come from models built on the meta device (no memory). Adam's two moments take
    the parameters' dtype (torch's Adam), or 2 bytes an entry with train.optimizer_moments bfloat16."""
    t = cfg.train
    with torch.device("meta"):
        full = cls(mcfg)
        local = cls(mcfg.replace(n_features=mcfg.n_features // layout.tp)) if layout.tp > 1 else full

    def size(m, params_only=False):
        ts = list(m.parameters()) + ([] if params_only else list(m.buffers()))
        return sum(p.numel() * p.element_size() for p in ts)
    width = (full.d_in + full.d_out) * full.n_layers * 4  # bytes per token of an fp32 (x, y) pair
    n_init = -(-t.init_samples // t.batch_size) * t.batch_size
    start = {"the full model and its shard": size(full) + (size(local) if layout.tp > 1 else 0),
             "initialisation sample": 2 * n_init * width}
    params = size(local, params_only=True)
    moments = (2 * 2 * sum(p.numel() for p in local.parameters()) if t.optimizer_moments == "bfloat16"
               else 2 * params)
    training = {"model, gradients and Adam state": size(local) + params + moments,
                "micro-batches in flight": (cfg.data.prefetch + 2) * t.batch_size * width,
                "dense pre-activations": 0}
    # one layer's [B, F/tp] pre-activations exist on the CPU path, under tp and for the JumpReLU
    # pre-activation loss; the fused GPU kernels of tp=1 need not materialise them
    if device.type == "cpu" or layout.tp > 1 or (mcfg.activation == "jumprelu" and mcfg.preact_coef > 0):
        training["dense pre-activations"] = t.batch_size * (mcfg.n_features // layout.tp) * 4
    return max(start, training, key=lambda d: sum(d.values()))


def _memory_available(device: torch.device):
    """(bytes available, where) — free GPU memory, or the host's available memory (within a cgroup
    limit when there is one); (None, …) when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, str(device)
    have = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    have = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            have = min(have if have is not None else 1 << 62, int(limit) - used)
    except (OSError, ValueError):
        pass
    return have, "this host"


def _gib(b: int) -> str:
    return f"{b / 2**40:,.1f} TiB" if b >= 2**40 else f"{b / 2**30:,.2f} GiB"


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
        print(build_parser(__doc__.split("``--help``")[0].strip()).format_help())
        return 0
    try:
        if any(a.startswith("--print_config") for a in argv):  # the resolved configuration, as YAML
            import yaml
            cfg = load_config([a for a in argv if not a.startswith("--print_config")])
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")
            return 0
        train(load_config(argv))
    except (ConfigError, CheckpointError, ValueError, FloatingPointError, ckpt.CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
