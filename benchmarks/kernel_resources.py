"""Registers, spills and shared memory of every Triton kernel specialisation, compiled without a GPU.

    python -m benchmarks.kernel_resources [--target sm_90|sm_80|all] [--out DIR] [--jobs N] [--quick]
                                          [--save-specs FILE | --specs FILE]

What is compiled: every kernel specialisation that a small workload launches under the Triton
interpreter (``workload``: every op, mode, dtype and gradient path of the Triton kernels, at
aligned and at odd sizes), each with the signature a GPU launch of the same arguments compiles
(Triton's own argument specialisation: unit strides become constants, 16-byte alignment becomes a
divisibility hint), plus the fused encode GEMM under the GPU autotune configs the target keeps
(``gpu_specs``). Each is compiled ahead of time, ``triton.compile(..., target=GPUTarget("cuda",
cc, 32))``, in a subprocess without the interpreter (no driver, no GPU). Triton runs the ptxas
bundled in its wheel with ``-v``; the report reads that log (registers, stack frame, spill stores
and loads), the cubin's own resource usage (``cuobjdump -res-usage``, also bundled: registers and
stack as loaded) and the shared memory Triton launches the kernel with.

Output: one line per specialisation and a summary on stdout; ``resources.csv`` (one row per
specialisation), ``resources.md`` (summary, then the table) and ``meta.json`` (versions, commit,
summary) in ``<out>/ptxas-<target>-triton<version>/`` (default out: ``benchmarks/results``). ``--quick``: the CI
subset (``tests/ops/triton/test_triton_compile.py``). ``--save-specs`` / ``--specs``: record with one Triton,
compile with another (an interpreter that cannot run the workload, e.g. Triton 3.6 with NumPy ≥ 2.4).

Exit status: 1 when a hot-path specialisation (``is_hot``: the bf16 encode in every mode and
every decode, scatter and MOLT kernel) spills, uses more shared memory than the target has, or fails
to compile; 2 for bad arguments. Other specialisations (fp32 encode) are reported, not judged.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent

# name → (compute capability, shared memory one block may opt in to in bytes: CUDA programming
# guide, sm_90 227 KB, sm_80 163 KB)
TARGETS = {"sm_90": (90, 232448), "sm_80": (80, 166912)}

ENCODE = "_encode_kernel"
ENCODE_MODES = {0: "relu", 1: "jumprelu", 2: "candidates", 3: "dense"}
# constexprs shown in the tile column (in this order), not in the variant column
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_J", "BLOCK_D")
HIDDEN_KEYS = {"GROUP_M", "MODE", "ROUND_DTYPE", "UPCAST"}

ROW_FIELDS = ("target", "kernel", "dtype", "mode", "sizes", "variant", "tile", "warps", "stages", "registers", "stack",
              "spill_stores", "spill_loads", "smem", "smem_limit", "hot", "status", "note")


# ------------------------------------------------------------------------------------- recording
def _constexpr_value(v):
    """JSON form of a constexpr: a tl dtype by name, everything else as is."""
    import triton.language as tl

    if isinstance(v, tl.dtype):
        return {"tl_dtype": str(v)}
    return v


def _interpreting() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import fastclt.ops.triton.encode as tenc
    return tenc._INTERPRET


def record_launches(workload: Callable[[], None], sizes: str = "") -> list[dict]:
    """Run ``workload`` under the Triton interpreter; return one spec per distinct kernel
    specialisation launched: {module, kernel, signature, constexprs, attrs, options, sizes}.

    The signature is the one a GPU launch with the same arguments compiles: Triton's own
    specialisation of each argument (``native_specialize_impl``): an integer equal to 1 becomes the
    constant 1, and a pointer aligned to 16 bytes or an integer divisible by 16 gets the
    divisibility attribute ("D") that lets the compiler vectorise and pipeline the loads."""
    if not _interpreting():
        raise RuntimeError("record_launches: needs TRITON_INTERPRET=1 set before fastclt's Triton kernels are "
                           "imported (python -m benchmarks.kernel_resources sets it)")
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.runtime.interpreter import InterpretedFunction

    seen, specs = set(), []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        bound = dict(zip(names, args))
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound.update(kwargs)
        signature, constexprs, attrs = {}, {}, {}
        constexpr_names = {n for n in names if "constexpr" in str(self.fn.__annotations__.get(n, ""))}
        for n in names:
            v = bound[n]
            if n in constexpr_names or v is None:
                signature[n] = "constexpr"
                constexprs[n] = _constexpr_value(v)
                continue
            ty, attr = native_specialize_impl(BaseBackend, v, False, True, True)[:2]
            if ty == "constexpr":  # an integer 1
                signature[n] = "constexpr"
                constexprs[n] = attr
            else:
                signature[n] = ty
                if attr:
                    attrs[n] = attr
        spec = {"module": self.fn.__module__, "kernel": self.fn.__name__, "signature": signature,
                "constexprs": constexprs, "attrs": attrs, "options": options}
        key = json.dumps(spec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            specs.append(dict(spec, sizes=sizes))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs, **options)

    InterpretedFunction.run = run
    try:
        workload()
    finally:
        InterpretedFunction.run = original
    return specs


# The workload's sizes: aligned ones (multiples of 16 elements: what real models launch) and odd ones
# (masked edges, unaligned rows: the specialisations a GPU compiles for odd d_in / F / d_out).
SIZES = {"aligned": dict(B=16, d=32, F=48, L=3, D=256, D_hot=64, D_clt=32),
         "odd": dict(B=9, d=21, F=37, L=3, D=300, D_hot=40, D_clt=24)}


def workload(B: int, d: int, F: int, L: int, D: int, D_hot: int, D_clt: int) -> None:
    """Launch every Triton kernel in every mode the ops use (tiny sizes, interpreter, CPU): encode
    [B, d] → F features, AuxK, CLT encode over L layers, sparse decode to D (and D_hot for the
    hot-feature path) columns, CLT decode to D_clt, MOLT transforms d → D_clt (a rank of two rank
    blocks, gates in the weights' dtype and in fp32, with and without dx)."""
    import torch

    import fastclt.ops.triton._common as tk
    import fastclt.ops.triton.clt_decode as tcd
    import fastclt.ops.triton.decode as tsd
    import fastclt.ops.triton.encode as tenc
    from fastclt.codes import SparseCodes
    from fastclt.ops.triton.auxk import auxk_select

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(B, d, generator=g).to(dtype).requires_grad_(True)
        W = (torch.randn(F, d, generator=g) / d ** 0.5).to(dtype).requires_grad_(True)
        b = (torch.randn(F, generator=g) * 0.1).to(dtype).requires_grad_(True)
        thr = (torch.rand(F, generator=g) * 0.5).to(dtype).requires_grad_(True)
        p = (torch.randn(d, generator=g) * 0.2).to(dtype).requires_grad_(True)
        for act, kw in (("relu", {}), ("jumprelu", {"threshold": thr, "bandwidth": 0.5}), ("topk", {"k": 3}),
                        ("batchtopk", {"k": 3})):
            codes = tenc.encode(x, W, b, activation=act, pre_bias=p, **kw)
            codes.value.float().sum().backward()
            c2, h = tenc.encode(x, W, b, activation=act, return_preacts=True, **kw)
            (c2.value.float().sum() + h.float().sum()).backward()
        aux = auxk_select(x, W, b, torch.arange(F) % 2 == 0, 4, p)
        aux.value.float().sum().backward()
        xl = torch.randn(B, L, d, generator=g).to(dtype).requires_grad_(True)
        Wl = (torch.randn(L, F, d, generator=g) / d ** 0.5).to(dtype).requires_grad_(True)
        sum(c.value.float().sum() for c in tenc.encode_layers(xl, Wl, None, 2)).backward()
        # sparse decode: forward, every backward variant, the hot-feature chunk path
        codes = SparseCodes.from_topk(torch.randint(0, F, (B, 4), generator=g, dtype=torch.int32),
                                      torch.rand(B, 4, generator=g).to(dtype), F)
        for need_v, need_w in ((True, True), (True, False), (False, True)):
            Wd = torch.randn(F, D, generator=g).to(dtype).requires_grad_(need_w)
            v = codes.value.clone().requires_grad_(need_v)
            tsd.sparse_decode(SparseCodes(codes.row_ptr, codes.index, v, F), Wd,
                              torch.zeros(D, dtype=dtype, requires_grad=True)).float().sum().backward()
        chunk, tk.SEGMENT_CHUNK = tk.SEGMENT_CHUNK, 2
        try:
            hot = SparseCodes.from_topk(torch.zeros(B, 1, dtype=torch.int32),
                                        torch.rand(B, 1, generator=g).to(dtype), F)
            Wd = torch.randn(F, D_hot, generator=g).to(dtype).requires_grad_(True)
            tsd.sparse_decode(SparseCodes(hot.row_ptr, hot.index, hot.value.requires_grad_(True), F), Wd) \
                .float().sum().backward()
        finally:
            tk.SEGMENT_CHUNK = chunk
        # CLT decode: every tying, with and without the feature affine, W trained or frozen
        cl = [SparseCodes.from_topk(torch.randint(0, F, (B, 2), generator=g, dtype=torch.int32),
                                    torch.rand(B, 2, generator=g).to(dtype), F) for _ in range(L)]
        for tying in ("none", "per_source", "per_target"):
            for affine in (False, True):
                if tying == "none" and affine:
                    continue
                for train_w in (True, False):
                    if tying == "none":
                        Wc = [torch.randn(F, L - s, D_clt, generator=g).to(dtype).requires_grad_(train_w)
                              for s in range(L)]
                    else:
                        Wc = torch.randn(L, F, D_clt, generator=g).to(dtype).requires_grad_(train_w)
                    off = torch.randn(L, F, generator=g).to(dtype).requires_grad_(True) if affine else None
                    sc = torch.randn(L, F, generator=g).to(dtype).requires_grad_(True) if affine else None
                    vals = [SparseCodes(c.row_ptr, c.index, c.value.clone().requires_grad_(True), F) for c in cl]
                    tcd.clt_decode(vals, Wc, tying, torch.zeros(L, D_clt, dtype=dtype), off, sc) \
                        .float().sum().backward()
        molt_workload(B, d, D_clt, dtype, g)
    tenc.clear_caches()


def molt_workload(B: int, d: int, D: int, dtype, g) -> None:
    """The MOLT transforms d → D in ``dtype``: forward, and backward with and without dx (x is data
    in training); ranks of two rank blocks and of one row, gates in ``dtype`` and in fp32."""
    import torch

    import fastclt.ops.triton.molt as tmolt
    from fastclt.codes import SparseCodes

    groups = ((2, 80), (3, 16), (4, 1))
    T, R = sum(n for n, _ in groups), sum(n * r for n, r in groups)
    gates = SparseCodes.from_topk(torch.randint(0, T, (B, 2), generator=g, dtype=torch.int32),
                                  torch.rand(B, 2, generator=g), T)
    for x_grad in (True, False):
        x = torch.randn(B, d, generator=g).to(dtype).requires_grad_(x_grad)
        U = (torch.randn(R, D, generator=g) / 4).to(dtype).requires_grad_(True)
        V = (torch.randn(R, d, generator=g) / 4).to(dtype).requires_grad_(True)
        v = gates.value.to(dtype if x_grad else torch.float32).requires_grad_(True)
        tmolt.molt_decode(SparseCodes(gates.row_ptr, gates.index, v, T), x, U, V, groups,
                          torch.zeros(D, dtype=dtype, requires_grad=True)).float().sum().backward()


def gpu_specs(specs: Sequence[dict], targets: Sequence[str] = tuple(TARGETS), quick: bool = False) -> list[dict]:
    """What to compile, each spec with its ``targets``: every recorded specialisation of the small
    kernels, for every target; the encode GEMM (its recorded specialisations with a bias) under the
    autotune configs that the target keeps for its dtype (``encode.gpu_configs``), with the
    constexprs a GPU launch gets (the config's, no interpreter workaround, ``EVEN_K`` =
    d_in % BLOCK_K == 0 as at the recorded sizes):
    - aligned sizes (the real models: rows of 16-element multiples, d_in a multiple of BLOCK_K):
      bf16 in every mode at every config; fp32 (not the hot path) in both dot precisions
      ("ieee", torch's default, and "tf32"), the TopK / BatchTopK candidates mode at every
      config, the other modes at the first; at the first config also the masked K loop (d_in a
      multiple of 16 but not of BLOCK_K);
    - odd sizes (unaligned rows): the configs for unaligned rows, the same way.
    ``quick`` (the CI subset, about half): the encode's other modes than candidates at the first
    config only, fp32 candidates at the first config and in "ieee" only, no masked K loop at
    aligned sizes, and the odd sizes for the first target only."""
    import fastclt.ops.triton.encode as tenc

    out, seen = [], {}

    def add(spec):  # one spec per distinct compile, for the union of the targets asked
        key = json.dumps({k: v for k, v in spec.items() if k not in ("sizes", "targets")}, sort_keys=True)
        if key in seen:
            have = seen[key]["targets"]
            have += [t for t in spec["targets"] if t not in have]
        else:
            seen[key] = spec
            out.append(spec)

    encode = {}
    for s in specs:
        if s["kernel"] != ENCODE:
            add(dict(s, targets=list(targets[:1] if quick and s["sizes"] == "odd" else targets)))
        elif s["constexprs"]["HAS_BIAS"]:
            # one launch per (sizes, dtype, mode, output dtype): the one with the most aligned arguments
            c = s["constexprs"]
            key = (s["sizes"], s["signature"]["x_ptr"], c["MODE"], s["signature"]["dense_ptr"], str(c["ROUND_DTYPE"]))
            if key not in encode or len(s["attrs"]) > len(encode[key]["attrs"]):
                encode[key] = s
    for s in encode.values():
        dtype = s["signature"]["x_ptr"][1:]
        aligned = s["sizes"] == "aligned"
        every_config = dtype == "bf16" and not quick or s["constexprs"]["MODE"] == tenc.MODE_CANDIDATES and \
            not (quick and dtype == "fp32")
        for target in (targets[:1] if quick and not aligned else targets):
            cc, limit = TARGETS[target]
            configs = tenc.gpu_configs(2 if dtype in ("bf16", "fp16") else 4, cc, limit, aligned)
            for i, cfg in enumerate(configs if every_config else configs[:1]):
                # aligned sizes stand for a real d_in (a multiple of every BLOCK_K); the masked K
                # loop at aligned sizes (d_in a multiple of 16, not of BLOCK_K) at the first config
                for even_k in ([True] if not aligned else [True, False] if i == 0 and not quick else [True]):
                    # fp32: torch's default "ieee" (and tf32, not in the CI subset)
                    for prec in (["tf32"] if dtype != "fp32" else ["ieee"] if quick else ["ieee", "tf32"]):
                        c = dict(s["constexprs"], **cfg.kwargs, UPCAST=False, EVEN_K=even_k and aligned,
                                 INPUT_PRECISION=prec)
                        add(dict(s, constexprs=c, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                                 targets=[target]))
    return out


def recorded_specs(targets: Sequence[str] = tuple(TARGETS), quick: bool = False) -> list[dict]:
    """``gpu_specs`` of the workload's recordings at both ``SIZES`` (needs the interpreter, see
    ``record_launches``). The interpreter runs Python on one core: the odd sizes are recorded in a
    second process meanwhile."""
    if not _interpreting():  # checked here too: the second process must not be started for nothing
        record_launches(lambda: None)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                                          else [])))
    names = list(SIZES)
    with tempfile.TemporaryDirectory(prefix="fastclt_record_") as tmp:
        out, err = Path(tmp) / "specs.json", Path(tmp) / "stderr.txt"
        with open(err, "w") as err_file:
            other = subprocess.Popen([sys.executable, "-c", "from benchmarks.kernel_resources import _record_main; "
                                      f"_record_main({names[1]!r}, {str(out)!r})"], env=env, cwd=str(REPO),
                                     stdout=subprocess.DEVNULL, stderr=err_file)
            try:
                specs = record_launches(lambda: workload(**SIZES[names[0]]), names[0])
            finally:
                other.wait(timeout=1800)
        if other.returncode != 0:
            raise RuntimeError(f"recording the {names[1]} sizes failed (exit {other.returncode}):\n"
                               f"{err.read_text()[-4000:]}")
        specs += json.loads(out.read_text())
    return gpu_specs(specs, targets, quick)


