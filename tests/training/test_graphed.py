"""train.cuda_graph (fastclt/training/graphed.py): the step's forward and backward captured once and
replayed. The capture itself needs a GPU; here, on the CPU, ``StepGraph`` runs the same function on the
same static buffers with the same routing (``fastclt.ops.capturable``) eagerly, which checks what a
capture depends on: the step reads nothing back from the device beyond the trainer's one read of its
checks, its inputs are copied into the static buffers, its gradients reach the optimizer, and it gives
the eager step's numbers, bit for bit, through steps where λ ramps and features die (eager steps)."""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastclt import _ext, ops
from fastclt.ops import _registry
from fastclt.training import graphed
from fastclt.training.config import ConfigError, load_config
from tests.training.test_host_sync import _DATA, _recording, _site, _trainer

pytestmark = pytest.mark.skipif(not _ext.has_cpu_ext(), reason=_ext.missing_message("cpu"))

SMALL = ("--model.n_layers", "3", "--model.d_in", "16", "--model.n_features", "64", "--model.k", "4",
         "--train.batch_size", "64")


@pytest.fixture
def cpu_graphs(monkeypatch):
    """Let train.cuda_graph run on the CPU (eager replay: StepGraph(capture=False))."""
    monkeypatch.setattr(graphed, "GRAPH_DEVICES", ("cuda", "cpu"))


def _run(tmp_path, steps, *extra, device="cpu"):
    """(losses, final parameters, the run) after ``steps`` steps."""
    run, sig, stack = _trainer(tmp_path, *extra, device=device)
    losses = []
    step = run._step

    def recorded(sig):
        result = step(sig)
        losses.append(result[0].loss.item())
        return result
    run._step = recorded
    with stack:
        for _ in range(steps):
            run._advance(sig)  # (its log lines renew the host's bound on silent tokens)
        return losses, {n: p.detach().clone() for n, p in run.model.named_parameters()}, run


KINDS = [
    pytest.param((), id="clt-batchtopk"),
    pytest.param(("--model.activation", "topk"), id="clt-topk"),
    pytest.param(("--model.kind", "sae", "--model.n_layers", "1"), id="sae-batchtopk"),
    pytest.param(("--model.kind", "sae", "--model.n_layers", "1", "--model.activation", "topk"), id="sae-topk"),
    pytest.param(("--model.kind", "molt"), id="molt"),
    pytest.param(("--model.matryoshka_prefixes", "[16, 64]"), id="clt-matryoshka"),
]


