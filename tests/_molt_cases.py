"""Shared inputs of the MOLT tests (tests/ops/test_molt.py, tests/test_molt_models.py): rank groups with an
empty group and a rank-1 group, gate codes with random row lengths, an empty row and an unused
transform (or one hot transform), and the dense float64 definition — every A_i = U_i V_i formed
explicitly, ŷ_b = Σ_i g_bi A_i x_b + b."""
import torch

from fastclt.codes import SparseCodes
from fastclt.ops import rank_ptr

GROUPS = ((2, 7), (0, 5), (3, 4), (4, 1))  # an empty group; T = 9 transforms, R = 30 rank rows
NAMES = ("y", "d_gate", "dx", "dU", "dV", "db")


def dense_A(U, V, groups):
    """[T, d_out, d_in]: every A_i = U_i V_i built explicitly (U rows are U_iᵀ's rows)."""
    ptr = rank_ptr(groups, torch.device("cpu")).tolist()
    return torch.stack([U[ptr[i]:ptr[i + 1]].T @ V[ptr[i]:ptr[i + 1]] for i in range(len(ptr) - 1)])


def gate_codes(B, T, gen, kind="csr"):
    """Gate codes: random row lengths (row 1 empty), one transform unused; 'hot': every row on one."""
    if kind == "hot":
        idx = torch.full((B, 1), 3, dtype=torch.int32)
        return SparseCodes.from_topk(idx, torch.rand(B, 1, generator=gen) + 0.2, T)
    cols = []
    lengths = torch.randint(1, 5, (B,), generator=gen)
    lengths[1] = 0
    for b in range(B):
        cols.append(torch.randperm(T - 1, generator=gen)[: int(lengths[b])].sort().values)  # transform T-1 unused
    row_ptr = torch.zeros(B + 1, dtype=torch.int64)
    row_ptr[1:] = lengths.cumsum(0)
    index = torch.cat(cols).to(torch.int32)
    return SparseCodes(row_ptr, index, torch.randn(index.shape[0], generator=gen), T)


def molt_inputs(gen, B=11, d_in=13, d_out=9, kind="csr"):
    """(codes, x, U, V, b) of GROUPS, fresh random values."""
    T = sum(n for n, _ in GROUPS)
    R = sum(n * r for n, r in GROUPS)
    codes = gate_codes(B, T, gen, kind)
    x = torch.randn(B, d_in, generator=gen)
    U = torch.randn(R, d_out, generator=gen) / 3
    V = torch.randn(R, d_in, generator=gen) / 3
    b = torch.randn(d_out, generator=gen)
    return codes, x, U, V, b


def run_molt(fn, codes, x, U, V, b, up, dtype=torch.float32, device=torch.device("cpu")):
    """y and the gradients of (value, x, U, V, b) under the upstream gradient ``up``."""
    leaves = [t.detach().to(device, dtype).clone().requires_grad_(True) for t in (codes.value, x, U, V, b)]
    c = SparseCodes(codes.row_ptr.to(device), codes.index.to(device), leaves[0], codes.n_features)
    y = fn(c, *leaves[1:4], GROUPS, leaves[4])
    (y.double() * up.to(device)).sum().backward()
    return [y.detach().cpu()] + [t.grad.cpu() for t in leaves]


def dense_molt(codes, x, U, V, b, up):
    """ŷ_b = Σ_i g_bi A_i x_b + b, every A_i explicit, float64; gradients by autograd."""
    leaves = [t.detach().double().clone().requires_grad_(True) for t in (codes.value, x, U, V, b)]
    g = SparseCodes(codes.row_ptr, codes.index, leaves[0], codes.n_features).to_dense()
    A = dense_A(leaves[2], leaves[3], GROUPS)
    y = torch.einsum("bt,toi,bi->bo", g, A, leaves[1]) + leaves[4]
    (y * up).sum().backward()
    return [y.detach()] + [t.grad for t in leaves]
