"""Exact radix select (fastclt/ops/radix.py): the torch keys and histograms find the exact cut of
any float dtype (ties, ±0, ±Inf), equal the extension's histogram op bit for bit, and feature
shards that all-reduce their histograms find the single-device threshold of the extension."""
from __future__ import annotations

import threading

import pytest
import torch

from _select_cases import brute_batch_topk_mask, make_h
from fastclt import _ext
from fastclt.ops.ext import select as ext_select
from fastclt.ops.radix import float_keys, key_bits, key_to_float, radix_threshold
from fastclt.ops.reference.select import torch_histogram


def test_radix_threshold_torch_path_is_exact():
    """The torch histograms (any float dtype) find the exact cut: ties, ±0 (one key), ±Inf."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        h = torch.randn(3, 500).to(dtype)
        h[0, :50] = 0.25  # ties
        h[1, :10] = -0.0
        h[1, 10:20] = 0.0
        h[1, 20:] = -h[1, 20:].abs() - 1  # the cut of row 1 falls among the zeros of both signs
        h[2, :5] = float("-inf")
        h[2, 5] = float("inf")
        for bits in sorted({64 if dtype == torch.float64 else 32, key_bits(dtype)}):
            for k in (1, 7, 15, 60, 500):
                cuts = radix_threshold(torch_histogram(list(h), bits), [k] * 3, bits, 8)
                for g, c in enumerate(cuts):
                    keys = float_keys(h[g])
                    if bits == 16:  # bf16: the top 16 bits of the fp32 key decide the value
                        keys = (keys ^ torch.iinfo(torch.int32).min) >> 16 & 0xFFFF
                        key = c.key
                    else:
                        key = c.key - (1 << (bits - 1))
                    kth = torch.sort(h[g].double(), descending=True).values[k - 1]
                    assert int((keys > key).sum()) == c.n_greater and c.n_greater + c.n_take == k
                    assert c.n_equal_local == int((keys == key).sum()) >= c.n_take >= 1
                    assert bool((h[g][keys == key].double() == kth).all())
    assert torch.equal(float_keys(torch.tensor([-0.0, 0.0])), float_keys(torch.tensor([0.0, 0.0])))


@pytest.mark.skipif(not _ext.has_cpu_ext(), reason="needs the CPU kernels of fastclt._C")
def test_torch_histogram_equals_the_extension_op():
    """Both paths histogram the same keys (the extension's uint32 key, −0 folded; bf16's top 16
    bits), so ranks on different implementations count the same entries."""
    h = torch.randn(7, 300)
    h[:, :20] = 0.0
    h[:, 20:40] = -0.0
    hist = torch_histogram([h.reshape(-1)], 32)
    for prefix, bits, step in ((0, 0, 8), (0x80, 8, 8), (0x7f, 8, 8), (0x3f80, 16, 8)):
        assert torch.equal(hist([prefix], bits, step)[0], torch.ops.fastclt.batch_topk_histogram(h, prefix, bits, step))
    hb = h.bfloat16()
    hist = torch_histogram([hb.reshape(-1)], 16)
    for prefix, bits, step in ((0, 0, 8), (0xbf, 8, 8), (0x3f, 8, 8)):
        assert torch.equal(hist([prefix], bits, step)[0],
                           torch.ops.fastclt.batch_topk_histogram(hb, prefix, bits, step))


@pytest.mark.parametrize("impl,device", [pytest.param("cpu", "cpu", id="cpu-cpu"),
                                         pytest.param("cuda", "cuda", id="cuda-cuda")])
def test_batch_topk_threshold_sharded(impl, device):
    """Feature shards that all-reduce their histograms find the single-device threshold exactly.

    Two threads stand in for two tensor-parallel ranks; the all-reduce is a barrier + sum."""
    from fastclt.ops import _registry

    if not _registry.available(impl, torch.device(device)):
        pytest.skip(f"impl {impl!r} is not available on {device} here")
    h = make_h(16, 90, torch.float32, device, "ties", seed=7)
    k_total = 16 * 5
    full = ext_select.batch_topk_threshold(h, k_total)
    shards = [h[:, :40].contiguous(), h[:, 40:].contiguous()]
    slots, barrier = [None, None], threading.Barrier(2)

    def run(rank, out):
        def all_reduce(counts):
            slots[rank] = counts
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        out[rank] = ext_select.batch_topk_threshold(shards[rank], k_total, all_reduce=all_reduce)

    found = [None, None]
    threads = [threading.Thread(target=run, args=(r, found)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for t in found:
        assert (t.key, t.n_greater, t.n_take) == (full.key, full.n_greater, full.n_take)
    offset, kept = 0, []
    for shard, t in zip(shards, found):
        row_ptr, index, value = ext_select.batch_topk_compact(shard, t, equal_offset=offset)
        offset += t.n_equal_local
        kept.append(torch.zeros(shard.shape, dtype=torch.bool))
        kept[-1][torch.repeat_interleave(torch.arange(16), row_ptr.diff().cpu()), index.long().cpu()] = True
    assert int(torch.cat(kept, 1).sum()) == k_total
    # Ties go to the lower rank first, so the union is the single-device top-k up to tie order.
    full_mask = brute_batch_topk_mask(h.cpu(), k_total)
    key_value = key_to_float(full.key)
    strict = h.cpu() > key_value
    assert torch.equal(torch.cat(kept, 1) & strict, full_mask & strict)
