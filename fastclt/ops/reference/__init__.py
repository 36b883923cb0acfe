"""The pure-PyTorch reference of every op (impl "reference"): the test oracle of the kernels and
the eager baseline of every benchmark. One file per op family, the same file names as the
kernels' folders (``fastclt/ops/triton/``, ``fastclt/ops/ext/``); the op table is in
``fastclt/ops/_registry.py`` and docs/DESIGN.md §11.

    activation.py   relu, jumprelu (+ jumprelu_dense, jumprelu_step, band_mask)
    select.py       topk, batch_topk, batch_topk_layers (and their sharded form)
    encode.py       encode, encode_layers (+ preacts, preacts_layers)
    auxk.py         auxk_select
    decode.py       sparse_decode
    clt_decode.py   clt_decode (+ feature_affine, clt_decode_with)
    molt.py         molt_decode (+ molt_norms, rank_ptr)
    matryoshka.py   prefix_errors
    losses.py       mse, fvu, sparsity_loss, preact_loss, auxk_loss (reference only: no kernels)
    stats.py        code_stats (a batch's training statistics: fired features, L0, cut values)
"""
