"""SparseCodes (fastclt/codes.py): the CSR round trip through a dense tensor, and bad input."""
import pytest
import torch

from fastclt.codes import SparseCodes


def randn(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def test_codes_roundtrip_dense(gen):
    a = torch.relu(randn(gen, 7, 13))
    a[3] = 0  # a row with no active feature
    codes = SparseCodes.from_dense(a)
    assert codes.row_ptr.dtype == torch.int64 and codes.index.dtype == torch.int32
    assert codes.row_ptr[3] == codes.row_ptr[4]
    assert torch.equal(codes.to_dense(13), a)
    assert codes.row_ids().tolist() == sorted(codes.row_ids().tolist())
    assert float(codes.l0()) == pytest.approx(float((a > 0).sum()) / 7)


def test_codes_validation():
    with pytest.raises(TypeError, match="row_ptr"):
        SparseCodes(torch.zeros(3, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0))
    with pytest.raises(TypeError, match="index"):
        SparseCodes(torch.zeros(3, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    with pytest.raises(ValueError, match="same length"):
        SparseCodes(torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int32), torch.zeros(1))
    with pytest.raises(ValueError, match="n_features"):
        SparseCodes(torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int32), torch.zeros(0)).to_dense()


def test_join_row_ptrs_puts_blocks_one_after_another():
    """Two CSR blocks (one with an empty row, one with no entry at all, one of a single row) joined:
    the row pointer of their rows in order, each block's entries after the previous blocks'."""
    a = torch.tensor([0, 2, 2, 5])
    b = torch.tensor([0, 0, 0])
    c = torch.tensor([0, 4])
    got = SparseCodes.join_row_ptrs([a, b, c], [5, 0, 4])
    assert torch.equal(got, torch.tensor([0, 2, 2, 5, 5, 5, 9]))
    assert torch.equal(SparseCodes.join_row_ptrs([a], [5]), a)