def _record_main(name: str, out: str) -> None:
    """Subprocess entry: the recording at ``SIZES[name]``, as JSON into the file ``out``."""
    Path(out).write_text(json.dumps(record_launches(lambda: workload(**SIZES[name]), name)))


# ------------------------------------------------------------------------------------ compiling
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_ptxas_log(log: str) -> dict:
    """registers, stack, spill_stores, spill_loads of the (one) entry function in a ``ptxas -v``
    log; a field that the log does not state is missing."""
    out = {}
    m = _PTXAS_FRAME.search(log)
    if m:
        out["stack"], out["spill_stores"], out["spill_loads"] = (int(g) for g in m.groups())
    m = _PTXAS_REGS.search(log)
    if m:
        out["registers"] = int(m.group(1))
    return out


def parse_res_usage(text: str) -> dict:
    """registers and stack from ``cuobjdump -res-usage`` of a one-kernel cubin."""
    m = _RES_USAGE.search(text)
    if not m:
        return {}
    return {"registers": int(m.group(1)), "stack": int(m.group(2))}


def _cuobjdump() -> Optional[str]:
    """Path of the cuobjdump bundled with Triton's NVIDIA backend, or None."""
    try:
        from triton import knobs
        return knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 — an older Triton: the report goes without the cubin's view
        return None


