"""Convert a TopK/BatchTopK dictionary to JumpReLU, thresholds set on held-out activations.

    python -m fastclt.calibrate MODEL OUT --data SHARDS [--tokens 65536] [--target-l0 K | K0,K1,...]

MODEL: anything ``fastclt.load`` opens (a ``save_pretrained`` folder, a training run's out_dir, an
eai-sparsify TopK SAE, ...). SHARDS: activations written by ``python -m fastclt.extract`` that the
model was not trained on (e.g. extracted with another ``--seed`` or text file); the first
``--tokens`` of them, in stream order, are used. One threshold per layer is chosen so that each
layer's L0 on those tokens matches the model's own TopK/BatchTopK L0 there (or ``--target-l0``);
see ``SparseDictionary.calibrate_jumprelu``. OUT receives the JumpReLU model (``save_pretrained``)
and ``calibration.json`` (thresholds, L0 and FVU before and after, per layer), which the per-layer
table printed at the end summarises.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

__all__ = ["main", "calibrate_and_save", "CALIBRATION_FILE"]

CALIBRATION_FILE = "calibration.json"


def calibrate_and_save(model, x: torch.Tensor, y: Optional[torch.Tensor], out, target_l0=None,
                       batch_size: int = 4096):
    """``model.calibrate_jumprelu(x, y, ...)``; the JumpReLU model saved to ``out`` (save_pretrained)
    with ``calibration.json`` beside it. Returns the JumpReLUCalibration."""
    from fastclt.checkpoint import write_json

    cal = model.calibrate_jumprelu(x, y, target_l0=target_l0, batch_size=batch_size)
    out = Path(out)
    cal.model.save_pretrained(out)
    write_json(out / CALIBRATION_FILE, cal.summary())
    return cal


def format_table(summary: dict) -> str:
    """The per-layer numbers of a calibration summary as a text table."""
    rows = ["layer  threshold   target L0  L0 before  L0 after  FVU before  FVU after"]
    fb, fa = summary.get("fvu_before"), summary.get("fvu_after")
    for l, theta in enumerate(summary["threshold"]):
        fvu = (f"{fb[l]:10.4f} {fa[l]:10.4f}" if fb is not None else f"{'-':>10} {'-':>10}")
        rows.append(f"{l:5d} {theta:10.4g} {summary['target_l0'][l]:11.2f} {summary['l0_before'][l]:10.2f} "
                    f"{summary['l0_after'][l]:9.2f}  {fvu}")
    return "\n".join(rows)


def _read_shards(path: str, n_tokens: int, n_layers: int, d_in: int, d_out: int):
    """The first n_tokens of a shards folder, in stream order → (x [N, L, d_in], y [N, L, d_out]) fp32."""
    from fastclt.training.config import ConfigError, DataSection, RunConfig, TrainSection
    from fastclt.training.data import ShardSource, read_manifest

    m = read_manifest(path)
    have = int(m.get("n_tokens", 0))
    if n_tokens > have:
        raise ConfigError(f"--tokens: {n_tokens} requested but {path} holds {have}")
    cfg = RunConfig(train=TrainSection(batch_size=n_tokens),
                    data=DataSection(source="shards", path=path, shuffle=False))
    return ShardSource(cfg, n_layers, d_in, d_out, dp_rank=0, dp=1).get_global(0)


def _targets(text: Optional[str]):
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError as e:
        raise ValueError(f"--target-l0: expected a number or comma-separated numbers, got {text!r}") from e
    return vals[0] if len(vals) == 1 else vals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastclt.calibrate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="a TopK/BatchTopK model folder that fastclt.load opens")
    p.add_argument("out", help="output folder for the JumpReLU model and calibration.json")
    p.add_argument("--data", required=True, help="held-out activation shards (python -m fastclt.extract)")
    p.add_argument("--tokens", type=int, default=65536, help="calibration tokens read from --data")
    p.add_argument("--target-l0", default=None, help="L0 per layer to match (one number, or one per layer); "
                   "default: the model's own L0 on the calibration tokens")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens encoded at a time")
    p.add_argument("--format", default="auto", help="format of MODEL (default: sniffed)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    a = p.parse_args(argv)
    import fastclt
    from fastclt.checkpoint import CheckpointError
    try:
        if a.tokens < 1:
            raise ValueError(f"--tokens: expected a positive count, got {a.tokens}")
        model = fastclt.load(a.model, format=a.format, device=a.device)
        if model.cfg.activation not in ("topk", "batchtopk"):  # before reading any data
            raise ValueError(f"model: only a TopK/BatchTopK dictionary is calibrated to JumpReLU, not "
                             f"{model.cfg.activation!r}")
        sae = isinstance(model, fastclt.SparseAutoencoder)
        x, y = _read_shards(a.data, a.tokens, model.n_layers, model.d_in, model.d_out)
        x, y = x.to(a.device, model.param_dtype), y.to(a.device, model.param_dtype)
        cal = calibrate_and_save(model, x[:, 0] if sae else x, None if sae else y, a.out,
                                 target_l0=_targets(a.target_l0), batch_size=a.batch_size)
    except (CheckpointError, ValueError) as e:  # ConfigError and NotRepresentableError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(cal.summary()))
    print(f"JumpReLU model and {CALIBRATION_FILE} ({cal.n_tokens} calibration tokens): {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
