"""Closeness checks used by the tests (relative error with an absolute floor)."""
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / max(‖ref‖, tiny), in float64; NaN anywhere → inf."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "output") -> None:
    """Relative error ≤ tol, or an assertion that shows where they differ most."""
    err = rel_err(out, ref)
    if err <= tol:
        return
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    if o.shape != r.shape:
        raise AssertionError(f"{name}: shape {tuple(o.shape)} != {tuple(r.shape)}")
    diff = (o - r).abs().nan_to_num(float("inf")).flatten()
    worst = diff.topk(min(5, diff.numel())).indices
    where = [(tuple(int(i) for i in torch.unravel_index(w, o.shape)), float(o.flatten()[w]), float(r.flatten()[w]))
             for w in worst]
    raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}; worst (index, got, expected): {where}")


def train_steps(model, batch, steps: int, lr: float = 1e-2) -> None:
    """Train ``model`` for ``steps`` Adam steps on ``model.loss(*batch())`` as the trainer does
    (decoder-gradient projection, ``post_step``), on one intra-op thread (tiny steps: thread
    start-up would dominate). ``batch()`` returns the loss's positional arguments as a tuple."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(steps):
            out = model.loss(*batch())
            opt.zero_grad()
            out.loss.backward()
            model.project_decoder_grads()
            opt.step()
            model.post_step()
    finally:
        torch.set_num_threads(threads)
