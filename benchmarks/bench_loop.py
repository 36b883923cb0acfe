"""Per-step overhead of the trainer's loop at the default demo's shape, against a bare eager loop.

    trainer     ``python -m fastclt.train``'s defaults (an untied BatchTopK CLT, L = 4, d = 32,
                F = 128 per layer, k = 4, B = 512, synthetic activations, AuxK, gradient clipping,
                a metrics line every step), except the output folder (a temporary one), no
                progress bar and no checkpoint within the timed steps: one call is one turn of the
                trainer's own loop (``_Run._advance``: data, step, metrics line). Timed from its
                first steps, before any feature has been silent for ``train.dead_tokens`` tokens
    trainer-auxk
                the same trainer, first run until some feature is dead (about 800 steps at the
                demo's defaults), so that every timed step also computes AuxK — the state of most
                of a long run's steps
    trainer-graph
                (CUDA only) the trainer with ``train.cuda_graph``: its forward and backward
                captured once in a CUDA graph and replayed (fastclt/training/graphed.py)
    bare-eager  the same model written as a plain PyTorch loop on data already in memory: encoder
                GEMM, ``torch.topk`` of the flattened pre-activations per layer (BatchTopK), ReLU,
                dense decode through every (source, target ≥ source) matrix, summed MSE,
                ``backward``, fused Adam. No checks, no metrics, no data pipeline

All run on the shape's device (the demo's shape: ``demo`` in benchmarks/shapes.py), in alternation
(``LoopCase``); each timed run is ``STEPS_PER_RUN`` consecutive steps, and the rows give the median
per step. The goal: the trainer's loop no slower per step than the bare loop, before and after
features die.
"""
from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from benchmarks.harness import Case, Runner, Timing, _percentile, _sync
from benchmarks.shapes import Shape

__all__ = ["loop_cases", "LoopCase", "LOOP_IMPLS"]

LOOP_IMPLS = ("fastclt-trainer", "fastclt-trainer-auxk", "bare-eager")
GRAPH_IMPL = "fastclt-trainer-graph"  # a fourth row on CUDA
MAX_STEPS_TO_DEAD = 6000  # trainer-auxk: the steps it may run to reach a dead feature
STEPS_PER_RUN = 20  # steps per timed run (one step is a few ms: single steps time the machine's noise)


def _trainer_step(s: Shape, device: torch.device, auxk: bool = False,
                  graph: bool = False) -> Callable[[int], Callable[[], None]]:
    def make(seed: int):
        from fastclt.train import _Run, _Signals
        from fastclt.training.config import load_config
        from fastclt.training.parallel import init_distributed
        out = tempfile.mkdtemp(prefix="fastclt_loop_")
        stack = contextlib.ExitStack()
        stack.callback(shutil.rmtree, out, True)
        try:
            cfg = load_config(["--out_dir", out, "--train.steps", "100000000", "--train.device", device.type,
                               "--train.seed", str(seed), "--model.n_layers", str(s.L), "--model.d_in", str(s.d),
                               "--model.n_features", str(s.F), "--model.k", str(s.k),
                               "--train.batch_size", str(s.B), "--log.progress", "false",
                               "--checkpoint.every", "0", "--train.cuda_graph", str(graph).lower()])
            run = _Run(cfg, init_distributed(1, device.type), device, stack)
            run._open_out_dir()
            run._open_source()
            run._build()
            run._start()
            run.model.train()
        except BaseException:
            stack.close()
            raise
        sig = _Signals()  # never entered: no handlers, the flag stays False
        if auxk:
            dead_tokens = run.cfg.train.dead_tokens
            for _ in range(MAX_STEPS_TO_DEAD):
                if bool((run.since_fired >= dead_tokens).any()):
                    break
                run._advance(sig)
            else:
                stack.close()
                raise RuntimeError(f"trainer-auxk: no feature died within {MAX_STEPS_TO_DEAD} steps")

        def step():
            run._advance(sig)
        weakref.finalize(step, stack.close)  # the prefetcher, logger, lock and folder go with the callable
        return step
    return make


