"""Token sequences for a language model: ``TokenSource(spec, ctx_len, ...).sequences(first, n)`` →
int64 [n, ctx_len], sequence j a pure function of j.

``spec``:
    "random"                    ids drawn uniformly from [0, vocab_size), seeded by (seed, j)
    FILE.txt (any other suffix) a text file, tokenized once by the LM folder's tokenizer
    FILE.jsonl / .json / .parquet / .csv / .arrow, or a folder written by ``Dataset.save_to_disk``:
                                documents read with the ``datasets`` library (``pip install datasets``),
                                from the column ``text_field`` (tokenized) or ``input_ids`` (already
                                tokenized); documents are joined by the tokenizer's EOS token
    FILE.npy                    pre-tokenized ids, memory-mapped: 1-D a token stream; 2-D [N, T] one
                                sequence per row (its first ctx_len tokens, or ctx_len − 1 with BOS)
A stream (text, documents, 1-D .npy) is cut into consecutive chunks; a finite corpus is cycled
(sequence j is chunk j mod n_chunks). ``prepend_bos``: every sequence is BOS + ctx_len − 1 tokens
(the chunks then hold ctx_len − 1 tokens). Tokenizers are called with ``add_special_tokens=False``:
BOS appears only where ``prepend_bos`` puts it or where the corpus has it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ["TokenSource", "DATASET_SUFFIXES", "bos_token_id"]

DATASET_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def bos_token_id(lm_config, tokenizer=None) -> Optional[int]:
    """The BOS id of an LM (its tokenizer's, else its config's), or None; ids outside the vocabulary → None."""
    vocab = getattr(lm_config, "vocab_size", None)
    for src in (tokenizer, lm_config):
        v = getattr(src, "bos_token_id", None) if src is not None else None
        if isinstance(v, int) and (vocab is None or 0 <= v < vocab):
            return v
    return None


class TokenSource:
    """See the module docstring. ``tokenizer``: a transformers tokenizer or a local folder holding
    one (needed only for text); ``bos_id``: the BOS token (needed for ``prepend_bos``)."""

    def __init__(self, spec: str, ctx_len: int, *, vocab_size: int, tokenizer=None, seed: int = 0,
                 prepend_bos: bool = False, bos_id: Optional[int] = None, text_field: str = "text") -> None:
        if not isinstance(ctx_len, int) or ctx_len < 1 + bool(prepend_bos):
            raise ValueError(f"ctx_len: expected an int >= {1 + bool(prepend_bos)}, got {ctx_len!r}")
        if prepend_bos and (bos_id is None or not 0 <= bos_id < vocab_size):
            raise ValueError(f"prepend_bos: the LM has no BOS token inside its vocabulary (bos id {bos_id}, "
                             f"vocab_size {vocab_size}); set prepend_bos false")
        self.spec, self.ctx_len, self.vocab, self.seed = str(spec), ctx_len, vocab_size, seed
        self.bos = bos_id if prepend_bos else None
        self.body = ctx_len - (self.bos is not None)  # corpus tokens per sequence
        self.stream: Optional[np.ndarray] = None      # 1-D ids
        self.rows: Optional[np.ndarray] = None        # 2-D ids, one sequence per row
        if self.spec == "random":
            return
        path = Path(self.spec)
        if not path.exists():
            raise ValueError(f"tokens: {path} does not exist (expected 'random', a text file, a dataset file or "
                             f"folder, or a .npy of token ids)")
        if path.suffix == ".npy":
            self._load_npy(path)
        elif path.is_dir() or path.suffix in DATASET_SUFFIXES:
            self.stream = self._documents(path, tokenizer, text_field)
        else:
            ids = _tokenizer(tokenizer, path)(path.read_text(), add_special_tokens=False)["input_ids"]
            self.stream = np.asarray(ids, dtype=np.int64)
        self._check_ids()

    # ------------------------------------------------------------------ loading
    def _load_npy(self, path: Path) -> None:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"tokens: {path} holds {a.dtype}; expected integer token ids")
        if a.ndim == 1:
            self.stream = a
        elif a.ndim == 2:
            if a.shape[1] < self.body:
                raise ValueError(f"tokens: {path} rows hold {a.shape[1]} tokens, fewer than the {self.body} a "
                                 f"sequence needs (ctx_len {self.ctx_len}"
                                 f"{', BOS prepended' if self.bos is not None else ''})")
            self.rows = a
        else:
            raise ValueError(f"tokens: {path} has shape {a.shape}; expected a 1-D stream or 2-D [N, T] rows")

    def _documents(self, path: Path, tokenizer, text_field: str) -> np.ndarray:
        try:
            import datasets
        except ImportError as e:
            raise ImportError(f"tokens: reading {path} needs the datasets library (pip install datasets); "
                              f"or give a text file or pre-tokenized .npy") from e
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise ValueError(f"tokens: {path} holds splits {list(ds)}; expected a 'train' split")
                ds = ds["train"]
        elif path.suffix == ".arrow":
            ds = datasets.Dataset.from_file(str(path))
        else:
            ds = datasets.load_dataset(DATASET_SUFFIXES[path.suffix], data_files=str(path), split="train")
        if text_field in ds.column_names:
            tok = _tokenizer(tokenizer, path)
            docs = []
            for i in range(0, len(ds), 1000):
                docs += tok(ds[i:i + 1000][text_field], add_special_tokens=False)["input_ids"]
            sep = getattr(tok, "eos_token_id", None)
        elif "input_ids" in ds.column_names:
            docs, sep = ds["input_ids"], None
        else:
            raise ValueError(f"tokens: {path} has columns {ds.column_names}; expected {text_field!r} (data.text_field) "
                             f"or 'input_ids'")
        parts = []
        for d in docs:
            parts.append(np.asarray(d, dtype=np.int64))
            if sep is not None:
                parts.append(np.asarray([sep], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _check_ids(self) -> None:
        a = self.stream if self.stream is not None else self.rows
        if self.stream is not None and len(a) < self.body:
            raise ValueError(f"tokens: {self.spec} holds {len(a)} tokens, fewer than the {self.body} of one sequence")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= self.vocab):
            raise ValueError(f"tokens: {self.spec} has ids in [{int(a.min())}, {int(a.max())}], outside the LM's "
                             f"vocabulary [0, {self.vocab}) (a tokenizer or token file of another model?)")

    # ------------------------------------------------------------------ access
    @property
    def n_sequences(self) -> Optional[int]:
        """Distinct sequences of a finite corpus (None: an endless random stream)."""
        if self.rows is not None:
            return int(self.rows.shape[0])
        if self.stream is not None:
            return len(self.stream) // self.body
        return None

    def sequences(self, first: int, n: int) -> torch.Tensor:
        """int64 [n, ctx_len]: sequences first … first + n − 1."""
        out = torch.empty(n, self.ctx_len, dtype=torch.int64)
        body = out[:, 1:] if self.bos is not None else out
        if self.bos is not None:
            out[:, 0] = self.bos
        count = self.n_sequences
        for r, j in enumerate(range(first, first + n)):
            if count is None:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + j) % (2 ** 62))
                body[r] = torch.randint(0, self.vocab, (self.body,), generator=g)
            elif self.rows is not None:
                body[r] = torch.from_numpy(np.array(self.rows[j % count, :self.body], dtype=np.int64))
            else:
                c = j % count
                body[r] = torch.from_numpy(np.array(self.stream[c * self.body:(c + 1) * self.body], dtype=np.int64))
        return out


def _tokenizer(tokenizer, path: Path):
    if tokenizer is None:
        raise ValueError(f"tokens: {path} is text and needs the LM folder's tokenizer; none was found (give a "
                         f"pre-tokenized .npy, or use 'random')")
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        except Exception as e:  # noqa: BLE001 — any loading failure means "no tokenizer there"
            raise ValueError(f"tokens: {path} is text and needs a tokenizer, but {tokenizer} has none "
                             f"({type(e).__name__}); give a pre-tokenized .npy or use 'random'") from e
    return tokenizer
