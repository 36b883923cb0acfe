"""Host synchronisation in the trainer's step (fastclt/train.py ``_Run._step``): on a GPU every read of a
device value on the host (``.item()``, ``bool()`` / ``int()`` / ``float()`` of a tensor, ``.tolist()``,
``.cpu()``, a ``nonzero`` or boolean mask) stalls the launch queue, so the step keeps them to a known few.
Recorded here on the CPU, where the same Python code runs: the ATen ops that read a value on the host
(``_local_scalar_dense``, ``nonzero``, ``masked_select``, ``unique``) through a dispatch mode, and the
tensor methods that copy to the host through patches, each attributed to the innermost fastclt frame.
The data source (synthetic batches, made in this thread on a CPU) is outside the count."""
from __future__ import annotations

import collections
import contextlib
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastclt import _ext

pytestmark = pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))

_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
          "aten::unique_dim", "aten::unique_consecutive"}
_DATA = ("training/synthetic.py", "training/data.py")


def _site() -> str:
    for fr in reversed(traceback.extract_stack()[:-2]):
        path = fr.filename.replace("\\", "/")
        if "/fastclt/" in path and "/site-packages/" not in path and "/tests/" not in path:
            return f"{path.split('/fastclt/')[-1]}:{fr.name}"
    return "outside fastclt"


class _Reads(TorchDispatchMode):
    def __init__(self, hits):
        super().__init__()
        self.hits = hits

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in _READS:
            self.hits[_site()] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _recording(hits):
    originals = {n: getattr(torch.Tensor, n) for n in ("tolist", "cpu", "numpy")}  # (.item() dispatches)

    def patched(name):
        def read(self, *a, **k):
            hits[_site()] += 1
            return originals[name](self, *a, **k)
        return read
    try:
        for n in originals:
            setattr(torch.Tensor, n, patched(n))
        with _Reads(hits):
            yield
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)


def _trainer(tmp_path, *extra, device="cpu"):
    from fastclt.train import _Run, _Signals
    from fastclt.training.config import load_config
    from fastclt.training.parallel import init_distributed
    stack = contextlib.ExitStack()
    cfg = load_config(["--out_dir", str(tmp_path / "run"), "--train.steps", "1000", "--train.device", device,
                       "--model.n_layers", "3", "--model.d_in", "16", "--model.n_features", "64",
                       "--model.k", "4", "--train.batch_size", "64", "--log.progress", "false",
                       "--log.every", "1000", "--checkpoint.every", "0", *extra])
    run = _Run(cfg, init_distributed(1, device), torch.device(device), stack)
    run._open_out_dir()
    run._open_source()
    run._build()
    run._start()
    run.model.train()
    return run, _Signals(), stack


def _step_reads(tmp_path, *extra, steps=4) -> dict:
    run, sig, stack = _trainer(tmp_path, *extra)
    with stack:
        for _ in range(2):
            run._advance(sig)
        hits = collections.Counter()
        with _recording(hits):
            for _ in range(steps):
                run._advance(sig)
    return {site: n / steps for site, n in hits.items() if not site.startswith(_DATA)}


def test_batchtopk_step_reads_the_device_once(tmp_path):
    """The default BatchTopK CLT's step while no feature can be dead yet: one read for all its checks
    (the loss, the gradient norm and the inputs' NaN/Inf sums, ``defer_input_check``) — none in the
    encode, the selection, the decode, the losses or AuxK (the trainer's host-side bound on
    tokens since a feature fired says no feature is dead: ``dead_counts``)."""
    reads = _step_reads(tmp_path)
    assert reads == {"train.py:_step": 1.0}, reads


def test_logging_every_step_reads_nothing_more(tmp_path):
    """log.every = 1 (the default): the metrics line's values (the loss's parts and per-layer metrics,
    the dead count, the gradient norm) come with the step's one read; the log line is the same."""
    reads = _step_reads(tmp_path / "reads", "--log.every", "1")
    assert reads == {"train.py:_step": 1.0}, reads
    run, sig, stack = _trainer(tmp_path / "values", "--log.every", "1", "--train.dead_tokens", "128")
    with stack:
        for _ in range(4):
            out, gnorm, *_ = run._step(sig)
            read = dict(run._read)
            fused = dict(out.metrics)
            out._metrics = None  # the same values read on their own
            assert out.metrics == fused
            assert read["gnorm"] == float(gnorm) and read["longest"] == float(run.since_fired.max())
            assert read["dead"] == float((run.since_fired >= 128).sum())
            run._read = None


def test_auxk_reads_dead_features_once_they_may_exist(tmp_path):
    """Once a feature may have been silent for dead_tokens, AuxK reads its per-layer dead counts (a
    layer without dead features needs no selection), and each layer's selection lists its dead
    features from that count (``n_dead``: no read): one more read per step."""
    reads = _step_reads(tmp_path, "--train.dead_tokens", "64")
    assert reads == {"train.py:_step": 1.0, "models/base.py:_auxk": 1.0}, reads


def test_skipping_nonfinite_tokens_reads_the_inputs_first(tmp_path):
    """nonfinite="skip" drops tokens before the encode (a batch whose size is only known on the
    host): one more read, the model's own check of x and y."""
    reads = _step_reads(tmp_path, "--model.nonfinite", "skip")
    assert reads == {"train.py:_step": 1.0, "models/base.py:_finite_rows": 1.0}, reads


def test_the_bound_changes_no_number(tmp_path):
    """The same run with the host-side bound and with AuxK counting dead features every step (bound
    unknown): the same losses and parameters, bit for bit, through the steps where features die
    (dead_tokens of two batches; the bound is renewed at every logging step)."""
    results = []
    for bound in (True, False):
        run, sig, stack = _trainer(tmp_path / str(bound), "--train.dead_tokens", "128", "--log.every", "3")
        with stack:
            if not bound:
                run.silent_bound = None
            losses, deads = [], []
            for _ in range(12):
                out, *_ = run._step(sig)
                run._log(out, *_[:3])
                losses.append(out.loss.detach().clone())
                deads.append(int((run.since_fired >= 128).sum()))
            results.append((torch.stack(losses), deads, [p.detach().clone() for p in run.model.parameters()]))
    (la, da, pa), (lb, db, pb) = results
    assert max(da) > 0, "no feature died: the test does not reach AuxK"
    assert da == db and torch.equal(la, lb)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
