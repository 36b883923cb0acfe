"""The replacement model: a dictionary spliced into a transformers causal LM.

    with splice(clt, lm) as sp:          # hooks on, for as long as the block runs
        logits = lm(input_ids).logits    # the spliced forward pass
    sp.stats()                           # FVU / L0 per layer (when record_stats=True)

Dictionary layer l sits at LM block ``layers[l]`` (default: the ``lm_layers`` recorded in the
dictionary's config, else 0 … L − 1) and reads x_l at ``input_hook`` (default: the recorded one):
"mlp_in", the MLP module's input, or "resid_mid", the pre-MLP norm's input (``fastclt.lm``).

Cross-layer transcoder (a per-layer transcoder set and a PLT are special cases): the output of
MLP ``layers[t]`` becomes, for every spliced target t,

    ŷ_t = denorm_t( b_dec[t] + Σ_{s ≤ t} D^{s→t}(a_s) + W_skip[t] x̃_t ),   a_s = act(W_enc[s] x̃_s + b_enc[s])

with x̃ the dictionary's normalisation of x — exactly ``model(x)[:, t]`` — where x_s is the hooked
input of layer s **in this same forward pass**: once an earlier MLP is replaced, every later x_s
already carries its error. Each source is encoded when its input hook fires and decoded at once into
the spliced targets through ``fastclt.ops.sparse_decode`` (one decode per source, or one per (source,
target) pair for per-target tying and the feature affine — the decodes of ``ops.clt_decode``).

MOLT: spliced like a transcoder set — the output of MLP ``layers[l]`` becomes
ŷ_l = denorm_l(b_dec[l] + Σ_i g_{l,i} U_{l,i} V_{l,i} x̃_l) with the gates and the transforms read
from x_l of the same forward pass (``fastclt.ops.molt_decode``), exactly ``model(x)[:, l]``.

Sparse autoencoder: the hooked activation x itself is replaced by x̂ = model(x). For "mlp_in" the
MLP reads x̂; for "resid_mid" the residual stream becomes x̂ (the norm reads x̂, and x̂ − x is added to
the MLP branch's output — after the post-MLP norm where the block has one — so that the block's
residual sum starts from x̂).

``mode="ablate"``: the same places set to zero instead (transcoders: the spliced MLPs' outputs; an
SAE: its hooked activation). ``mode="add"`` (transcoders): ŷ_t is added to the MLP's own output
instead of replacing it, mlp'(x) = mlp(x) + ŷ_t — a transcoder adapter (``fastclt.adapters``).
``targets``: the dictionary layers whose output is replaced (default all; a CLT still encodes every
source s ≤ max(targets)).

Activation rules at splice time: per-token rules as trained (ReLU, JumpReLU, TopK); BatchTopK — and
TopK with ``topk_as_jumprelu`` — through ``model.to_jumprelu()`` (its learned thresholds), so that a
token's codes never depend on the rest of the batch. ``as_trained=True`` keeps the rule the
dictionary trains with instead (BatchTopK then selects over the tokens of each forward pass): the
splice of training through the LM (``fastclt.training.e2e``). Hooks work under ``torch.no_grad`` and
with autograd (gradients reach both the LM and the dictionary). ``Splice`` never modifies either model.

``collect=True``: every forward pass keeps, per spliced layer l, what a training loss needs in
``collected[l]``: "xn" (the normalised input x̃_l [N, d_in]), "codes" (its SparseCodes), "preacts"
(the dense pre-activations [N, F], with ``need_preacts``), "yn" (the LM's own MLP output — for an
SAE the hooked activation — normalised like the dictionary's targets, detached) and "y_hat" (ŷ_l
in the normalised space, before the denormalisation), and "out" (what the module returned).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from fastclt import ops
from fastclt.config import INPUT_HOOKS
from fastclt.lm import HookPaths, find_paths, hidden_size, resolve_sites
from fastclt.models import MOLT, CrossLayerTranscoder, SparseAutoencoder, SparseDictionary

__all__ = ["Splice", "splice", "resolve_layers", "MODES"]

MODES = ("replace", "ablate", "add")


def resolve_layers(model: SparseDictionary, layers=None, input_hook=None) -> tuple[list, str]:
    """(LM block of each dictionary layer, input hook): the arguments when given, else the ones the
    dictionary recorded at training (``cfg.lm_layers`` / ``cfg.input_hook``), else 0 … L − 1.
    Arguments that contradict a recorded value are an error."""
    cfg = model.cfg
    L = model.n_layers
    if input_hook is None:
        input_hook = cfg.input_hook
    if not isinstance(input_hook, str) or input_hook not in INPUT_HOOKS:
        raise ValueError(f"input_hook: expected one of {INPUT_HOOKS}, got {input_hook!r}")
    if input_hook != cfg.input_hook:
        raise ValueError(f"input_hook: the dictionary was trained on {cfg.input_hook!r} (its config's input_hook), "
                         f"got {input_hook!r}")
    if layers is None:
        layers = list(cfg.lm_layers) if cfg.lm_layers is not None else list(range(L))
    if isinstance(layers, range):
        layers = list(layers)
    if not isinstance(layers, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in layers):
        raise TypeError(f"layers: expected a list of {L} ints (the LM block of each dictionary layer), got {layers!r}")
    layers = list(layers)
    if len(layers) != L:
        raise ValueError(f"layers: expected {L} LM block indices (one per dictionary layer), got {len(layers)}")
    if layers[0] < 0 or any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"layers: expected strictly increasing block indices >= 0, got {layers}")
    if cfg.lm_layers is not None and layers != list(cfg.lm_layers):
        raise ValueError(f"layers: the dictionary was trained on LM blocks {cfg.lm_layers} (its config's lm_layers), "
                         f"got {layers}; pass layers=None")
    return layers, input_hook


def _first_tensor(args: tuple, kwargs: dict):
    """(the hooked tensor, where: ("arg", 0) or ("kw", name)) of a module call."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], ("arg", 0)
    for key in ("hidden_states", "x", "input"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key], ("kw", key)
    raise RuntimeError("splice: the hooked module was called without a tensor input")


