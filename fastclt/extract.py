"""Write activation shards from a local Hugging Face causal LM, for ``data.source shards``.

    python -m fastclt.extract --model PATH --out DIR [--layers 0,1,2] [--n_tokens 1000000]
                              [--tokens random|FILE.txt|FILE.jsonl|FILE.parquet|DIR|FILE.npy]
                              [--input_hook mlp_in|resid_mid] [--ctx_len 64] [--prepend_bos] [--seed 0]

Each kept token's dictionary input x (``--input_hook``) and MLP output y at the chosen blocks →
``DIR/shard_XXXXX.safetensors`` (tensors x [N, L, d], y [N, L, d]) + ``DIR/manifest.json``, which
records the LM, the blocks, the input hook, the token source and the BOS handling (a dictionary
trained on the shards records them in its config). Tokens are written in the order of the token
stream of ``data.source hf`` with the same options (defaults are the trainer's), so training on
these shards with ``data.shuffle false`` sees the batches of on-the-fly extraction in stream order.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    from fastclt.training.config import ConfigError, DataSection
    d = DataSection()
    p = argparse.ArgumentParser(prog="python -m fastclt.extract", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face model folder (nothing is downloaded)")
    p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--layers", default=None, help="comma-separated block indices (default: all blocks)")
    p.add_argument("--n_tokens", type=int, default=65536, help="tokens to write")
    p.add_argument("--tokens", default=d.tokens, help="'random' (seeded token ids), a text file, a dataset file or "
                   "folder (.jsonl, .json, .parquet, .csv, .arrow, save_to_disk; needs datasets) or a .npy of ids")
    p.add_argument("--text_field", default=d.text_field, help="dataset column holding the text")
    p.add_argument("--input_hook", default="mlp_in", choices=("mlp_in", "resid_mid"),
                   help="x: the MLP module's input, or the residual stream before the pre-MLP norm")
    p.add_argument("--ctx_len", type=int, default=d.ctx_len, help="tokens per sequence")
    p.add_argument("--prepend_bos", action=argparse.BooleanOptionalAction, default=d.prepend_bos,
                   help="start every sequence with the LM's BOS token")
    p.add_argument("--exclude_bos", action=argparse.BooleanOptionalAction, default=d.exclude_bos,
                   help="drop the positions that hold the BOS token")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids (= train.seed)")
    p.add_argument("--seqs_per_forward", type=int, default=d.seqs_per_forward, help="sequences per forward pass")
    p.add_argument("--shard_tokens", type=int, default=262144, help="tokens per shard file")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="stored dtype")
    p.add_argument("--model_dtype", default=d.hf_dtype, choices=("float32", "bfloat16"), help="host model dtype")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "npy"), help="shard file format")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    a = p.parse_args(argv)
    from fastclt.training.extract import HFExtractor, write_shards
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if not Path(a.model).is_dir():
        print(f"error: --model: {a.model} is not a folder (nothing is downloaded; give a local path)", file=sys.stderr)
        return 2
    try:
        layers = None if a.layers is None else [int(v) for v in str(a.layers).split(",") if v.strip()]
        if layers is None:
            from transformers import AutoConfig
            cfg = AutoConfig.from_pretrained(a.model, local_files_only=True)
            layers = list(range(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer))
        for name in ("n_tokens", "shard_tokens", "seqs_per_forward"):
            if getattr(a, name) < 1:
                raise ValueError(f"--{name}: expected a positive integer, got {getattr(a, name)}")
        ex = HFExtractor(a.model, layers, device=device, dtype=a.model_dtype, tokens=a.tokens, ctx_len=a.ctx_len,
                         seed=a.seed, input_hook=a.input_hook, prepend_bos=a.prepend_bos, exclude_bos=a.exclude_bos,
                         text_field=a.text_field, seqs_per_forward=a.seqs_per_forward)
        m = write_shards(ex, a.out, a.n_tokens, a.shard_tokens, a.dtype, a.format)
    except (ConfigError, ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m['n_tokens']} tokens × {m['n_layers']} layers (d={m['d_in']}, x = {m['input_hook']}, "
          f"y = mlp_out) in {len(m['shards'])} shard(s) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
