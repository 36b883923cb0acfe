"""A training step's forward and backward captured once in a CUDA graph and replayed (train.cuda_graph).

At small shapes a GPU step is bound by launching its few hundred kernels, not by running them: a
replayed graph launches them all with one call. ``StepGraph`` captures ``fn(x, y, dead_mask)`` — the
model's loss and its backward, which leaves the gradients in ``.grad`` — on its first call and
replays it on the next ones; the caller then reads the step's checks, reduces and clips the
gradients and steps the optimizer as it would after an eager backward (docs/DESIGN.md §9).

What a graph needs, and how the step gets it:

* **No host reads inside.** ``fastclt.ops.capturable`` routes the ops whose kernel wrappers read a
  value back (the selections and the encodes containing them) to their references, which read
  nothing for TopK and per-layer BatchTopK (``fastclt/ops/_registry.py``); the loss defers its input
  check (``defer_input_check``) and is told that no feature is dead (AuxK then reads no count), so
  the trainer replays only while its host-side bound says so and steps eagerly otherwise.
* **Static inputs.** Each replay reads the batch and the dead mask from buffers made at capture; a
  batch of another shape steps eagerly.
* **Static gradients.** The backward captured after setting every ``.grad`` to None allocates the
  gradients from the graph's memory; a replay rewrites them (no accumulation: grad_accum 1), and
  ``run`` hands them back to the parameters before each replay, so the caller may drop its
  gradients after the optimizer step as usual.
* **Warm-up.** A few eager calls on a side stream before the capture (the libraries' lazy
  initialisation, Triton's compilation and autotuning); the module's buffers that a step updates
  (BatchTopK's running cut statistics) are restored after them, so the warm-up leaves no trace.

The returned ``LossOutput``'s tensors are the graph's outputs: valid until the next replay. Python
state that the traced code sets (a density estimate, for instance) keeps its value from the capture.

Where the device is not CUDA, ``StepGraph`` runs ``fn`` eagerly on the same static buffers with the
same routing (``capture=False``): the tests check on a CPU that this step reads nothing back from the
device and gives the eager step's numbers.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from fastclt.ops import capturable

__all__ = ["StepGraph", "GRAPH_DEVICES", "WARMUP_CALLS"]

# The device types on which ``train.cuda_graph`` is accepted (the tests add "cpu": eager replay).
GRAPH_DEVICES = ("cuda",)
# Eager calls before the capture (torch's examples use 3 for cuBLAS and the caching allocator).
WARMUP_CALLS = 3


class StepGraph:
    """``fn(x, y, dead_mask) -> LossOutput`` (forward and backward) captured on the first ``run``.

    params: the parameters whose ``.grad`` the backward writes. module: the model (its buffers are
    restored after the warm-up). capture: record a CUDA graph (False: call ``fn`` each time, same
    buffers and routing)."""

    def __init__(self, fn: Callable, params: list, module: torch.nn.Module, capture: bool) -> None:
        self.fn, self.params, self.module, self.capture = fn, list(params), module, capture
        self.static: Optional[tuple] = None
        self.out = None
        self.grads: Optional[list] = None
        self.graph = None
        self.calls = 0  # runs served (eager or replayed)

    def matches(self, x: torch.Tensor, y: torch.Tensor, dead_mask: torch.Tensor) -> bool:
        """Whether ``run`` can serve these inputs: the captured shapes, dtypes and devices."""
        if self.static is None:
            return True
        return all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                   for a, b in zip(self.static, (x, y, dead_mask)))

    def run(self, x: torch.Tensor, y: torch.Tensor, dead_mask: torch.Tensor):
        """The step's LossOutput, its gradients in the parameters' ``.grad`` (which must be None)."""
        for p in self.params:
            if p.grad is not None:
                raise RuntimeError("StepGraph.run: the parameters hold gradients; drop them (zero_grad with "
                                   "set_to_none) before a captured step, which writes its own")
        self.calls += 1
        if self.static is None:
            self.static = tuple(t.detach().clone() for t in (x, y, dead_mask))
            if self.capture:
                self._capture()
        else:
            for buf, t in zip(self.static, (x, y, dead_mask)):
                buf.copy_(t)
        if not self.capture:
            with capturable():
                return self.fn(*self.static)
        for p, g in zip(self.params, self.grads):
            p.grad = g
        self.graph.replay()
        return dataclasses.replace(self.out, _metrics=None)

    def _capture(self) -> None:
        saved = [(b, b.detach().clone()) for b in self.module.buffers()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), capturable():
            for _ in range(WARMUP_CALLS):
                for p in self.params:
                    p.grad = None
                self.fn(*self.static)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
        for p in self.params:
            p.grad = None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), capturable():
            self.out = self.fn(*self.static)
        self.grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
