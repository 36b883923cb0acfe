"""Activations of a local Hugging Face causal LM: at each chosen block, the dictionary's input x (the
MLP module's input, ``mlp_in``, or the pre-MLP norm's input, ``resid_mid``) and target y (the MLP
module's output), captured by hooks at the sites of ``fastclt.lm`` (GPT-2, Llama/Mistral/Qwen2,
Gemma-2, GPT-NeoX). Nothing is downloaded: the LM and its tokenizer load from a local folder.

Tokens come from ``fastclt.tokens.TokenSource`` (random ids, a text file, a dataset, or .npy), in
sequences of ``ctx_len`` (optionally BOS + ctx_len − 1). Sequences are run ``seqs_per_forward`` at
a time: group q holds sequences q·G … (q + 1)·G − 1, always run together, so that the activations
of a group are the same whenever it is recomputed. Token (j, p) — position p of sequence j — has
the global id j·ctx_len + p; with ``exclude_bos`` the positions holding the BOS token are dropped
(their activations are outliers that a dictionary should not spend features on).
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from fastclt.training.config import ConfigError

__all__ = ["HFExtractor", "write_shards"]


class _Stop(Exception):
    pass


class HFExtractor:
    """x, y of chosen blocks of a local LM. ``lock`` serialises the LM's use (extraction in a
    prefetch thread, evaluation hooks in the main thread)."""

    def __init__(self, model_path, layers: list, device="cpu", dtype: str = "float32", tokens: str = "random",
                 ctx_len: int = 64, seed: int = 0, input_hook: str = "mlp_in", prepend_bos: bool = False,
                 exclude_bos: bool = False, text_field: str = "text", seqs_per_forward: int = 8) -> None:
        from fastclt.lm import hidden_size, load_lm, resolve_sites
        from fastclt.tokens import TokenSource, bos_token_id
        path = Path(model_path)
        if not path.is_dir():
            raise ConfigError(f"data.model: {path} is not a folder (nothing is downloaded; give a local path)")
        if input_hook not in ("mlp_in", "resid_mid"):
            raise ConfigError(f"data.input_hook: expected mlp_in or resid_mid, got {input_hook!r}")
        self.device = torch.device(device)
        try:
            self.lm = load_lm(path, self.device, dtype)
            self.sites = resolve_sites(self.lm, layers, need_norm=input_hook == "resid_mid")
        except (ImportError, ValueError) as e:
            raise ConfigError(f"data.model: {e}") from e
        self.path, self.layers, self.input_hook = path, list(layers), input_hook
        self.d_model = hidden_size(self.lm)
        self.vocab = self.lm.config.vocab_size
        self.ctx_len, self.seed, self.seqs_per_forward, self.text_field = ctx_len, seed, seqs_per_forward, text_field
        tok = None
        if tokens != "random" and not str(tokens).endswith(".npy"):
            tok = _load_tokenizer(path)
        self.bos_id = bos_token_id(self.lm.config, tok)
        self.exclude_bos = bool(exclude_bos) and self.bos_id is not None
        try:
            self.tokens = TokenSource(tokens, ctx_len, vocab_size=self.vocab, tokenizer=tok, seed=seed,
                                      prepend_bos=prepend_bos, bos_id=self.bos_id, text_field=text_field)
        except ValueError as e:
            raise ConfigError(f"data.{e}") from e
        self.lock = threading.Lock()

    def metadata(self) -> dict:
        """What a dictionary trained on these activations records (and a shards manifest)."""
        return {"lm": str(self.path.resolve()), "layers": list(self.layers), "input_hook": self.input_hook,
                "tokens": str(self.tokens.spec), "ctx_len": self.ctx_len, "seed": self.seed,
                "prepend_bos": self.tokens.bos is not None, "exclude_bos": self.exclude_bos,
                "seqs_per_forward": self.seqs_per_forward, "text_field": self.text_field}

    def token_ids(self, first: int, n: int) -> torch.Tensor:
        """[n, ctx_len] int64: sequences first … first + n − 1 of the token stream."""
        return self.tokens.sequences(first, n)

    @torch.no_grad()
    def activations(self, first: int, n: int):
        """Sequences first … first + n − 1 → (x [N, L, d] fp32, y [N, L, d] fp32, token ids [N] int64 on
        the CPU) over their N kept tokens, in stream order."""
        ids = self.token_ids(first, n)
        xs, ys, handles = {}, {}, []
        last = len(self.layers) - 1

        def grab_x(l):
            def fn(module, args, kwargs):
                xs[l] = (args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))).detach()
            return fn

        def grab_y(l):
            def fn(module, args, output):
                ys[l] = (output[0] if isinstance(output, tuple) else output).detach()
                if l == last:
                    raise _Stop
            return fn
        with self.lock:
            try:
                for l, site in enumerate(self.sites):
                    at = site.norm if self.input_hook == "resid_mid" else site.mlp
                    handles.append(at.register_forward_pre_hook(grab_x(l), with_kwargs=True))
                    handles.append(site.mlp.register_forward_hook(grab_y(l)))
                self.lm(input_ids=ids.to(self.device), use_cache=False)
            except _Stop:
                pass
            finally:
                for h in handles:
                    h.remove()
        x = torch.stack([xs[l] for l in range(len(self.layers))], 2).flatten(0, 1).float()
        y = torch.stack([ys[l] for l in range(len(self.layers))], 2).flatten(0, 1).float()
        index = torch.arange(first * self.ctx_len, (first + n) * self.ctx_len, dtype=torch.int64)
        if self.exclude_bos:
            keep = ids.flatten() != self.bos_id
            index = index[keep]
            keep = keep.to(x.device)
            x, y = x[keep], y[keep]
        return x, y, index

    def group(self, q: int):
        """Group q: the activations of sequences q·G … (q + 1)·G − 1 (G = seqs_per_forward)."""
        return self.activations(q * self.seqs_per_forward, self.seqs_per_forward)

    def group_of(self, token: torch.Tensor) -> torch.Tensor:
        """The group of each global token id."""
        return token // (self.ctx_len * self.seqs_per_forward)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 — any loading failure means "no tokenizer here"
        raise ConfigError(f"data.tokens: text needs the model folder's tokenizer; {path} has none "
                          f"({type(e).__name__}); use data.tokens random or a pre-tokenized .npy") from e


def write_shards(extractor: HFExtractor, out_dir, n_tokens: int, shard_tokens: int, dtype: str = "float32",
                 fmt: str = "safetensors", progress: bool = True) -> dict:
    """Write the first ``n_tokens`` kept tokens of the stream, in stream order (group after group),
    as shards of about ``shard_tokens`` tokens + ``manifest.json`` (with the extractor's metadata:
    the LM, layers, input hook, token source, BOS handling); return the manifest."""
    import numpy as np

    from fastclt.checkpoint import atomic_write, save_tensors, sha256_file, write_json
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    if fmt == "npy" and tdt == torch.bfloat16:
        raise ConfigError("dtype: .npy shards hold float32 only; use --format safetensors for bfloat16")
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=n_tokens, unit="tok", desc="extract")
        except ImportError:
            bar = None
    shards, pending, q, written = [], [], 0, 0

    def flush(x, y) -> None:
        j = len(shards)
        if fmt == "npy":
            entry = {"x": f"x_{j:05d}.npy", "y": f"y_{j:05d}.npy", "n_tokens": x.shape[0]}
            for key, t in (("x", x), ("y", y)):
                atomic_write(out / entry[key], lambda tmp, t=t: np.save(open(tmp, "wb"), t.numpy()))
            entry["sha256"] = {k: sha256_file(out / entry[k]) for k in ("x", "y")}
        else:
            name = f"shard_{j:05d}.safetensors"
            entry = {"file": name, "n_tokens": x.shape[0], "sha256": save_tensors(out / name, {"x": x, "y": y})}
        shards.append(entry)

    def pending_tokens() -> int:
        return sum(p[0].shape[0] for p in pending)

    while written < n_tokens:
        x, y, _ = extractor.group(q)
        q += 1
        take = min(x.shape[0], n_tokens - written)
        pending.append((x[:take].cpu().to(tdt), y[:take].cpu().to(tdt)))
        written += take
        if bar is not None:
            bar.update(take)
        while pending_tokens() >= shard_tokens or (written >= n_tokens and pending):
            xs, ys = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
            flush(xs[:shard_tokens], ys[:shard_tokens])
            pending = [(xs[shard_tokens:], ys[shard_tokens:])] if xs.shape[0] > shard_tokens else []
    if bar is not None:
        bar.close()
    manifest = {"format": "fastclt.activations", "version": 1, "n_layers": len(extractor.layers),
                "d_in": extractor.d_model, "d_out": extractor.d_model, "dtype": dtype,
                "n_tokens": int(sum(s["n_tokens"] for s in shards)), "x": extractor.input_hook, "y": "mlp_out",
                "shards": shards, **extractor.metadata()}
    write_json(out / "manifest.json", manifest)
    return manifest
