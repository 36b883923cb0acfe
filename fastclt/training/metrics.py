"""Training metrics: a tqdm bar with tokens/s (rank 0), one JSON line per ``log.every`` steps,
optional wandb / TensorBoard, and at the end ``summary.json`` plus ``summary.png``.

JSONL fields (of the step's last micro-batch, averaged over data-parallel replicas): step, tokens,
lr, sparsity_coef, loss and its parts (reconstruction, sparsity,
preact, auxk), fvu / l0 (means) and layer{l}/fvu, layer{l}/l0, layer{l}/mse, dead_fraction
(features that have not fired in ``train.dead_tokens`` tokens), grad_norm, tokens_per_s and
tflops (counted model FLOPs ÷ wall time: ``step_flops``). Replacement-model evaluations
(train.eval_every, and at the end) are lines of their own: step, eval/kl, eval/ce_clean,
eval/ce_spliced, eval/ce_ablated, eval/ce_recovered, eval/top1_agreement, eval/fvu, eval/l0 and
eval/layer{l}/kl|ce_recovered|fvu|l0 (fastclt.eval); the progress bar shows the latest KL and CE
recovered.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

__all__ = ["step_flops", "MetricsLogger", "write_summary", "last_logged"]


def step_flops(mcfg, tokens: int, l0: float) -> float:
    """Counted FLOPs of one step on ``tokens`` tokens: forward = dense encoder 2·L·F·d_in + sparse
    decoder 2·l0·d_out per (source, target) pair; backward ≈ 2 × forward. ``mcfg``: a CLTConfig, or
    an SAEConfig (one layer, d_out = d_in); a config with its own count (``MOLTConfig.step_flops``)
    gives it."""
    if hasattr(mcfg, "step_flops"):
        return mcfg.step_flops(tokens, l0)
    L = getattr(mcfg, "n_layers", 1)
    d_out = getattr(mcfg, "d_out", mcfg.d_in)
    enc = 2.0 * L * mcfg.n_features * mcfg.d_in
    pairs = L * (L + 1) / 2 if getattr(mcfg, "cross_layer", True) else L
    dec = 2.0 * l0 * d_out * pairs  # l0: mean active per token per source layer
    return 3.0 * tokens * (enc + dec)


class MetricsLogger:
    def __init__(self, out_dir: Path, cfg, is_main: bool, total_steps: int, start_step: int) -> None:
        self.is_main = is_main
        self.path = Path(out_dir) / "metrics.jsonl"
        self.file = None
        self.bar = None
        self.wandb = self.tb = None
        self.notes: dict = {}
        if not is_main:
            return
        if start_step == 0 and self.path.exists():
            self.path.unlink()
        self._truncate_after(start_step)
        self.file = open(self.path, "a")
        if cfg.log.progress:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            except ImportError:
                warnings.warn("log.progress: tqdm is not installed; no progress bar")
        if cfg.log.wandb:
            try:
                import wandb
                self.wandb = wandb.init(project=cfg.log.project, config=cfg.to_dict(), dir=str(out_dir))
            except ImportError:
                warnings.warn("log.wandb: wandb is not installed (pip install wandb); not logging to it")
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:
                warnings.warn("log.tensorboard: tensorboard is not installed; not logging to it")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be redone)."""
        if not self.path.exists():
            return
        from fastclt.checkpoint import atomic_write
        keep = [line for line, rec in _records(self.path) if rec.get("step", 0) <= step]

        def _write(tmp):
            with open(tmp, "w") as f:
                f.write("".join(line + "\n" for line in keep))
        atomic_write(self.path, _write)

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def progress(self, n: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{tokens_per_s:,.0f}", **self.notes)

    def note(self, **fields: str) -> None:
        """Fields shown on the progress bar from now on (the latest evaluation)."""
        self.notes.update(fields)

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


def _records(path: Path) -> list:
    """(line, record) of every complete JSON line of ``path`` (a line torn by a kill is skipped)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append((line, rec))
    return out


def last_logged(out_dir: Path, key: str):
    """The value of ``key`` in the last line of metrics.jsonl that has it (None: no such line)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    values = [rec[key] for _, rec in _records(path) if key in rec]
    return values[-1] if values else None


def write_summary(out_dir: Path, summary: dict, plot: bool) -> None:
    """summary.json (+ summary.png of per-layer FVU / L0, and replacement.png of the replacement
    model's per-layer KL / CE recovered / FVU when evaluated, when matplotlib is importable)."""
    from fastclt.checkpoint import write_json
    write_json(Path(out_dir) / "summary.json", summary)
    if not plot:
        return
    if "replacement" in summary:
        from fastclt.eval import plot_per_layer
        plot_per_layer(summary["replacement"], Path(out_dir) / "replacement.png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("log.plot: matplotlib is not installed; skipping summary.png")
        return
    fvu, l0 = summary.get("fvu_per_layer", []), summary.get("l0_per_layer", [])
    curve = []
    path = Path(out_dir) / "metrics.jsonl"
    if path.exists():
        curve = [(r["step"], r["loss"]) for _, r in _records(path) if "loss" in r]
    panels = 3 + bool(summary.get("mmcs_per_layer"))
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.5))
    if curve:
        axes[0].plot(*zip(*curve))
        axes[0].set(title="loss", xlabel="step", yscale="log")
    layers = list(range(len(fvu)))
    axes[1].bar(layers, fvu)
    axes[1].set(title="FVU per layer", xlabel="layer")
    axes[2].bar(layers, l0)
    axes[2].set(title="L0 per layer", xlabel="layer")
    if summary.get("mmcs_per_layer"):
        axes[3].bar(list(range(len(summary["mmcs_per_layer"]))), summary["mmcs_per_layer"])
        axes[3].set(title=f"MMCS per source layer (mean {summary['mmcs']:.3f})", xlabel="layer", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "summary.png", dpi=100)
    plt.close(fig)
