"""Shared inputs of the Matryoshka tests (tests/ops/test_matryoshka.py, tests/test_matryoshka_models.py):
prefix ends with odd block sizes, random CSR codes, and every prefix reconstruction of a CLT in
float64 from its definition."""
import torch

from fastclt.codes import SparseCodes

PREFIXES = [3, 8, 13, 20]  # odd block sizes 3, 5, 5, 7 over F = 20


def to_device(codes: SparseCodes, device, value=None) -> SparseCodes:
    return SparseCodes(codes.row_ptr.to(device), codes.index.to(device),
                       (codes.value if value is None else value).to(device), codes.n_features)


def random_codes(B, F, gen):
    """Random CSR codes: 0–5 entries per row (row 2 empty), ascending indices, values > 0."""
    lengths = torch.randint(0, 6, (B,), generator=gen)
    lengths[2] = 0
    cols = [torch.randperm(F, generator=gen)[: int(n)].sort().values for n in lengths]
    row_ptr = torch.zeros(B + 1, dtype=torch.int64)
    row_ptr[1:] = lengths.cumsum(0)
    index = torch.cat(cols).to(torch.int32)
    return SparseCodes(row_ptr, index, torch.rand(index.shape[0], generator=gen) + 0.1, F)


def dense_prefixes(a_list, W, tying, b, off, sc):
    """[G, B, L, d] in float64 from dense codes a_list (L × [B, F]): prefix g keeps features < m_g."""
    L = len(a_list)
    outs = []
    for m in PREFIXES:
        ys = []
        for t in range(L):
            y = b[t].clone() if b is not None else 0
            for s in range(t + 1):
                a = a_list[s][:, :m]
                if off is not None:
                    a = (a + off[t, :m] * (a > 0)) * sc[t, :m]
                if tying == "none":
                    Wst = W[s][:m, t - s]
                elif tying == "per_source":
                    Wst = W[s][:m]
                else:
                    Wst = W[t][:m]
                y = y + a @ Wst
            ys.append(y)
        outs.append(torch.stack(ys, 1))
    return torch.stack(outs)
