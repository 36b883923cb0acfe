"""Helpers of the interoperability tests: random fastclt transcoders with every parameter moved off
its initial value, and circuit-tracer's own folder loader."""
import torch

import fastclt


def random_transcoder(gen, L=3, d=8, F=24, activation="jumprelu", tying="none", cross_layer=True, skip=False,
                      affine=False, normalization="none", dtype="float64", n=64, **kw):
    """(model, x [n, L, d]) with random weights, biases, thresholds in (0.1, 0.8), feature scales in
    (0.5, 1.5) and zero offsets, and (with ``normalization``) statistics fitted on skewed data."""
    kw.setdefault("init_fire_rate", None)  # b_enc from the random draw below, not the training start
    cfg = fastclt.CLTConfig(n_layers=L, d_in=d, d_out=d, n_features=F, activation=activation, k=4,
                            decoder_tying=tying, feature_affine=affine, skip_connection=skip, cross_layer=cross_layer,
                            normalization=normalization, dtype=dtype, **kw)
    model = fastclt.CrossLayerTranscoder(cfg)
    dt = model.param_dtype
    x = (torch.randn(n, L, d, generator=gen) * 1.5 + 0.5).to(dt)
    y = (torch.randn(n, L, d, generator=gen) * 3 - 1).to(dt)
    model.initialize_from_data(x, y)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("threshold", "log_threshold", "feature_offset", "feature_scale"):
                continue
            p.add_(torch.randn(p.shape, generator=gen).to(dt) * 0.3)
        if activation == "jumprelu":
            model.threshold.copy_(torch.rand(model.threshold.shape, generator=gen).to(dt) * 0.7 + 0.1)
        if affine:
            model.feature_scale.copy_(torch.rand(L, F, generator=gen).to(dt) + 0.5)
    return model, x


def circuit_tracer_load(folder, dtype=torch.float64):
    """circuit-tracer's loader of a transcoder folder on disk (``load_transcoders_from_cache``: reads
    config.yaml, finds the layer files) → (transcoder module, config dict)."""
    import huggingface_hub.constants as hub_constants
    if not hasattr(hub_constants, "HF_HUB_ENABLE_HF_TRANSFER"):
        # circuit-tracer 0.5 imports this constant, which huggingface_hub 1.x removed; the folder
        # loader never uses it
        hub_constants.HF_HUB_ENABLE_HF_TRANSFER = False
    from circuit_tracer.utils.caching import load_transcoders_from_cache
    return load_transcoders_from_cache(folder.name, cache_dir=folder.parent, device=torch.device("cpu"), dtype=dtype,
                                       lazy_decoder=False)
