"""The dense formulation of the ops that have one (impl "dense"; docs/DESIGN.md §17): the codes
scattered into a dense [B, F] tensor, then GEMMs — faster than gathers above a crossover density,
and what ``impl="auto"`` takes there (``fastclt.ops.density``). Pure PyTorch, any device and float
dtype; file names as in ``reference/``.

    _common.py      dense_codes: SparseCodes → [B, F], differentiable in the values (DenseCodes: as held)
    decode.py       sparse_decode
    clt_decode.py   clt_decode
    encode.py       encode(..., form="dense"): ReLU / JumpReLU codes held dense (DenseCodes)
"""