def _with_input(args: tuple, kwargs: dict, where, value):
    if where[0] == "arg":
        return (value,) + tuple(args[1:]), kwargs
    return args, {**kwargs, where[1]: value}


def _main_output(output):
    return output[0] if isinstance(output, tuple) else output


def _with_output(output, value):
    return (value,) + tuple(output[1:]) if isinstance(output, tuple) else value


class _Layerwise:
    """A CLT one layer at a time: encode source s, decode it into targets, finish target t. The
    parameter views are taken once per forward pass (per-layer views by unbind, so that a backward
    through them stacks the per-layer gradients once)."""

    def __init__(self, model: CrossLayerTranscoder) -> None:
        self.model = model
        self.views = None

    def begin(self) -> None:
        m, cfg = self.model, self.model.cfg
        cdt = m._compute_dtype()
        W_enc, b_enc, theta = m._enc_layers()
        v = {"cdt": cdt, "W_enc": W_enc.to(cdt).unbind(0), "b_enc": b_enc.to(cdt).unbind(0),
             "theta": None if theta is None else theta.to(cdt).unbind(0), "b_dec": m.b_dec.unbind(0)}
        if m._per_pair_decoders():
            v["W_dec"] = [W.to(cdt) for W in m.W_dec]
        else:
            v["W_dec"] = m.W_dec.to(cdt).unbind(0)
        if cfg.feature_affine:
            v["off"], v["scale"] = m.feature_offset.unbind(0), m.feature_scale.unbind(0)
        if cfg.skip_connection:
            v["W_skip"] = m.W_skip.to(cdt).unbind(0)
        self.views = v

    def end(self) -> None:
        self.views = None

    def normalize(self, s: int, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = x.to(m.param_dtype)
        if m.cfg.normalization != "none":
            x = (x - m.input_mean[s]) / m.input_scale[s]
        return x

    def encode(self, s: int, xn: torch.Tensor, need_preacts: bool = False):
        """SparseCodes of source s (and its dense pre-activations [B, F] when ``need_preacts``)."""
        cfg, v = self.model.cfg, self.views
        return ops.encode(xn.to(v["cdt"]), v["W_enc"][s], v["b_enc"][s], activation=cfg.activation, k=cfg.k,
                          threshold=None if v["theta"] is None else v["theta"][s], bandwidth=cfg.jumprelu_bandwidth,
                          return_preacts=need_preacts, impl=self.model.impl)

    def normalize_out(self, t: int, y: torch.Tensor) -> torch.Tensor:
        """A target in the dictionary's normalised output space (the space of ``output_n``)."""
        m = self.model
        y = y.to(m.param_dtype)
        if m.cfg.normalization != "none":
            y = (y - m.output_mean[t]) / m.output_scale[t]
        return y

    def output(self, t: int, acc: torch.Tensor, xn_t: torch.Tensor) -> torch.Tensor:
        """ŷ_t in the data space from the summed contributions (b_dec, skip, denormalisation)."""
        return self.denormalize(t, self.output_n(t, acc, xn_t))

    def denormalize(self, t: int, y: torch.Tensor) -> torch.Tensor:
        m = self.model
        if m.cfg.normalization != "none":
            y = y * m.output_scale[t].to(y.dtype) + m.output_mean[t].to(y.dtype)
        return y

    def contributions(self, s: int, codes, targets: Sequence[int], xn: Optional[torch.Tensor] = None) -> dict:
        """{t: D^{s→t}(a_s) [B, d_out]} for the targets t ≥ s (normalised space, no b_dec)."""
        m, cfg, v = self.model, self.model.cfg, self.views
        ts = [t for t in targets if t >= s]
        impl = m.impl
        if not ts:
            return {}
        if not cfg.cross_layer:
            return {s: ops.sparse_decode(codes, v["W_dec"][s], impl=impl)} if s in ts else {}
        if cfg.decoder_tying == "none":
            block = ops.sparse_decode(codes, v["W_dec"][s], impl=impl)  # [B, L − s, d]
            return {t: block[:, t - s] for t in ts}
        if cfg.decoder_tying == "per_source" and not cfg.feature_affine:
            y = ops.sparse_decode(codes, v["W_dec"][s], impl=impl)
            return {t: y for t in ts}
        out = {}
        for t in ts:
            c = codes
            if cfg.feature_affine:
                c = ops.feature_affine(codes, v["off"][t], v["scale"][t])
            out[t] = ops.sparse_decode(c, v["W_dec"][s] if cfg.decoder_tying == "per_source" else v["W_dec"][t],
                                       impl=impl)
        return out

    def output_n(self, t: int, acc: torch.Tensor, xn_t: torch.Tensor) -> torch.Tensor:
        """ŷ_t in the normalised space from the summed contributions (+ b_dec, + skip)."""
        m, v = self.model, self.views
        y = acc + v["b_dec"][t].to(acc.dtype)
        if m.cfg.skip_connection:
            y = y + (xn_t.to(v["cdt"]) @ v["W_skip"][t].T).to(acc.dtype)
        return y


class _MOLTLayerwise(_Layerwise):
    """A MOLT one layer at a time: the gates of layer s from x_s, then ŷ_s = Σ_i g_i U_i V_i x̃_s
    (+ b_dec, denormalised) into its own MLP output — a transcoder whose decoder reads x_s."""

    def begin(self) -> None:
        m = self.model
        cdt = m._compute_dtype()
        W_enc, b_enc, theta = m._enc_layers()
        self.views = {"cdt": cdt, "W_enc": W_enc.to(cdt).unbind(0), "b_enc": b_enc.to(cdt).unbind(0),
                      "theta": None if theta is None else theta.to(cdt).unbind(0),
                      "U": m.U.to(cdt).unbind(0), "V": m.V.to(cdt).unbind(0),
                      "b_dec": m.b_dec.unbind(0) if m.cfg.output_bias else None}

    def contributions(self, s: int, codes, targets: Sequence[int], xn: Optional[torch.Tensor] = None) -> dict:
        if s not in targets:
            return {}
        v, m = self.views, self.model
        return {s: ops.molt_decode(codes, xn.to(v["cdt"]), v["U"][s], v["V"][s], m.rank_groups, impl=m.impl)}

    def output_n(self, t: int, acc: torch.Tensor, xn_t: torch.Tensor) -> torch.Tensor:
        v = self.views
        return acc if v["b_dec"] is None else acc + v["b_dec"][t].to(acc.dtype)


class Splice:
    """A dictionary spliced into ``lm`` (see the module docstring). ``attach()`` / ``remove()`` the
    hooks, or use it as a context manager. Every argument is checked here, before any forward pass.

    model: CrossLayerTranscoder, SparseAutoencoder or MOLT on the LM's device. layers / input_hook: see
    ``resolve_layers``. targets: dictionary layers to replace (default all). mode: "replace" |
    "ablate". paths: ``fastclt.lm.HookPaths`` (or a dict) for an architecture outside the known
    families. topk_as_jumprelu: splice a TopK dictionary through its learned JumpReLU thresholds
    instead of per-token TopK. record_stats: accumulate FVU / L0 per layer over the forward passes
    (``stats()``; ``reset_stats()``). as_trained / collect / need_preacts: see the module docstring.
    """

    def __init__(self, model: SparseDictionary, lm: nn.Module, layers=None, input_hook: Optional[str] = None, *,
                 targets: Optional[Sequence[int]] = None, mode: str = "replace", paths=None,
                 topk_as_jumprelu: bool = False, record_stats: bool = False, as_trained: bool = False,
                 collect: bool = False, need_preacts: bool = False) -> None:
        if not isinstance(model, (CrossLayerTranscoder, SparseAutoencoder, MOLT)):
            raise TypeError(f"model: expected a CrossLayerTranscoder, SparseAutoencoder or MOLT, got "
                            f"{type(model).__name__}")
        if not isinstance(lm, nn.Module):
            raise TypeError(f"lm: expected a torch.nn.Module (a transformers causal LM), got {type(lm).__name__}")
        if model.tp is not None:
            raise ValueError("model: a tensor-parallel shard cannot be spliced; merge the shards first")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if mode == "add" and isinstance(model, SparseAutoencoder):
            raise ValueError("mode: 'add' adds a transcoder's output to the MLP's; an SAE has no such output")
        if as_trained and getattr(model.cfg, "batchtopk_across_layers", False):
            raise ValueError("model: a CLT with batchtopk_across_layers selects over all layers at once, but a "
                             "splice encodes each layer when the LM reaches it; it cannot run as trained")
        self.layers, self.input_hook = resolve_layers(model, layers, input_hook)
        L = model.n_layers
        if targets is None:
            targets = list(range(L))
        if (not isinstance(targets, (list, tuple, range)) or not targets
                or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < L for t in targets)):
            raise ValueError(f"targets: expected a non-empty list of dictionary layers in [0, {L}), got {targets!r}")
        self.targets = sorted(set(targets))
        self.paths = find_paths(lm) if paths is None else HookPaths.coerce(paths)
        self.sae = isinstance(model, SparseAutoencoder)
        self.sites = resolve_sites(lm, self.layers, self.paths, need_norm=self.input_hook == "resid_mid")
        width = hidden_size(lm)
        if width is not None:
            for name, w in (("d_in", model.d_in), ("d_out", model.d_out)):
                if w != width:
                    raise ValueError(f"model.{name}: the dictionary's width {w} does not match the LM's hidden size "
                                     f"{width}")
        lm_device = next((p.device for p in lm.parameters()), None)
        if lm_device is not None and lm_device != model.device:
            raise ValueError(f"model: is on {model.device} but the LM is on {lm_device}; move one of them")
        self.lm, self.mode, self.record = lm, mode, bool(record_stats)
        self.collect, self.need_preacts = bool(collect), bool(need_preacts)
        self.collected: dict = {}
        self.source_model = model
        self.model = model if mode == "ablate" or as_trained else _inference_model(model, topk_as_jumprelu)
        self.layerwise = None if self.sae else (_MOLTLayerwise if isinstance(model, MOLT) else _Layerwise)(self.model)
        self.handles: list = []
        self._state: dict = {}
        self.reset_stats()

    # ------------------------------------------------------------------ hooks
    def attach(self) -> "Splice":
        if self.handles:
            raise RuntimeError("splice: already attached")
        try:
            self.handles.append(self.lm.register_forward_pre_hook(self._begin))
            self.handles.append(self.lm.register_forward_hook(self._end))
            if self.sae:
                self._attach_sae()
            else:
                self._attach_transcoder()
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self._end()

    def __enter__(self) -> "Splice":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _begin(self, *unused) -> None:
        self._state = {"acc": {}, "xn": {}, "seen": set()}
        self.collected = {}
        if self.layerwise is not None and self.mode != "ablate":
            self.layerwise.begin()

    def _end(self, *unused) -> None:
        self._state = {}
        if self.layerwise is not None:
            self.layerwise.end()

    def _attach_transcoder(self) -> None:
        last = max(self.targets)
        for l, site in enumerate(self.sites):
            if self.mode != "ablate" and l <= last:
                module = site.norm if self.input_hook == "resid_mid" else site.mlp
                self.handles.append(module.register_forward_pre_hook(self._source_hook(l), with_kwargs=True))
            if l in self.targets:
                self.handles.append(site.mlp.register_forward_hook(self._target_hook(l)))

    def _source_hook(self, s: int):
        def hook(module, args, kwargs):
            st = self._state
            if not st:
                raise RuntimeError("splice: a hooked block ran outside a forward pass of the LM it was attached to")
            x, _ = _first_tensor(args, kwargs)
            lw = self.layerwise
            xn = lw.normalize(s, x.reshape(-1, x.shape[-1]))
            if self.need_preacts:
                codes, pre = lw.encode(s, xn, True)
            else:
                codes = lw.encode(s, xn)
            st["seen"].add(s)
            st["xn"][s] = xn
            if self.collect:
                self.collected[s] = {"xn": xn, "codes": codes}
                if self.need_preacts:
                    self.collected[s]["preacts"] = pre
            if self.record:
                self._l0[s] += (codes.value.detach() > 0).sum().double()
                self._n_src[s] += xn.shape[0]
            acc_dtype = torch.float64 if xn.dtype == torch.float64 else torch.float32
            for t, part in lw.contributions(s, codes, self.targets, xn).items():
                part = part.to(acc_dtype)
                st["acc"][t] = part if t not in st["acc"] else st["acc"][t] + part
            return None
        return hook

    def _target_hook(self, t: int):
        def hook(module, args, output):
            y = _main_output(output)
            if self.mode == "ablate":
                return _with_output(output, torch.zeros_like(y))
            st = self._state
            missing = [s for s in range(t + 1) if s not in st.get("seen", ())]
            if missing:
                raise RuntimeError(f"splice: target layer {t} ran before the input hooks of source layers {missing} "
                                   f"in this forward pass")
            acc = st["acc"].get(t)
            if acc is None:  # no active feature anywhere: zero contributions
                acc = st["xn"][t].new_zeros(st["xn"][t].shape[0], y.shape[-1]).to(
                    torch.float64 if st["xn"][t].dtype == torch.float64 else torch.float32)
            lw = self.layerwise
            y_hat_n = lw.output_n(t, acc, st["xn"][t])
            y_hat = lw.denormalize(t, y_hat_n)
            if self.record:
                self._record_fvu(t, y.reshape(-1, y.shape[-1]), y_hat)
            out = y_hat.to(y.dtype).view(y.shape)
            if self.mode == "add":
                out = y + out
            if self.collect:
                c = self.collected.setdefault(t, {})
                c.update(yn=lw.normalize_out(t, y.detach().reshape(-1, y.shape[-1])), y_hat=y_hat_n, out=out)
            return _with_output(output, out)
        return hook

    def _attach_sae(self) -> None:
        site = self.sites[0]
        resid = self.input_hook == "resid_mid"
        module = site.norm if resid else site.mlp
        self.handles.append(module.register_forward_pre_hook(self._sae_hook, with_kwargs=True))
        if resid:  # the residual stream starts from x̂: add x̂ − x to what the MLP branch adds
            branch = site.post_norm if site.post_norm is not None else site.mlp
            self.handles.append(branch.register_forward_hook(self._sae_residual_hook))

    def _sae_hook(self, module, args, kwargs):
        x, where = _first_tensor(args, kwargs)
        flat = x.reshape(-1, x.shape[-1])
        if self.mode == "ablate":
            x_hat = torch.zeros_like(flat)
        else:
            m = self.model
            xl = flat.to(m.param_dtype)[:, None]  # [N, 1, d]: the layered form of the model's internals
            m._finite_rows(xl, names=("x",), allow_skip=False)
            xn = m._normalize(xl, "in")
            codes, pre = m._encode_n(xn, need_preacts=self.need_preacts)
            y_hat_n = m._decode_n(codes, xn, bias=True)
            x_hat = m._denormalize_out(y_hat_n)[:, 0]
            codes = codes[0]
            if self.collect:
                self.collected[0] = {"xn": xn[:, 0], "codes": codes, "yn": m._normalize(xl, "out")[:, 0].detach(),
                                     "y_hat": y_hat_n[:, 0], "out": x_hat}
                if self.need_preacts:
                    self.collected[0]["preacts"] = pre[0]
            if self.record:
                self._l0[0] += (codes.value.detach() > 0).sum().double()
                self._n_src[0] += flat.shape[0]
                self._record_fvu(0, flat, x_hat)
        x_hat = x_hat.to(x.dtype).view(x.shape)
        self._state["delta"] = x_hat - x
        return _with_input(args, kwargs, where, x_hat)

    def _sae_residual_hook(self, module, args, output):
        delta = self._state.pop("delta", None)
        if delta is None:
            raise RuntimeError("splice: the MLP branch ran without the SAE's hook on its input")
        y = _main_output(output)
        return _with_output(output, y + delta.to(y.dtype))

    # ------------------------------------------------------------------ statistics
    def reset_stats(self) -> None:
        L, dev = self.source_model.n_layers, self.source_model.device
        d = self.source_model.d_out
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=dev)  # noqa: E731
        self._sq, self._sum_y, self._sum_y2, self._n = z(L), z(L, d), z(L), z(L)
        self._l0, self._n_src = z(L), z(L)

    @torch.no_grad()
    def _record_fvu(self, t: int, y: torch.Tensor, y_hat: torch.Tensor) -> None:
        y, y_hat = y.detach().double(), y_hat.detach().double()
        self._sq[t] += (y - y_hat).pow(2).sum()
        self._sum_y[t] += y.sum(0)
        self._sum_y2[t] += y.pow(2).sum()
        self._n[t] += y.shape[0]

    def stats(self) -> dict:
        """{"fvu": [L], "l0": [L]} over the recorded forward passes (None where a layer was not
        spliced): FVU_t = Σ‖y_t − ŷ_t‖² / Σ‖y_t − ȳ_t‖² (y_t: the MLP output, or for an SAE the
        hooked activation, in the spliced pass); L0: mean active features per token."""
        fvu, l0 = [], []
        for l in range(self.source_model.n_layers):
            n = float(self._n[l])
            if n:
                var = float(self._sum_y2[l]) - float(self._sum_y[l].pow(2).sum()) / n
                fvu.append(float(self._sq[l]) / max(var, 1e-300))
            else:
                fvu.append(None)
            m = float(self._n_src[l])
            l0.append(float(self._l0[l]) / m if m and l in self.targets else None)
        return {"fvu": fvu, "l0": l0}


def _inference_model(model: SparseDictionary, topk_as_jumprelu: bool) -> SparseDictionary:
    """The dictionary with a per-token activation rule: BatchTopK (and TopK on request) → JumpReLU."""
    act = model.cfg.activation
    if act == "batchtopk" or (act == "topk" and topk_as_jumprelu):
        try:
            new = model.to_jumprelu()
        except ValueError as e:
            raise ValueError(f"model: a {act} dictionary is spliced with its learned JumpReLU thresholds "
                             f"(to_jumprelu), but it has none: {e}") from e
        new.impl = model.impl
        new.train(model.training)
        return new
    return model


def splice(model: SparseDictionary, lm: nn.Module, layers=None, input_hook: Optional[str] = None, **kw) -> Splice:
    """A ``Splice`` (every keyword as there), to use as ``with splice(model, lm) as sp: lm(ids)``."""
    return Splice(model, lm, layers, input_hook, **kw)