def _ptxas(cc: int) -> str:
    """Path of the ptxas Triton uses for compute capability ``cc`` (Triton 3.9 uses its newer
    "ptxas-blackwell" from sm_90 on, 3.6 from sm_100 on)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(cc).path


def ptxas_version(cc: int) -> str:
    """"13.0.88"-style version of the ptxas Triton uses for ``cc``."""
    out = subprocess.run([_ptxas(cc), "--version"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1] if out.strip() else "unknown"


def _cubin_usage(cubin: bytes) -> dict:
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=120)
    return parse_res_usage(res.stdout) if res.returncode == 0 else {}


def _ptxas_rerun(ptx: str, cc: int, enable_fp_fusion: bool) -> str:
    """``ptxas -v`` on ``ptx`` (when Triton's own log could not be captured)."""
    tool = _ptxas(cc)
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [tool, "-lineinfo", "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(d) / "k.cubin")]
        if not enable_fp_fusion:
            cmd.insert(1, "--fmad=false")
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600).stderr


def _compile_one(spec: dict, target: str) -> dict:
    """Compile ``spec`` for ``target``; the resource fields of its row (or status FAIL)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    import importlib

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    while not isinstance(fn, JITFunction):  # under autotune / heuristics wrappers
        fn = fn.fn
    consts = {k: (tl.dtype(v["tl_dtype"]) if isinstance(v, dict) else v) for k, v in spec["constexprs"].items()}
    attrs = {(fn.arg_names.index(k),): BaseBackend.parse_attr(v) for k, v in spec.get("attrs", {}).items()}
    cc, _ = TARGETS[target]
    knobs = getattr(triton, "knobs", None)
    can_log = knobs is not None and hasattr(knobs.nvidia, "dump_ptxas_log")
    if can_log:
        knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, spec["signature"], consts, attrs), target=GPUTarget("cuda", cc, 32),
                               options=spec["options"])
    except Exception as e:  # noqa: BLE001 — reported as a row
        msg = str(e).strip().splitlines()
        return {"status": "FAIL", "note": f"{type(e).__name__}: {' | '.join(msg[-6:])}"[:2000]}
    ptxas_log = log.getvalue()
    res = parse_ptxas_log(ptxas_log)
    if "spill_stores" not in res:  # no log from Triton (cached, or a Triton without the knob)
        res = parse_ptxas_log(_ptxas_rerun(k.asm["ptx"], cc, getattr(k.metadata, "enable_fp_fusion", True)))
    note = ""
    cub = _cubin_usage(k.asm["cubin"])
    if cub:
        if "registers" in res and cub["registers"] != res["registers"]:
            note = f"ptxas log says {res['registers']} registers, the cubin {cub['registers']}"
        res.update(cub)  # the cubin is what gets loaded
    res["smem"] = int(k.metadata.shared)
    if "spill_stores" not in res:
        return dict(res, status="FAIL", note="no ptxas resource log")
    return dict(res, note=note)


def _compile_job(job):
    spec, target = job
    return _compile_one(spec, target)


def _compile_main() -> None:
    """Subprocess entry: specs and jobs as JSON on stdin → result dicts as JSON on stdout."""
    specs, jobs, n_jobs = json.load(sys.stdin)
    work = [(specs[i], t) for i, t in jobs]
    with ProcessPoolExecutor(max_workers=max(1, n_jobs)) as pool:
        results = list(pool.map(_compile_job, work, chunksize=1))
    json.dump(results, sys.stdout)


def compile_specs(specs: Sequence[dict], jobs: int = 2, timeout: float = 3000) -> list[dict]:
    """Compile every (spec, target) of ``specs`` in a subprocess without the interpreter (with a
    fresh Triton cache, so every kernel goes through ptxas), ``jobs`` at a time; one row per pair
    (``ROW_FIELDS``), in order."""
    pairs = [(i, t) for i, s in enumerate(specs) for t in s["targets"]]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DUMP_PTXAS_LOG")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with tempfile.TemporaryDirectory(prefix="fastclt_kernel_resources_") as cache:
        env["TRITON_CACHE_DIR"] = cache  # compile for real, leave no cache behind
        proc = subprocess.run([sys.executable, "-c", "from benchmarks.kernel_resources import _compile_main; "
                               "_compile_main()"], input=json.dumps([list(specs), pairs, jobs]), env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"kernel compile subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    results = json.loads(proc.stdout)
    return [describe(specs[i], t, r) for (i, t), r in zip(pairs, results)]


# ------------------------------------------------------------------------------------- the rows
def _dtype(spec: dict) -> str:
    """The data dtype of a specialisation: x's for the encode, else the narrowest float pointer."""
    sig = spec["signature"]
    if spec["kernel"] == ENCODE:
        return sig["x_ptr"][1:]
    types = {t[1:] for t in sig.values() if t.startswith("*")}
    return next((t for t in ("bf16", "fp16", "fp32") if t in types), "")


def is_hot(kernel: str, dtype: str) -> bool:
    """The training hot path: the bf16 encode (every mode), every decode, scatter and MOLT kernel."""
    return kernel != ENCODE or dtype == "bf16"


def describe(spec: dict, target: str, res: dict) -> dict:
    """A report row (``ROW_FIELDS``) from a spec and its compile result."""
    c = spec["constexprs"]
    kernel, dtype = spec["kernel"], _dtype(spec)
    mode = ENCODE_MODES.get(c.get("MODE"), "") if kernel == ENCODE else ""
    variant = []
    for k in sorted(c):
        if k in TILE_KEYS or k in HIDDEN_KEYS or c[k] is None:
            continue
        v = c[k]
        variant.append(f"{k}={int(v) if isinstance(v, bool) else v}")
    tile = "x".join(str(c[k]) for k in TILE_KEYS if k in c)
    _, limit = TARGETS[target]
    row = {"target": target, "kernel": kernel, "dtype": dtype, "mode": mode, "sizes": spec.get("sizes", ""),
           "variant": " ".join(variant),
           "tile": tile, "warps": spec["options"].get("num_warps", 4), "stages": spec["options"].get("num_stages", 3),
           "smem_limit": limit, "hot": int(is_hot(kernel, dtype)), "note": res.get("note", "")}
    for k in ("registers", "stack", "spill_stores", "spill_loads", "smem"):
        row[k] = res.get(k, "")
    status = res.get("status")
    if status is None:
        bad = []
        if row["spill_stores"] or row["spill_loads"]:
            bad.append("SPILL")
        if row["smem"] > limit:
            bad.append("SMEM")
        status = "+".join(bad) or "ok"
    row["status"] = status
    return row


def failures(rows: Sequence[dict]) -> list[dict]:
    """The hot-path rows that spill, exceed shared memory or failed to compile."""
    return [r for r in rows if r["hot"] and r["status"] != "ok"]


def summary(rows: Sequence[dict]) -> list[dict]:
    """One line per (target, kernel, dtype): specialisations, how many spill, the most registers,
    spill bytes and shared memory."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["target"], r["kernel"], r["dtype"]), []).append(r)
    out = []
    for (target, kernel, dtype), rs in sorted(groups.items()):
        ok = [r for r in rs if r["status"] != "FAIL"]
        spill = [r for r in ok if r["spill_stores"] or r["spill_loads"]]
        out.append({
            "target": target, "kernel": kernel, "dtype": dtype, "hot": rs[0]["hot"], "specs": len(rs),
            "failed": len(rs) - len(ok), "spilling": len(spill),
            "max_registers": max((r["registers"] for r in ok), default=""),
            "max_spill_stores": max((r["spill_stores"] for r in ok), default=""),
            "max_spill_loads": max((r["spill_loads"] for r in ok), default=""),
            "max_smem": max((r["smem"] for r in ok), default=""),
            "smem_over": sum(1 for r in ok if r["smem"] > r["smem_limit"]),
        })
    return out


SUMMARY_FIELDS = ("target", "kernel", "dtype", "hot", "specs", "failed", "spilling", "max_registers",
                  "max_spill_stores", "max_spill_loads", "max_smem", "smem_over")


def _md_table(rows: Sequence[dict], fields: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[f]).replace("|", "/") for f in fields) + " |")
    return lines


def stamp() -> dict:
    """Versions (Triton, the ptxas of each target), commit and date for meta.json."""
    import triton

    from benchmarks.harness import git_commit

    return {"triton": triton.__version__, "ptxas": {t: ptxas_version(cc) for t, (cc, _) in TARGETS.items()},
            "commit": git_commit(), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def report_folder(target: str, triton_version: str) -> str:
    """The results folder of a target and Triton version: ``ptxas-sm_90-triton3.6.0``."""
    return f"ptxas-{target}-triton{triton_version}"


def write_report(rows: Sequence[dict], out: Path, meta: dict) -> list[Path]:
    """``<out>/ptxas-<target>-triton<version>/resources.{csv,md}`` and ``meta.json`` for each
    target in ``rows`` (the Triton version from ``meta``: its compiler decides the registers);
    returns the folders written."""
    folders = []
    for target in sorted({r["target"] for r in rows}):
        rs = [r for r in rows if r["target"] == target]
        folder = Path(out) / report_folder(target, meta["triton"])
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "resources.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=ROW_FIELDS)
            w.writeheader()
            w.writerows(rs)
        summ = summary(rs)
        bad = failures(rs)
        md = [f"# Triton kernel resources — {target} (ptxas, no GPU)", "",
              f"- triton {meta.get('triton')}, ptxas {meta.get('ptxas', {}).get(target)}",
              f"- commit `{meta.get('commit')}`, {meta.get('date')}",
              f"- regenerate: `python -m benchmarks.kernel_resources --target {target}`",
              "- hot path (bf16 encode in every mode, every decode / scatter / MOLT kernel): "
              + (f"**{len(bad)} specialisations spill, exceed shared memory or fail**" if bad
                 else "no spills, within shared memory"), "",
              "## Summary", ""]
        md += _md_table(summ, SUMMARY_FIELDS)
        md += ["", "## Every specialisation", ""]
        md += _md_table(rs, ROW_FIELDS)
        (folder / "resources.md").write_text("\n".join(md) + "\n")
        (folder / "meta.json").write_text(json.dumps(dict(meta, target=target, summary=summ,
                                                          hot_path_failures=len(bad)), indent=1) + "\n")
        folders.append(folder)
    return folders


def format_row(r: dict) -> str:
    spill = f"{r['spill_stores']}/{r['spill_loads']}" if r["status"] != "FAIL" else "-"
    return (f"{r['target']:6} {r['kernel']:26} {r['dtype']:5} {r['mode']:10} {r['tile']:12} "
            f"w{r['warps']} s{r['stages']} regs {r['registers']!s:>3} stack {r['stack']!s:>5} "
            f"spill {spill:>11} smem {r['smem']!s:>6} {'hot ' if r['hot'] else '    '}{r['status']}"
            f"{'  ' + r['variant'] if r['variant'] else ''}{'  ' + r['note'] if r['note'] else ''}")


# ------------------------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernel_resources", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="all", choices=[*TARGETS, "all"], help="GPU to compile for (default: all)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results root; writes <out>/ptxas-<target>-triton<version>/ (default: benchmarks/results; "
                         "with --quick: "
                         "nothing is written unless --out is given)")
    ap.add_argument("--save-specs", type=Path, default=None, metavar="FILE",
                    help="also write what is compiled (the recorded specialisations) to FILE, as JSON")
    ap.add_argument("--specs", type=Path, default=None, metavar="FILE",
                    help="compile the specialisations of FILE (from --save-specs) instead of recording them: "
                         "to compile with a Triton whose interpreter cannot run the workload (Triton 3.6 with "
                         "NumPy >= 2.4), record with another")
    ap.add_argument("--quick", action="store_true",
                    help="the CI subset (tests/ops/triton/test_triton_compile.py): every small kernel, the encode's "
                         "TopK/BatchTopK candidates mode at every config, its other modes at the first")
    ap.add_argument("--jobs", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                    help="parallel compiles (default: CPU count, at most 8)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs: expected a positive number, got {args.jobs}")
    targets = list(TARGETS) if args.target == "all" else [args.target]
    if args.specs is not None:
        try:
            specs = json.loads(args.specs.read_text())
        except (OSError, ValueError) as e:
            ap.error(f"--specs: cannot read a JSON list of specialisations from {args.specs}: {e}")
        if not isinstance(specs, list) or not all(isinstance(s, dict) and "targets" in s for s in specs):
            ap.error(f"--specs: {args.specs} does not hold a list of specialisations (write one with --save-specs)")
        specs = [dict(s, targets=[t for t in s["targets"] if t in targets]) for s in specs]
        specs = [s for s in specs if s["targets"]]
    else:
        os.environ["TRITON_INTERPRET"] = "1"  # the recording runs the kernels on the CPU
        if not _interpreting():
            print("kernel_resources: fastclt's Triton kernels were imported without TRITON_INTERPRET=1; run it as "
                  "`python -m benchmarks.kernel_resources`", file=sys.stderr)
            return 2
        specs = recorded_specs(targets, quick=args.quick)
    if args.save_specs is not None:
        args.save_specs.write_text(json.dumps(specs))
    print(f"compiling {sum(len(s['targets']) for s in specs)} specialisations for {', '.join(targets)} "
          f"({args.jobs} at a time)...", flush=True)
    rows = compile_specs(specs, jobs=args.jobs)
    for r in rows:
        print(format_row(r))
    meta = stamp()
    out = args.out if args.out is not None or args.quick else REPO / "benchmarks" / "results"
    folders = write_report(rows, out, meta) if out is not None else []
    print()
    for line in _md_table(summary(rows), SUMMARY_FIELDS):
        print(line)
    bad = failures(rows)
    print(f"\ntriton {meta['triton']}, ptxas " + ", ".join(f"{v} ({t})" for t, v in meta["ptxas"].items())
          + ("; written to " + ", ".join(str(f) for f in folders) if folders else ""))
    if bad:
        print(f"FAILED: {len(bad)} hot-path specialisations spill, exceed shared memory or do not compile:")
        for r in bad:
            print("  " + format_row(r))
        return 1
    print("hot path: no spills, within shared memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
