"""MLP activations of a local Hugging Face causal LM: each chosen block's MLP input (x) and output
(y), captured by forward hooks on ``transformer.h[i].mlp`` (GPT-2 style), ``model.layers[i].mlp``
(Llama/Mistral/Qwen style) or ``gpt_neox.layers[i].mlp``. Nothing is downloaded: the model and
its tokenizer are loaded from a local folder with ``local_files_only=True``.

Token source: ``tokens="random"`` — sequence j is ``ctx_len`` token ids drawn from a generator
seeded by (seed, j); or a local text file, tokenized once and cut into ``ctx_len`` chunks
(sequence j is chunk j mod n_chunks). ``activations(first, n)`` returns the activations of
sequences first … first + n − 1 flattened to tokens: x, y: [n·ctx_len, L, d_model] fp32.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastclt.training.config import ConfigError

__all__ = ["HFExtractor", "find_blocks", "write_shards"]


class _Stop(Exception):
    pass


def find_blocks(model) -> list:
    for path in ("transformer.h", "model.layers", "gpt_neox.layers", "layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if all(hasattr(b, "mlp") for b in obj):
            return list(obj)
    raise ConfigError("data.model: no transformer blocks with an .mlp found (expected transformer.h[i].mlp "
                      "or model.layers[i].mlp)")


class HFExtractor:
    def __init__(self, model_path, layers: list, device="cpu", dtype: str = "float32", tokens: str = "random",
                 ctx_len: int = 64, seed: int = 0) -> None:
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as e:
            raise ConfigError("data.source hf: needs `pip install transformers` (the fastclt[hf] extra)") from e
        path = Path(model_path)
        if not path.is_dir():
            raise ConfigError(f"data.model: {path} is not a folder (nothing is downloaded; give a local path)")
        self.device = torch.device(device)
        tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, torch_dtype=tdtype)
        self.model.to(self.device).eval()
        blocks = find_blocks(self.model)
        bad = [l for l in layers if not 0 <= l < len(blocks)]
        if bad:
            raise ConfigError(f"data.layers: {bad} out of range; the model has {len(blocks)} blocks")
        self.layers = list(layers)
        self.blocks = blocks
        cfg = self.model.config
        self.d_model = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
        self.vocab = cfg.vocab_size
        self.ctx_len, self.seed = ctx_len, seed
        self.text_ids = None
        if tokens != "random":
            from transformers import AutoTokenizer
            try:
                tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except Exception as e:  # noqa: BLE001 — any loading failure means "no tokenizer here"
                raise ConfigError(f"data.tokens: a text file needs the model folder's tokenizer; {path} has none "
                                  f"({type(e).__name__}); use data.tokens random") from e
            ids = tok(Path(tokens).read_text())["input_ids"]
            n = len(ids) // ctx_len
            if n == 0:
                raise ConfigError(f"data.tokens: {tokens} holds {len(ids)} tokens, fewer than data.ctx_len={ctx_len}")
            self.text_ids = torch.tensor(ids[:n * ctx_len]).view(n, ctx_len)

    def token_ids(self, first: int, n: int) -> torch.Tensor:
        """[n, ctx_len] int64: sequences first … first + n − 1 of the token stream."""
        if self.text_ids is not None:
            idx = torch.arange(first, first + n) % self.text_ids.shape[0]
            return self.text_ids[idx]
        out = torch.empty(n, self.ctx_len, dtype=torch.int64)
        for j in range(n):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + first + j) % (2 ** 62))
            out[j] = torch.randint(0, self.vocab, (self.ctx_len,), generator=g)
        return out

    @torch.no_grad()
    def activations(self, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.token_ids(first, n).to(self.device)
        xs, ys = {}, {}
        last = max(self.layers)
        handles = []

        def hook(l):
            def fn(module, inputs, output):
                xs[l] = inputs[0].detach()
                ys[l] = (output[0] if isinstance(output, tuple) else output).detach()
                if l == last:
                    raise _Stop
            return fn
        for l in set(self.layers):
            handles.append(self.blocks[l].mlp.register_forward_hook(hook(l)))
        try:
            self.model(input_ids=ids)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        x = torch.stack([xs[l] for l in self.layers], 2).flatten(0, 1).float()
        y = torch.stack([ys[l] for l in self.layers], 2).flatten(0, 1).float()
        return x.cpu() if self.device.type == "cpu" else x, y.cpu() if self.device.type == "cpu" else y


def write_shards(extractor: HFExtractor, out_dir, n_tokens: int, seqs_per_batch: int, shard_tokens: int,
                 dtype: str = "float32", fmt: str = "safetensors", progress: bool = True) -> dict:
    """Write the activations of the first ceil(n_tokens / ctx_len) sequences, in stream order, as
    shards of about ``shard_tokens`` tokens + ``manifest.json``; return the manifest."""
    import numpy as np

    from fastclt.checkpoint import atomic_write, save_tensors, sha256_file, write_json
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    T = extractor.ctx_len
    n_seqs = -(-n_tokens // T)
    seqs_per_shard = max(1, shard_tokens // T)
    tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    shards = []
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=n_seqs * T, unit="tok", desc="extract")
        except ImportError:
            bar = None
    for start in range(0, n_seqs, seqs_per_shard):
        count = min(seqs_per_shard, n_seqs - start)
        xs, ys = [], []
        for s in range(start, start + count, seqs_per_batch):
            x, y = extractor.activations(s, min(seqs_per_batch, start + count - s))
            xs.append(x.cpu().to(tdt))
            ys.append(y.cpu().to(tdt))
            if bar is not None:
                bar.update(x.shape[0])
        x, y = torch.cat(xs), torch.cat(ys)
        j = len(shards)
        if fmt == "npy":
            if tdt == torch.bfloat16:
                raise ConfigError("dtype: .npy shards hold float32 only; use --format safetensors for bfloat16")
            entry = {"x": f"x_{j:05d}.npy", "y": f"y_{j:05d}.npy", "n_tokens": x.shape[0]}
            for key, t in (("x", x), ("y", y)):
                atomic_write(out / entry[key], lambda tmp, t=t: np.save(open(tmp, "wb"), t.numpy()))
            entry["sha256"] = {k: sha256_file(out / entry[k]) for k in ("x", "y")}
        else:
            name = f"shard_{j:05d}.safetensors"
            digest = save_tensors(out / name, {"x": x, "y": y})
            entry = {"file": name, "n_tokens": x.shape[0], "sha256": digest}
        shards.append(entry)
    if bar is not None:
        bar.close()
    manifest = {"format": "fastclt.activations", "version": 1, "n_layers": len(extractor.layers),
                "d_in": extractor.d_model, "d_out": extractor.d_model, "dtype": dtype,
                "n_tokens": int(sum(s["n_tokens"] for s in shards)), "ctx_len": T, "layers": extractor.layers,
                "x": "mlp input", "y": "mlp output", "shards": shards}
    write_json(out / "manifest.json", manifest)
    return manifest