class _HostData(TorchDispatchMode):
    """Counts tensors made from Python values (``torch.tensor(...)``: on a GPU, a host-to-device copy,
    which a captured graph cannot hold)."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in ("aten::lift_fresh", "aten::lift_fresh_copy"):
            self.sites[_site()] += 1
        return func(*args, **(kwargs or {}))


# Triton's decodes (interpreted: slow) for the CLT paths they add: the joined decode, Matryoshka's prefixes
READ_CASES = [pytest.param("cpu", k.values[0], id=f"cpu-{k.id}") for k in KINDS] + \
    [pytest.param("triton", KINDS[i].values[0], id=f"triton-{KINDS[i].id}") for i in (0, 5)]


@pytest.mark.parametrize("impl, extra", READ_CASES)
def test_graphed_step_reads_the_device_once(tmp_path, cpu_graphs, extra, impl):
    """The graphed step's one read is the trainer's read of its checks: nothing in the traced forward
    and backward (which a CUDA graph could not hold), under the impls the routing keeps for the
    decodes (the C++ kernels; Triton's, under the interpreter); and after the first step (a graph's
    warm-up) the traced code makes no tensor from host values."""
    if not _registry.available(impl, torch.device("cpu")):
        pytest.skip(f"impl {impl} does not run on the CPU here (Triton: TRITON_INTERPRET=1, set without a GPU)")
    run, sig, stack = _trainer(tmp_path, "--train.cuda_graph", "true", "--train.impl", impl, *extra)
    with stack:
        run._advance(sig)
        traced, host_data = run.graph.fn, _HostData()

        def watched(*args):
            with host_data:
                return traced(*args)
        run.graph.fn = watched
        hits = collections.Counter()
        with _recording(hits):
            for _ in range(3):
                run._advance(sig)
        assert run.graph.calls == 4
    reads = {site: n / 3 for site, n in hits.items() if not site.startswith(_DATA)}
    assert reads == {"train.py:_step": 1.0}, reads
    assert not host_data.sites, dict(host_data.sites)


@pytest.mark.parametrize("extra", KINDS[:3])
def test_graphed_steps_equal_eager_steps(tmp_path, cpu_graphs, extra):
    """With the reference ops on both sides (the routing's own choice), the graphed run's losses and
    parameters equal the eager run's bit for bit: graphed steps, then features dying (dead_tokens of
    two batches: eager steps with AuxK), then graphed ones again where the host's bound allows."""
    common = ("--train.impl", "reference", "--model.sparsity_coef", "0.001", "--train.sparsity_warmup_steps", "3",
              "--train.dead_tokens", "128", "--log.every", "1", "--model.n_features", "512", *extra)
    eager = _run(tmp_path / "eager", 12, *common)
    graph = _run(tmp_path / "graph", 12, "--train.cuda_graph", "true", *common)
    assert eager[0] == graph[0]
    for name, p in eager[1].items():
        assert torch.equal(p, graph[1][name]), name
    run = graph[2]
    assert 0 < run.graph.calls < 12  # graphed steps, and eager ones (features possibly dead)


def test_graphed_step_with_kernels_matches_eager(tmp_path, cpu_graphs):
    """With the CPU kernels named (train.impl cpu) the graphed step selects with the references (the
    routing) and decodes with the kernels: the same codes, losses equal to rounding."""
    eager = _run(tmp_path / "eager", 5, "--train.impl", "cpu")
    graph = _run(tmp_path / "graph", 5, "--train.impl", "cpu", "--train.cuda_graph", "true")
    torch.testing.assert_close(torch.tensor(graph[0]), torch.tensor(eager[0]), rtol=1e-5, atol=1e-6)
    for name, p in eager[1].items():
        torch.testing.assert_close(graph[1][name], p, rtol=1e-4, atol=1e-5, msg=name)
    assert graph[2].graph.calls == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a CUDA GPU")
@pytest.mark.parametrize("extra", KINDS[:4])
def test_captured_step_on_cuda(tmp_path, extra):
    """On a GPU: the forward and backward captured in a CUDA graph at the first step and replayed at
    the next ones (new batches copied in) train like the eager step: the same losses and parameters
    up to the rounding of the kernels' atomics and the selections' order (references inside the graph,
    radix kernels outside). fp32 (autocast off), so the two differ by rounding only."""
    common = ("--train.autocast", "none", "--train.lr", "1e-3", *extra)
    eager = _run(tmp_path / "eager", 6, *common, device="cuda")
    graph = _run(tmp_path / "graph", 6, "--train.cuda_graph", "true", *common, device="cuda")
    run = graph[2]
    assert run.graph.capture and run.graph.graph is not None and run.graph.calls == 6
    assert len(set(graph[0])) == 6  # each replay saw its own batch
    torch.testing.assert_close(torch.tensor(graph[0]), torch.tensor(eager[0]), rtol=1e-4, atol=1e-6)
    lr, steps = 1e-3, 6
    for name, p in eager[1].items():
        diff = (graph[1][name] - p).abs()
        # Adam's first steps move an entry by about ±lr whatever its gradient's size: an entry whose
        # gradient is rounding noise may move the other way. Nearly all entries must agree closely (a
        # graph that did not train would differ by about lr·steps in most), none by more than two
        # runs' whole travel
        close = diff <= 1e-5 + 1e-3 * p.abs()
        assert close.float().mean() >= 0.999, (name, float(close.float().mean()))
        assert float(diff.max()) <= 2 * lr * steps, name


