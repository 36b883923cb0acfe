"""How good is a dictionary as a replacement for the MLPs it was trained on?

    from fastclt.eval import evaluate_replacement
    m = evaluate_replacement(model, lm, input_ids, batch_size=8)     # input_ids: int [N, T]
    m["kl"], m["ce_recovered"], m["per_layer"][l]["ce_recovered"], …

    python -m fastclt.eval --model runs/x/model --lm path/to/lm --tokens corpus.txt
        # prints a table, writes eval.json and eval.png (per-layer KL, CE recovered, FVU)

Four forward passes of the LM per batch — clean, spliced (every MLP the dictionary covers replaced,
``fastclt.replacement``), ablated (those MLP outputs set to zero; for an SAE its hooked activation),
and with ``per_layer`` two more per dictionary layer (only MLP ``layers[l]`` spliced, resp.
ablated). With p the clean and q the spliced next-token distribution at each position:

    kl              mean over all N·T positions of KL(p ‖ q) = Σ_v p_v (log p_v − log q_v), in nats
    ce_clean / ce_spliced / ce_ablated
                    mean next-token cross-entropy over the N·(T − 1) positions 0 … T − 2
    ce_recovered    (ce_ablated − ce_spliced) / (ce_ablated − ce_clean): 1 = as good as the MLPs,
                    0 = as bad as removing them (NaN when ablating changes nothing)
    top1_agreement  fraction of all N·T positions where argmax q = argmax p
    fvu, l0         the dictionary on the spliced run: FVU_l = Σ‖y_l − ŷ_l‖² / Σ‖y_l − ȳ_l‖² with
                    y_l the MLP output the LM computes from its (spliced) input, L0 the mean active
                    features per token; their means over layers, and per layer in ``per_layer``
Every value is a sum over positions divided by a count of positions, so ``batch_size`` changes no
result. The LM runs in eval mode (dropout off) and both models are restored exactly as they were,
hooks removed, also when the call raises.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastclt.replacement import Splice

__all__ = ["evaluate_replacement", "load_dictionary", "format_table", "plot_per_layer", "main"]


def _check_ids(input_ids, lm: nn.Module) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor of token ids [N, T], got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids: expected shape [N, T] with N >= 1 and T >= 2, got {tuple(input_ids.shape)}")
    vocab = getattr(getattr(lm, "config", None), "vocab_size", None)
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"input_ids: ids in [{lo}, {hi}], outside the LM's vocabulary [0, {vocab})")


def _logits(lm: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = lm(input_ids=ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.double() if logits.dtype == torch.float64 else logits.float()


class _Sums:
    """Per-run sums over positions: KL, cross-entropy and top-1 agreement."""

    def __init__(self) -> None:
        self.kl = self.ce = self.top1 = 0.0

    def add(self, lp_clean: torch.Tensor, lp: torch.Tensor, targets: torch.Tensor, agree: bool = True) -> None:
        self.ce += float(F.nll_loss(lp[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum"))
        if agree:
            self.kl += float(F.kl_div(lp, lp_clean, log_target=True, reduction="sum"))
            self.top1 += float((lp.argmax(-1) == lp_clean.argmax(-1)).sum())


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    den = ablated - clean
    return (ablated - spliced) / den if den != 0 else float("nan")


@torch.no_grad()
def evaluate_replacement(model, lm: nn.Module, input_ids: torch.Tensor, layers=None, input_hook: Optional[str] = None,
                         batch_size: int = 8, *, per_layer: bool = True, paths=None, topk_as_jumprelu: bool = False,
                         progress: bool = False) -> dict:
    """KL, CE recovered and the rest (module docstring) of ``model`` spliced into ``lm`` on
    ``input_ids`` [N, T] (moved to the LM's device ``batch_size`` sequences at a time).

    layers / input_hook: the LM block of each dictionary layer and the input hook (default: the
    ones recorded in the dictionary's config, else 0 … L − 1 and "mlp_in"). paths / topk_as_jumprelu:
    as ``fastclt.replacement.Splice``. Returns a dict with kl, ce_clean, ce_spliced, ce_ablated,
    ce_recovered, top1_agreement, fvu, l0, per_layer (a list of L dicts: layer, lm_layer, kl,
    ce_spliced, ce_ablated, ce_recovered, top1_agreement, fvu, l0 — the pass-wise values with only
    that layer spliced, fvu / l0 from the full splice), n_sequences, n_tokens, lm_layers, input_hook.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size: expected an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1 sequences per forward pass, got {batch_size}")
    full = Splice(model, lm, layers, input_hook, paths=paths, topk_as_jumprelu=topk_as_jumprelu, record_stats=True)
    _check_ids(input_ids, lm)
    L = model.n_layers
    spliced_model = full.model  # BatchTopK / TopK converted once, shared by every splice
    kw = dict(layers=full.layers, input_hook=full.input_hook, paths=full.paths)
    ablate = Splice(model, lm, mode="ablate", **kw)
    runs = [("spliced", full, True), ("ablated", ablate, False)]
    if per_layer:
        for l in range(L):
            runs.append((("spliced", l), Splice(spliced_model, lm, targets=[l], **kw), True))
            runs.append((("ablated", l), Splice(model, lm, targets=[l], mode="ablate", **kw), False))
    sums = {name: _Sums() for name, _, _ in runs}
    clean_ce = 0.0
    flags = [(m, m.training) for mod in (lm, model, spliced_model) for m in mod.modules()]
    device = next(lm.parameters()).device
    N, T = input_ids.shape
    batches = range(0, N, batch_size)
    if progress:
        try:
            from tqdm import tqdm
            batches = tqdm(batches, unit="batch", desc="evaluate")
        except ImportError:
            pass
    try:
        lm.eval()
        for i in batches:
            ids = input_ids[i:i + batch_size].to(device=device, dtype=torch.long)
            targets = ids[:, 1:]
            lp_clean = _logits(lm, ids).log_softmax(-1)
            clean_ce += float(F.nll_loss(lp_clean[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum"))
            for name, sp, agree in runs:
                with sp:
                    lp = _logits(lm, ids).log_softmax(-1)
                sums[name].add(lp_clean, lp, targets, agree)
                del lp
    finally:
        for sp in (r[1] for r in runs):
            sp.remove()
        for m, was in flags:
            m.training = was
    n_all, n_ce = N * T, N * (T - 1)
    stats = full.stats()
    ce_clean = clean_ce / n_ce

    def entry(spliced: _Sums, ablated: _Sums) -> dict:
        ce_s, ce_a = spliced.ce / n_ce, ablated.ce / n_ce
        return {"kl": spliced.kl / n_all, "ce_spliced": ce_s, "ce_ablated": ce_a,
                "ce_recovered": _recovered(ce_a, ce_s, ce_clean), "top1_agreement": spliced.top1 / n_all}

    out = entry(sums["spliced"], sums["ablated"])
    out = {"kl": out["kl"], "ce_clean": ce_clean, **{k: v for k, v in out.items() if k != "kl"}}
    out["fvu"] = sum(stats["fvu"]) / L
    out["l0"] = sum(stats["l0"]) / L
    out["per_layer"] = []
    for l in range(L):
        e = {"layer": l, "lm_layer": full.layers[l]}
        if per_layer:
            e.update(entry(sums[("spliced", l)], sums[("ablated", l)]))
        e.update(fvu=stats["fvu"][l], l0=stats["l0"][l])
        out["per_layer"].append(e)
    out.update(n_sequences=N, n_tokens=n_all, lm_layers=list(full.layers), input_hook=full.input_hook,
               dictionary=type(model).__name__)
    return out


# ---------------------------------------------------------------------- reporting
def format_table(m: dict) -> str:
    """The result of ``evaluate_replacement`` as a text table."""
    cols = [("kl", "KL", "{:.4f}"), ("ce_spliced", "CE spliced", "{:.4f}"), ("ce_ablated", "CE ablated", "{:.4f}"),
            ("ce_recovered", "CE recovered", "{:.3f}"), ("top1_agreement", "top-1", "{:.3f}"),
            ("fvu", "FVU", "{:.4f}"), ("l0", "L0", "{:.1f}")]
    head = f"{'':<18}" + "".join(f"{title:>13}" for _, title, _ in cols)

    def row(label: str, e: dict) -> str:
        cells = []
        for key, _, fmt in cols:
            v = e.get(key)
            cells.append(f"{fmt.format(v) if isinstance(v, (int, float)) else '-':>13}")
        return f"{label:<18}" + "".join(cells)

    lines = [f"{m['dictionary']}: {len(m['lm_layers'])} layer(s) at LM blocks {m['lm_layers']}, input hook "
             f"{m['input_hook']}; {m['n_sequences']} sequences, {m['n_tokens']} tokens; clean CE {m['ce_clean']:.4f}",
             head, row("all layers", m)]
    for e in m["per_layer"]:
        lines.append(row(f"layer {e['layer']} (block {e['lm_layer']})", e))
    return "\n".join(lines)


def plot_per_layer(m: dict, path) -> bool:
    """A PNG of the per-layer KL, CE recovered and FVU (False when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    per = m["per_layer"]
    labels = [str(e["lm_layer"]) for e in per]
    panels = [("kl", f"KL per layer (all: {m['kl']:.4f})"),
              ("ce_recovered", f"CE recovered per layer (all: {m['ce_recovered']:.3f})"),
              ("fvu", f"FVU per layer (mean: {m['fvu']:.4f})")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.5))
    for ax, (key, title) in zip(axes, panels):
        ax.bar(labels, [e.get(key) if e.get(key) is not None else float("nan") for e in per])
        ax.set(title=title, xlabel="LM block")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def load_dictionary(path, device="cpu"):
    """A CrossLayerTranscoder, SparseAutoencoder or MOLT folder written by save_pretrained (by its model_type)."""
    from fastclt.checkpoint import read_json
    from fastclt.models import MODEL_CLASSES as classes
    meta = read_json(Path(path) / "config.json", "model config.json")
    cls = classes.get(meta.get("model_type") if isinstance(meta, dict) else None)
    if cls is None:
        raise ValueError(f"model: {path}/config.json has model_type {meta.get('model_type')!r}; expected one of "
                         f"{sorted(classes)}")
    return cls.from_pretrained(path, device=device)


# ---------------------------------------------------------------------- command line
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastclt.eval", description="Splice a trained dictionary into its "
                                "language model and report KL, CE recovered, FVU and L0 (all layers and per layer).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="dictionary folder (save_pretrained, e.g. runs/x/model)")
    p.add_argument("--lm", default=None, help="local Hugging Face LM folder (default: the one recorded in the "
                   "dictionary's config)")
    p.add_argument("--tokens", required=True, help="'random', a text file, a dataset file/folder (.jsonl, .parquet, "
                   ".arrow, save_to_disk; needs datasets) or a .npy of token ids")
    p.add_argument("--n_seqs", type=int, default=64, help="sequences evaluated")
    p.add_argument("--first_seq", type=int, default=0, help="index of the first sequence of the token source")
    p.add_argument("--ctx_len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--prepend_bos", action="store_true", help="start every sequence with the LM's BOS token")
    p.add_argument("--text_field", default="text", help="dataset column holding the text")
    p.add_argument("--seed", type=int, default=0, help="seed of --tokens random")
    p.add_argument("--layers", default=None, help="comma-separated LM block of each dictionary layer (default: "
                   "recorded in the dictionary's config)")
    p.add_argument("--input_hook", default=None, choices=("mlp_in", "resid_mid"), help="default: recorded")
    p.add_argument("--mlp_path", default=None, help="module path of the MLP with {i} for the block "
                   "(architectures outside GPT-2/Llama/Qwen2/Mistral/Gemma-2/GPT-NeoX)")
    p.add_argument("--norm_path", default=None, help="module path of the pre-MLP norm with {i} (resid_mid)")
    p.add_argument("--post_norm_path", default=None, help="module path of a post-MLP norm with {i}, if any")
    p.add_argument("--topk_as_jumprelu", action="store_true", help="splice a TopK dictionary through its learned "
                   "JumpReLU thresholds instead of per-token TopK")
    p.add_argument("--no_per_layer", action="store_true", help="skip the 2·L single-layer passes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--lm_dtype", default="float32", choices=("float32", "bfloat16", "float64"))
    p.add_argument("--json", default="eval.json", help="where to write the results")
    p.add_argument("--plot", default="eval.png", help="per-layer PNG ('' for none)")
    a = p.parse_args(argv)
    from fastclt.lm import HookPaths, load_lm
    from fastclt.tokens import TokenSource, bos_token_id
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_dictionary(a.model, device=device)
        lm_path = a.lm or model.cfg.lm_name
        if lm_path is None:
            raise ValueError("--lm: the dictionary records no LM (lm_name); give the LM folder")
        lm = load_lm(lm_path, device, a.lm_dtype)
        paths = None
        if a.mlp_path is not None:
            paths = HookPaths(a.mlp_path, a.norm_path, a.post_norm_path)
        layers = None if a.layers is None else [int(v) for v in a.layers.split(",") if v.strip()]
        tok = None
        if a.tokens != "random" and not a.tokens.endswith(".npy"):
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(lm_path, local_files_only=True)
        src = TokenSource(a.tokens, a.ctx_len, vocab_size=lm.config.vocab_size, tokenizer=tok, seed=a.seed,
                          prepend_bos=a.prepend_bos, bos_id=bos_token_id(lm.config, tok), text_field=a.text_field)
        ids = src.sequences(a.first_seq, a.n_seqs)
        m = evaluate_replacement(model, lm, ids, layers, a.input_hook, a.batch_size, per_layer=not a.no_per_layer,
                                 paths=paths, topk_as_jumprelu=a.topk_as_jumprelu, progress=True)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m.update(model=str(a.model), lm=str(lm_path), tokens=a.tokens, ctx_len=a.ctx_len, first_seq=a.first_seq)
    print(format_table(m))
    from fastclt.checkpoint import write_json
    write_json(a.json, m)
    print(f"results: {a.json}", end="")
    if a.plot:
        if plot_per_layer(m, a.plot):
            print(f"  plot: {a.plot}", end="")
        else:
            print("  (no plot: matplotlib is not installed)", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