def _bare_step(s: Shape, device: torch.device) -> Callable[[int], Callable[[], None]]:
    def make(seed: int):
        g = torch.Generator(device=device).manual_seed(seed)
        L, d, F, B, k = s.L, s.d, s.F, s.B, s.k

        def param(*shape, scale):
            return torch.nn.Parameter(scale * torch.randn(*shape, generator=g, device=device))
        W_enc, b_enc = param(L, F, d, scale=d ** -0.5), param(L, F, scale=0.0)
        W_dec = [param(F, L - src, d, scale=(L * F) ** -0.5) for src in range(L)]
        b_dec = param(L, d, scale=0.0)
        x = torch.randn(B, L, d, generator=g, device=device)
        y = 0.5 * x + torch.randn(B, L, d, generator=g, device=device)
        opt = torch.optim.Adam([W_enc, b_enc, b_dec, *W_dec], lr=1e-3, fused=True)

        def step():
            opt.zero_grad(set_to_none=True)
            h = torch.einsum("bld,lfd->lbf", x, W_enc) + b_enc[:, None]
            acts = []
            for l in range(L):
                flat = h[l].flatten()
                top = flat.topk(k * B)
                acts.append(torch.zeros_like(flat).scatter(0, top.indices, top.values.relu()).view(B, F))
            y_hat = [b_dec[t].expand(B, d) for t in range(L)]
            for src in range(L):
                dec = acts[src] @ W_dec[src].flatten(1)  # [B, (L − src)·d]: every target of the source
                for j, part in enumerate(dec.split(d, dim=1)):
                    y_hat[src + j] = y_hat[src + j] + part
            loss = sum((y[:, t] - y_hat[t]).pow(2).sum(1).mean() for t in range(L))
            loss.backward()
            opt.step()
        return step
    return make


@dataclass
class LoopCase(Case):
    """The loop rows of one shape, timed in alternation: after two warm-up runs each, ``rounds``
    rounds run every implementation once (``STEPS_PER_RUN`` steps), in an order that rotates each
    round, so that a drift of the machine's speed reaches every row alike. ``run_rows`` returns one
    row per implementation (a skipped case: one row per implementation, with the reason)."""

    rounds: int = 9
    impls: tuple = LOOP_IMPLS
    makes: Optional[dict] = None
    notes: Optional[dict] = None

    def _row_case(self, impl: str) -> Case:
        return Case(suite=self.suite, op=self.op, variant=self.variant, mode=self.mode, shape=self.shape, impl=impl,
                    make=None, dtype=self.dtype, note=self.notes[impl], priority=self.priority)

    def run_rows(self, runner: Runner) -> list[dict]:
        if self.skip:
            return [runner.row(self._row_case(i), "skipped", self.skip) for i in self.impls]
        try:
            fns = {impl: self.makes[impl](0) for impl in self.impls}
        except Exception as e:  # a broken case is a row with a note, never a crashed run
            msg = f"{type(e).__name__}: {str(e).strip()[:200]}"
            return [runner.row(self._row_case(i), "error", msg) for i in self.impls]

        def run(impl: str) -> float:
            fn = fns[impl]
            t0 = time.perf_counter()
            for _ in range(STEPS_PER_RUN):
                fn()
            _sync(runner.device)
            return (time.perf_counter() - t0) * 1e3 / STEPS_PER_RUN
        for impl in self.impls:
            run(impl)
            run(impl)
        n = 2 if runner.quick else self.rounds
        times: dict = {impl: [] for impl in self.impls}
        for r in range(n):
            k = r % len(self.impls)
            for impl in self.impls[k:] + self.impls[:k]:
                times[impl].append(run(impl))
        note = f"alternated: {n} runs of {STEPS_PER_RUN} steps each, per step"
        return [runner.row(self._row_case(impl), "ok", note,
                           timing=Timing(statistics.median(ts), _percentile(ts, 0.2), _percentile(ts, 0.8), n))
                for impl, ts in times.items()]


def loop_cases(shape: Shape, device: torch.device, *, priority_of: Callable[..., int] = lambda *a: 1) -> list[Case]:
    """The loop case of a shape whose models include "loop" (the demo's shape): its three rows, and on
    CUDA a fourth, the trainer with its step captured in a CUDA graph."""
    if "loop" not in shape.models:
        return []
    makes = {"fastclt-trainer": _trainer_step(shape, device), "bare-eager": _bare_step(shape, device),
             "fastclt-trainer-auxk": _trainer_step(shape, device, auxk=True)}
    notes = {"fastclt-trainer": "the trainer's loop turn (_Run._advance), demo defaults, no progress bar",
             "fastclt-trainer-auxk": "the same, timed once a feature is dead: every step computes AuxK",
             "bare-eager": "plain PyTorch loop on in-memory data, dense decode, fused Adam"}
    impls = LOOP_IMPLS
    if device.type == "cuda":
        impls = LOOP_IMPLS + (GRAPH_IMPL,)
        makes[GRAPH_IMPL] = _trainer_step(shape, device, graph=True)
        notes[GRAPH_IMPL] = "the trainer's loop turn with train.cuda_graph (forward and backward replayed)"
    return [LoopCase(suite="profile", op="trainer_loop", variant="demo-clt-none-batchtopk", mode="step",
                     shape=shape.name, impl="fastclt-trainer", make=None, dtype="fp32", rotate=False,
                     makes=makes, notes=notes, impls=impls,
                     priority=priority_of("trainer_loop", "demo-clt-none-batchtopk", "", shape.name))]
