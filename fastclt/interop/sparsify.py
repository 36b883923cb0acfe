"""eai-sparsify (``sparsify``) checkpoints, into fastclt models.

One hookpoint folder holds ``cfg.json`` (``d_in``, ``num_latents`` or ``expansion_factor``, ``k``,
``activation``, ``transcode``, ``skip_connection``, ``normalize_decoder``, ``multi_topk``) and
``sae.safetensors``: ``encoder.weight`` [F, d], ``encoder.bias`` [F], ``W_dec`` [F, d], ``b_dec`` [d],
``W_skip`` [d, d] (with ``skip_connection``). Its module computes, for x: [B, d],

    a = TopK_k(relu(W_enc (x − b_dec) + b_enc))      (an SAE; a transcoder has no − b_dec)
    ŷ = W_decᵀ a + b_dec (+ W_skip x)

— an SAE becomes a fastclt SparseAutoencoder (TopK, b_dec as its pre-bias), a transcoder a PLT
(a one-layer CrossLayerTranscoder, d_in = d_out = d), the skip as the PLT's W_skip. A transcoder
maps its module's input to its output; in a folder named after an MLP module (``layers.N.mlp``,
``h.N.mlp``) it records lm_layers=[N] and input_hook="mlp_in".
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Union

from fastclt.config import CLTConfig, SAEConfig
from fastclt.interop._io import NotRepresentableError, TensorFile, build, field, read_config

__all__ = ["load_sparsify", "is_sparsify", "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def is_sparsify(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def load_sparsify(path: Union[str, Path]):
    """An eai-sparsify hookpoint folder → SparseAutoencoder (an SAE) or a PLT (a transcoder)."""
    folder = Path(path)
    what = f"sparsify {folder / CONFIG_FILE}"
    cfg = read_config(folder / CONFIG_FILE, f"sparsify {CONFIG_FILE}")
    pos = lambda v: v > 0  # noqa: E731
    d = field(cfg, "d_in", int, what, check=pos)
    activation = field(cfg, "activation", str, what, default="topk")
    if activation != "topk":
        raise NotRepresentableError(f"{what}: activation {activation!r}: only 'topk' has a fastclt form (GroupMax "
                                    f"selects one latent per group)")
    n = field(cfg, "num_latents", int, what, default=0, check=lambda v: v >= 0)
    F = n or d * field(cfg, "expansion_factor", int, what, default=32, check=pos)
    k = field(cfg, "k", int, what, check=lambda v: 0 < v <= F)
    transcode = field(cfg, "transcode", bool, what, default=False)
    skip = field(cfg, "skip_connection", bool, what, default=False)
    normalize = field(cfg, "normalize_decoder", bool, what, default=True)
    field(cfg, "multi_topk", bool, what, default=False)  # a training loss; the forward is TopK-k either way
    if skip and not transcode:
        raise NotRepresentableError(f"{what}: skip_connection on an SAE (transcode false): fastclt's SAE has no skip "
                                    f"term, and as a PLT its input offset − b_dec would change the rounding")
    tf = TensorFile(folder / WEIGHTS_FILE, f"sparsify {folder / WEIGHTS_FILE}")
    shapes = {"encoder.weight": (F, d), "encoder.bias": (F,), "W_dec": (F, d), "b_dec": (d,)}
    if skip:
        shapes["W_skip"] = (d, d)
    extra = sorted(tf.keys - set(shapes))
    if extra:
        raise NotRepresentableError(f"{tf.what}: unexpected tensor(s) {extra} for this cfg.json")
    for name, shape in shapes.items():
        tf.check(name, shape)
    dtype = tf.dtype(shapes)
    t = {name: tf.get(name, shape) for name, shape in shapes.items()}
    if transcode:
        block = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)\.mlp$", folder.resolve().name)
        meta = {"lm_layers": [int(block.group(1))], "input_hook": "mlp_in"} if block else {}
        mcfg = CLTConfig(n_layers=1, d_in=d, d_out=d, n_features=F, activation="topk", k=k, skip_connection=skip,
                         dtype=dtype, **meta)
        params = {"W_enc": t["encoder.weight"][None], "b_enc": t["encoder.bias"][None],
                  "W_dec.0": t["W_dec"][:, None], "b_dec": t["b_dec"][None]}
        if skip:
            params["W_skip"] = t["W_skip"][None]
    else:
        mcfg = SAEConfig(d_in=d, n_features=F, activation="topk", k=k, unit_norm_decoder=normalize, dtype=dtype)
        params = {"W_enc": t["encoder.weight"], "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    return build(mcfg, params, what)
