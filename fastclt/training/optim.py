"""Adam with its two moments stored in a chosen dtype (bfloat16: half the optimizer's memory).

``Adam(params, lr, betas, eps, moment_dtype=torch.bfloat16)`` is torch.optim.Adam (no weight decay,
no AMSGrad: the trainer uses neither) whose state ``exp_avg`` (m) and ``exp_avg_sq`` (v) are kept
in ``moment_dtype``. Each step reads them, computes in fp32 (fp64 where the parameter or the moments
are fp64), writes the parameter once and stores the new moments rounded to ``moment_dtype``. Per
parameter θ with gradient g, at step t (counted per parameter, from 1):

    m ← m + (1 − β1)·(g − m)                     (lerp: torch's β1·m + (1 − β1)·g)
    v ← β2·v + (1 − β2)·g²
    θ ← θ − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)        (ε outside the square root)

with the fp32 m and v of this step (not their rounded copies); then m and v are stored. The
operations and their order are torch.optim.Adam's (foreach and single-tensor paths), so with
``moment_dtype`` float32 and fp32 parameters the result is bit-identical to theirs (tested);
torch's fused kernel orders its arithmetic differently (a few ulps). bf16 parameters are updated
in fp32 and rounded to nearest once per step; with bf16 moments rounded to nearest that is torch's
fused Adam on bf16 parameters (which keeps their moments in bf16), bit for bit on the CPU.

Memory: the moments take 2·N·bytes(moment_dtype) for N parameter entries: 8 bytes per parameter in
fp32, 4 in bf16. With fp32 parameters and gradients the training state goes from 16 to 12 bytes per
parameter (−25%); for a CLT of GPT-2 small's size (12 layers, d = 768, 32768 features, 2.27 billion
parameters) from 36.3 GB to 27.2 GB. The update's temporaries (fp32 copies of the moments, of the
gradient and of the parameter where they are narrower, √v, the rounding's random bits) are
bounded: parameters are processed in pieces of at most ``chunk_elements`` entries (default 2^24,
64 MiB per fp32 temporary: a few hundred MiB at most), whereas torch's foreach Adam allocates √v
for every parameter at once.

Rounding to bfloat16 (8 significant bits: a relative spacing of 2^-8 to 2^-7):

* ``"stochastic"`` (default): x is rounded up with probability (x − ⌊x⌋)/(⌈x⌉ − ⌊x⌋) — in bits, a
  uniform 16-bit integer is added to the fp32 pattern and the low 16 bits are dropped — so the
  stored moment is unbiased. The random bits are drawn from a generator seeded, per step, by
  (``seed``, the parameter's step, its index, the piece's offset): deterministic under a seed,
  identical on every rank (replicas stay equal), and a resumed run draws the same bits as an
  uninterrupted one (nothing to checkpoint). The bits differ between CPU and CUDA generators.
* ``"nearest"``: round to nearest, ties to even (the cast). Biased for Adam's second moment:
  with β2 = 0.999 a step changes v by 0.1% of (g² − v), below half a bf16 spacing unless g² is
  several times v, so v can never decrease and only ratchets up on large gradients. Measured on
  stationary random gradients (100 000 entries, β2 = 0.999): v is 1.06× torch's after 1 000 steps,
  1.6× after 5 000, 2.4× after 20 000 (the update 35% too small, and growing); with stochastic
  rounding v stays within ±7% of torch's (median 1.00) and the update within 1.6% (median).

Moments kept in the compute dtype (float32 moments of fp32 or bf16 parameters, float64 moments)
are updated in place, with no rounding; float32 moments of fp64 parameters are rounded to nearest.

The state has torch.optim.Adam's keys and layout (``step``: a float32 CPU scalar tensor;
``exp_avg``, ``exp_avg_sq``: the parameter's shape in ``moment_dtype``), so checkpoints flatten it
alike. ``load_state_dict`` keeps the moments in ``moment_dtype`` (torch's would cast them to the
parameter's dtype) and refuses moments of another dtype (ValueError) rather than round them.
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["Adam", "MOMENT_DTYPES"]

MOMENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
_MOMENTS = ("exp_avg", "exp_avg_sq")
_MASK64 = (1 << 64) - 1


def _mix(*words: int) -> int:
    """A 63-bit generator seed from integers (a splitmix64 round per word): nearby steps, parameters
    and pieces get unrelated seeds."""
    z = 0x9E3779B97F4A7C15
    for w in words:
        z = (z + (w & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z >> 1


def _round_stochastic_(out: torch.Tensor, x: torch.Tensor, bits: torch.Tensor) -> None:
    """out (bfloat16) ← x (float32) rounded stochastically with ``bits`` (int32 in [0, 2^16), x's shape):
    the 16 bits below bf16's last place are replaced by a carry with probability equal to their value.
    NaN stays NaN (adding to its pattern could wrap into another number); ±inf stays ±inf."""
    y = (x.view(torch.int32) + bits).bitwise_and_(-65536).view(torch.float32)
    out.copy_(torch.where(torch.isnan(x), x, y))  # y is exactly a bf16 number: the cast is exact


class Adam(torch.optim.Optimizer):
    """Adam whose moments are stored in ``moment_dtype``; the update is computed in fp32 (see the
    module docstring for the math, the rounding and the memory).

    Args:
        params: parameters (float32, bfloat16 or float64; dense gradients), or parameter groups.
        lr, betas, eps: as torch.optim.Adam (per group; ``lr`` may be changed between steps).
        moment_dtype: torch.bfloat16 (default), torch.float32 or torch.float64 (or their names).
        rounding: "stochastic" (default) or "nearest": how moments are rounded to bfloat16
            (moments in float32/float64 are not rounded).
        seed: the stochastic rounding's seed (the same on every rank of a run).
        chunk_elements: the most parameter entries updated at once (bounds the fp32 temporaries).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8, *,
                 moment_dtype=torch.bfloat16, rounding: str = "stochastic", seed: int = 0,
                 chunk_elements: int = 1 << 24) -> None:
        if isinstance(moment_dtype, str):
            if moment_dtype not in MOMENT_DTYPES:
                raise ValueError(f"moment_dtype: expected one of {tuple(MOMENT_DTYPES)}, got {moment_dtype!r}")
            moment_dtype = MOMENT_DTYPES[moment_dtype]
        if moment_dtype not in MOMENT_DTYPES.values():
            raise ValueError(f"moment_dtype: expected torch.float32, torch.bfloat16 or torch.float64, got "
                             f"{moment_dtype}")
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(f"rounding: expected 'stochastic' or 'nearest', got {rounding!r}")
        if not lr >= 0:
            raise ValueError(f"lr: expected a non-negative value, got {lr}")
        if not eps >= 0:
            raise ValueError(f"eps: expected a non-negative value, got {eps}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas: expected two values in [0, 1), got {betas}")
        if not (isinstance(chunk_elements, int) and chunk_elements > 0):
            raise ValueError(f"chunk_elements: expected a positive integer, got {chunk_elements!r}")
        self.moment_dtype, self.rounding, self.seed = moment_dtype, rounding, int(seed)
        self.chunk_elements = chunk_elements
        self._generators: dict = {}
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.dtype not in MOMENT_DTYPES.values():
                self.param_groups.pop()
                raise ValueError(f"params: expected float32, bfloat16 or float64 parameters, got {p.dtype}")

    def _compute_dtype(self, p: torch.Tensor) -> torch.dtype:
        return torch.float64 if torch.float64 in (p.dtype, self.moment_dtype) else torch.float32

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        return g

    @torch.no_grad()
    def step(self, closure=None):
        """One Adam step over every parameter that has a gradient; returns the closure's loss (if any)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0  # the parameter's position over all groups: part of its rounding seed
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            # (device, param dtype, grad dtype) → (the pieces of this step, their entries): a batch is
            # updated once it would exceed chunk_elements; a piece is (param, grad, m, v, step, seed key)
            batches: dict = {}
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("fastclt.training.optim.Adam: sparse gradients are not supported")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    for k in _MOMENTS:
                        state[k] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()
                key = (p.device, p.dtype, p.grad.dtype)
                for offset, *views in self._pieces(p, p.grad, state["exp_avg"], state["exp_avg_sq"]):
                    batch, n = batches.get(key, ([], 0))
                    if batch and n + views[0].numel() > self.chunk_elements:
                        self._update(batch, group["lr"], beta1, beta2, group["eps"])
                        batch, n = [], 0
                    batch.append((*views, t, (index, int(t), offset)))
                    batches[key] = (batch, n + views[0].numel())
            for batch, _ in batches.values():
                self._update(batch, group["lr"], beta1, beta2, group["eps"])
        return loss

    def _pieces(self, p, g, m, v):
        """(offset, param, grad, m, v) views of at most chunk_elements entries each (flat slices of
        contiguous tensors; the whole tensors otherwise)."""
        n, c = p.numel(), self.chunk_elements
        if n <= c or not all(t.is_contiguous() for t in (p, g, m, v)):
            yield (0, p, g, m, v)
            return
        flat = [t.view(-1) for t in (p, g, m, v)]
        for start in range(0, n, c):
            yield (start, *(t[start:start + c] for t in flat))

    def _update(self, batch: list, lr: float, beta1: float, beta2: float, eps: float) -> None:
        """The Adam update of a batch of pieces of one (device, param dtype, grad dtype), in torch.optim.Adam's
        order of operations, then the moments stored (rounded when their dtype is narrower)."""
        ps, gs, ms, vs, steps, keys = (list(x) for x in zip(*batch))
        cdt = self._compute_dtype(ps[0])
        in_place = self.moment_dtype == cdt
        m = ms if in_place else [t.to(cdt) for t in ms]
        v = vs if in_place else [t.to(cdt) for t in vs]
        g = gs if gs[0].dtype == cdt else [t.to(cdt) for t in gs]
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        del g
        step_size = [(lr / (1 - beta1 ** t)) * -1 for t in steps]
        bias_correction2_sqrt = [(1 - beta2 ** t) ** 0.5 for t in steps]
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        if ps[0].dtype == cdt:
            torch._foreach_addcdiv_(ps, m, denom, step_size)
        else:  # bf16 parameters: updated in fp32, rounded to nearest once
            wide = [t.to(cdt) for t in ps]
            torch._foreach_addcdiv_(wide, m, denom, step_size)
            torch._foreach_copy_(ps, wide)
            del wide
        del denom
        if in_place:
            return
        if self.rounding == "nearest" or self.moment_dtype != torch.bfloat16:
            torch._foreach_copy_(ms, m)
            torch._foreach_copy_(vs, v)
            return
        for m32, v32, m_out, v_out, key in zip(m, v, ms, vs, keys):
            m32, v32 = m32.float(), v32.float()  # (fp64 compute: rounded to fp32 first)
            gen = self._generator(m32.device)
            gen.manual_seed(_mix(self.seed, *key))
            bits = torch.randint(-2 ** 31, 2 ** 31, m32.shape, dtype=torch.int32, device=m32.device, generator=gen)
            _round_stochastic_(m_out, m32, bits & 0xFFFF)
            _round_stochastic_(v_out, v32, (bits >> 16) & 0xFFFF)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, the moments kept in ``moment_dtype`` (torch's casts them to the
        parameter's dtype). Moments of another dtype are refused (ValueError): rounding them would
        not continue the run that wrote them. As with torch's, tensors already of the right device
        and dtype are used, not copied (load a copy of a live optimizer's state_dict)."""
        for i, entry in state_dict["state"].items():
            for k in _MOMENTS:
                t = entry.get(k)
                if torch.is_tensor(t) and t.dtype != self.moment_dtype:
                    raise ValueError(f"state_dict: {k} of parameter {i} is stored in {t.dtype}, but this optimizer "
                                     f"keeps its moments in {self.moment_dtype}")
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            entry = state_dict["state"].get(i)
            if entry is None:
                continue
            for k in _MOMENTS:
                if k in entry:  # the stored tensor, not torch's cast of it (exact: same dtype)
                    self.state[p][k] = entry[k].to(device=p.device, dtype=self.moment_dtype)
            if "step" in entry:
                step = entry["step"]
                self.state[p]["step"] = (step.to(device="cpu", dtype=torch.float32) if torch.is_tensor(step)
                                         else torch.tensor(float(step), dtype=torch.float32))

