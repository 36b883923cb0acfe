"""The data prefetcher (fastclt/training/data.py ``Prefetcher``): the same batches in the same order
threaded or not; on a CPU run a source of computed batches (synthetic) has no producer thread, and a
producer thread computes on one intra-op thread without changing the training thread's count or the
one later threads start with; a producer's error reaches the consumer."""
import threading

import pytest
import torch

from fastclt.training.data import Prefetcher


class _Counting:
    """Batch i is (i·ones, −i·ones); records the intra-op threads of the thread that made it."""

    def __init__(self, compute_bound=False):
        self.compute_bound, self.threads, self.makers = compute_bound, [], []
        self.B = 3

    def get(self, i):
        self.threads.append(torch.get_num_threads())
        self.makers.append(threading.get_ident())
        return torch.full((3, 2, 4), float(i)), torch.full((3, 2, 4), -float(i))


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("depth", [0, 2])
def test_batches_in_order(depth):
    src = _Counting()
    pf = Prefetcher(src, start=5, device=torch.device("cpu"), dtype=torch.float32, depth=depth)
    try:
        for i in range(5, 9):
            x, y = pf.get()
            assert torch.equal(x, torch.full((3, 2, 4), float(i))) and torch.equal(y, -x)
    finally:
        pf.close()


def test_a_cpu_producer_thread_uses_one_thread_and_changes_nobody_else(two_threads):
    src = _Counting()
    pf = Prefetcher(src, start=0, device=torch.device("cpu"), dtype=torch.float32, depth=2)
    try:
        assert pf.threaded
        for _ in range(3):
            pf.get()
        assert set(src.threads) == {1} and threading.get_ident() not in src.makers
        assert torch.get_num_threads() == 2  # the training thread's own count
        seen = []
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join()
        assert seen == [2]  # what a thread started afterwards begins with
    finally:
        pf.close()


def test_computed_batches_are_made_in_the_training_thread_on_a_cpu(two_threads):
    src = _Counting(compute_bound=True)
    pf = Prefetcher(src, start=0, device=torch.device("cpu"), dtype=torch.float32, depth=4)
    try:
        assert not pf.threaded
        pf.get()
        assert src.makers == [threading.get_ident()] and src.threads == [2]
    finally:
        pf.close()


def test_a_producer_error_reaches_the_consumer():
    class Broken(_Counting):
        def get(self, i):
            raise OSError(f"shard {i} unreadable")
    pf = Prefetcher(Broken(), start=0, device=torch.device("cpu"), dtype=torch.float32, depth=2)
    try:
        with pytest.raises(OSError, match="shard 0 unreadable"):
            pf.get()
    finally:
        pf.close()
