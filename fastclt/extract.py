"""Write activation shards from a local Hugging Face causal LM, for ``data.source shards``.

    python -m fastclt.extract --model PATH --out DIR [--layers 0,1,2] [--n_tokens 1000000]
                              [--tokens random|FILE.txt] [--ctx_len 64] [--seed 0]

Each token's MLP input (x) and output (y) at the chosen blocks → ``DIR/shard_XXXXX.safetensors``
(tensors x [N, L, d], y [N, L, d]) + ``DIR/manifest.json``. Sequences are written in the order of
the token stream of ``data.source hf`` with the same tokens/ctx_len/seed, so training on these
shards with ``data.shuffle false`` sees exactly the batches of on-the-fly extraction.
"""
from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastclt.extract", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face model folder (nothing is downloaded)")
    p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--layers", default=None, help="comma-separated block indices (default: all blocks)")
    p.add_argument("--n_tokens", type=int, default=65536, help="tokens to write (rounded up to whole sequences)")
    p.add_argument("--tokens", default="random", help="'random' (seeded token ids) or a local text file "
                   "(tokenized with the model folder's tokenizer)")
    p.add_argument("--ctx_len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids (= train.seed)")
    p.add_argument("--batch_seqs", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--shard_tokens", type=int, default=262144, help="tokens per shard file")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="stored dtype")
    p.add_argument("--model_dtype", default="float32", choices=("float32", "bfloat16"), help="host model dtype")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "npy"), help="shard file format")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    a = p.parse_args(argv)
    from fastclt.training.config import ConfigError
    from fastclt.training.extract import HFExtractor, write_shards
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    from pathlib import Path
    if not Path(a.model).is_dir():
        print(f"error: --model: {a.model} is not a folder (nothing is downloaded; give a local path)", file=sys.stderr)
        return 2
    try:
        layers = None if a.layers is None else [int(v) for v in str(a.layers).split(",") if v.strip()]
        if layers is None:
            from transformers import AutoConfig
            cfg = AutoConfig.from_pretrained(a.model, local_files_only=True)
            layers = list(range(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer))
        ex = HFExtractor(a.model, layers, device=device, dtype=a.model_dtype, tokens=a.tokens,
                         ctx_len=a.ctx_len, seed=a.seed)
        m = write_shards(ex, a.out, a.n_tokens, a.batch_seqs, a.shard_tokens, a.dtype, a.format)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m['n_tokens']} tokens × {m['n_layers']} layers (d={m['d_in']}) in {len(m['shards'])} "
          f"shard(s) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