def test_graphed_step_copies_each_batch(tmp_path, cpu_graphs):
    """Each step's batch is copied into the graph's static buffers before the replay (a graph replaying
    its first batch would train on it forever)."""
    run, sig, stack = _trainer(tmp_path, "--train.cuda_graph", "true")
    get, seen = run.pref.get, []
    run.pref.get = lambda: seen.append(get()) or seen[-1]
    with stack:
        for _ in range(3):
            run._advance(sig)
            x, y = seen[-1]
            assert torch.equal(run.graph.static[0], x) and torch.equal(run.graph.static[1], y)
        assert not torch.equal(seen[0][0], seen[-1][0])


def test_step_graph_refuses_held_gradients():
    """A run with gradients still attached would mix two steps: refused, by name."""
    w = torch.nn.Parameter(torch.randn(3))
    w.grad = torch.ones(3)
    g = graphed.StepGraph(lambda x, y, m: None, [w], torch.nn.Linear(1, 1), capture=False)
    with pytest.raises(RuntimeError, match="zero_grad"):
        g.run(torch.randn(2), torch.randn(2), torch.zeros(2, dtype=torch.bool))


def test_step_graph_matches():
    """Once made, a graph serves only the shapes, dtypes and devices it captured."""
    g = graphed.StepGraph(lambda x, y, m: x.sum(), [], torch.nn.Linear(1, 1), capture=False)
    x, y, m = torch.randn(4, 2), torch.randn(4, 2), torch.zeros(3, dtype=torch.bool)
    assert g.matches(x, y, m)
    g.run(x, y, m)
    assert g.matches(x + 1, y, m)
    assert not g.matches(torch.randn(5, 2), y, m)
    assert not g.matches(x.double(), y, m)


def test_capturable_routes_to_the_references():
    """Inside ``capturable`` the ops that read the device resolve to "reference" whatever impl is
    named; the decodes keep theirs; outside, nothing changes."""
    cpu = torch.device("cpu")
    with ops.capturable():
        for op in _registry.CAPTURE_REFERENCE:
            assert _registry.resolve(op, "cpu", cpu, torch.float32)[0] == "reference", op
        assert _registry.resolve("sparse_decode", "cpu", cpu, torch.float32)[0] == "cpu"
    assert not _registry.capturing()
    assert _registry.resolve("batch_topk", "cpu", cpu, torch.float32)[0] == "cpu"


def test_reference_batch_topk_reads_nothing():
    """One layer's reference BatchTopK (what a graphed step selects with) makes no host read, and
    gives the codes of the extension's exact selection on tie-free input."""
    h = torch.randn(37, 53)
    hits = collections.Counter()
    with _recording(hits):
        codes = ops.batch_topk(h, 5, impl="reference")
    assert sum(hits.values()) == 0, dict(hits)
    ref = ops.batch_topk(h, 5, impl="cpu")
    assert torch.equal(codes.row_ptr, ref.row_ptr) and torch.equal(codes.index, ref.index)
    assert torch.equal(codes.value, ref.value)


CONFIG = ("--out_dir", "unused", "--train.cuda_graph", "true")


@pytest.mark.parametrize("extra, match", [
    (("--train.device", "cpu"), "train.device cpu"),
    (("--train.tp", "2"), "train.tp must be 1"),
    (("--train.grad_accum", "2"), "train.grad_accum must be 1"),
    (("--model.activation", "relu"), "fixed size"),
    (("--model.batchtopk_across_layers", "true"), "batchtopk_across_layers must be false"),
    (("--model.nonfinite", "skip"), "model.nonfinite must be error"),
])
def test_config_refuses_what_a_graph_cannot_hold(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config([*CONFIG, *extra])


def test_trainer_refuses_a_cpu_run(tmp_path):
    """train.device auto on a machine without CUDA: the run says why it cannot capture."""
    with pytest.raises(ConfigError, match="train.cuda_graph: captures the step on a CUDA device"):
        with contextlib.ExitStack():
            _trainer(tmp_path, "--train.cuda_graph", "true", "--train.device", "auto")
