"""Every Triton kernel compiles for the GPUs it targets (sm_90, sm_80), without a GPU.

The interpreter (TRITON_INTERPRET=1, how the other tests run the kernels on a CPU) executes a
kernel as Python: code that the real compiler rejects — a name from the caller's scope, a
constexpr misuse, a tile that does not fit in shared memory — passes there unseen. So this test
records every launch that a small workload makes under the interpreter (kernel, argument types,
constexprs, launch options), adds the GPU autotune configs of the encode GEMM, and compiles each
specialisation ahead of time for sm_90 and sm_80 in a subprocess without the interpreter
(``triton.compile`` with an explicit target needs no driver), checking the shared memory each
uses against the chip's limit. What it cannot see: numerics and speed on a real GPU.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import fastclt.ops.triton.clt_decode as tcd  # noqa: E402
import fastclt.ops.triton.encode as tenc  # noqa: E402
import fastclt.ops.triton.sparse_decode as tsd  # noqa: E402
from fastclt.codes import SparseCodes  # noqa: E402
from fastclt.ops.triton.auxk import auxk_select  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="records launches under the interpreter (on a GPU the other tests compile every kernel)")

# Shared memory per block (bytes): sm_90 227 KB, sm_80 163 KB (CUDA programming guide).
TARGETS = {"sm_90": (90, 64, 232448), "sm_80": (80, 32, 166912)}
_TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
       torch.int64: "i64", torch.bool: "i1", torch.uint8: "u8"}


def _arg_type(v):
    if isinstance(v, torch.Tensor):
        return "*" + _TL[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    if v is None:
        return "constexpr"
    raise TypeError(f"unexpected kernel argument {type(v).__name__}")


def _constexpr_value(v):
    """JSON form of a constexpr: a tl dtype by name, everything else as is."""
    if isinstance(v, triton.language.dtype):
        return {"tl_dtype": str(v)}
    return v


def record_launches(workload):
    """Run ``workload`` under the interpreter; return one spec per distinct kernel specialisation."""
    from triton.runtime.interpreter import InterpretedFunction

    seen, specs = set(), []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        bound = dict(zip(names, args))
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound.update(kwargs)
        signature, constexprs = {}, {}
        constexpr_names = {n for n in names if "constexpr" in str(self.fn.__annotations__.get(n, ""))}
        for n in names:
            v = bound[n]
            if n in constexpr_names or v is None:
                signature[n] = "constexpr"
                constexprs[n] = _constexpr_value(v)
            else:
                signature[n] = _arg_type(v)
        spec = {"module": self.fn.__module__, "kernel": self.fn.__name__, "signature": signature,
                "constexprs": constexprs, "options": options}
        key = json.dumps(spec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            specs.append(spec)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs, **options)

    InterpretedFunction.run = run
    try:
        workload()
    finally:
        InterpretedFunction.run = original
    return specs


def workload():
    """Launch every kernel in every mode the ops use (tiny sizes, interpreter)."""
    g = torch.Generator().manual_seed(0)
    B, d, F, L = 9, 21, 37, 3
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
            Wd = torch.randn(F, 300, generator=g).to(dtype).requires_grad_(need_w)
            v = codes.value.clone().requires_grad_(need_v)
            tsd.sparse_decode(SparseCodes(codes.row_ptr, codes.index, v, F), Wd,
                              torch.zeros(300, dtype=dtype, requires_grad=True)).float().sum().backward()
        chunk, tsd.SEGMENT_CHUNK = tsd.SEGMENT_CHUNK, 2
        try:
            hot = SparseCodes.from_topk(torch.zeros(B, 1, dtype=torch.int32), torch.rand(B, 1, generator=g).to(dtype), F)
            Wd = torch.randn(F, 40, generator=g).to(dtype).requires_grad_(True)
            tsd.sparse_decode(SparseCodes(hot.row_ptr, hot.index, hot.value.requires_grad_(True), F), Wd) \
                .float().sum().backward()
        finally:
            tsd.SEGMENT_CHUNK = chunk
        # CLT decode: every tying, with and without the feature affine, W trained or frozen
        cl = [SparseCodes.from_topk(torch.randint(0, F, (B, 2), generator=g, dtype=torch.int32),
                                    torch.rand(B, 2, generator=g).to(dtype), F) for _ in range(L)]
        for tying in ("none", "per_source", "per_target"):
            for affine in (False, True):
                if tying == "none" and affine:
                    continue
                for train_w in (True, False):
                    if tying == "none":
                        Wc = [torch.randn(F, L - s, 24, generator=g).to(dtype).requires_grad_(train_w) for s in range(L)]
                    else:
                        Wc = torch.randn(L, F, 24, generator=g).to(dtype).requires_grad_(train_w)
                    off = torch.randn(L, F, generator=g).to(dtype).requires_grad_(True) if affine else None
                    sc = torch.randn(L, F, generator=g).to(dtype).requires_grad_(True) if affine else None
                    vals = [SparseCodes(c.row_ptr, c.index, c.value.clone().requires_grad_(True), F) for c in cl]
                    tcd.clt_decode(vals, Wc, tying, torch.zeros(L, 24, dtype=dtype), off, sc) \
                        .float().sum().backward()


def gpu_specs(specs):
    """What to compile for which target. Every recorded specialisation of the small kernels, for
    sm_90 and sm_80. The encode GEMM under its GPU autotune configs (pruned by shared memory per
    dtype, as on the device): for sm_90, each mode and dtype at the first config (both loop forms,
    both fp32 precisions) and the training hot path (TopK/BatchTopK candidates) at every config;
    for sm_80, the hot path at every config."""
    out = [dict(s, targets=list(TARGETS)) for s in specs if s["kernel"] != "_encode_kernel"]
    seen = set()
    for s in specs:
        if s["kernel"] != "_encode_kernel" or not s["constexprs"]["HAS_BIAS"]:
            continue
        dtype = s["signature"]["x_ptr"]
        mode = s["constexprs"]["MODE"]
        for target, (_, _, limit) in TARGETS.items():
            configs = tenc.prune_configs(tenc._gpu_configs(), 4 if dtype == "*fp32" else 2, limit)
            for i, cfg in enumerate(configs):
                if not (mode == tenc.MODE_CANDIDATES or (i == 0 and target == "sm_90")):
                    continue
                c = dict(s["constexprs"], **cfg.kwargs, UPCAST=False, SPLIT_N=2 if cfg.kwargs["BLOCK_N"] >= 128 else 1)
                for even_k in ([False, True] if i == 0 else [True]):
                    for prec in (["tf32", "ieee"] if dtype == "*fp32" and i == 0 else ["tf32"]):
                        spec = dict(s, constexprs=dict(c, EVEN_K=even_k, INPUT_PRECISION=prec),
                                    options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                                    targets=[target])
                        key = json.dumps(spec, sort_keys=True)
                        if key not in seen:
                            seen.add(key)
                            out.append(spec)
    return out


COMPILE = textwrap.dedent('''
    import importlib, json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from concurrent.futures import ProcessPoolExecutor

    def compile_one(spec):
        fails, report = [], []
        fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        while not isinstance(fn, JITFunction):  # under autotune / heuristics wrappers
            fn = fn.fn
        consts = {k: (tl.dtype(v["tl_dtype"]) if isinstance(v, dict) else v) for k, v in spec["constexprs"].items()}
        for name in spec["targets"]:
            cc, warp, smem_limit = targets[name]
            try:
                k = triton.compile(ASTSource(fn, spec["signature"], consts), target=GPUTarget("cuda", cc, warp),
                                   options=spec["options"])
                smem = k.metadata.shared
                report.append((spec["kernel"], name, smem))
                if smem > smem_limit:
                    fails.append(f"{spec['kernel']} {name}: {smem} B of shared memory > {smem_limit} "
                                 f"({spec['constexprs']}, {spec['options']})")
            except Exception as e:
                msg = str(e).strip().splitlines()
                fails.append(f"{spec['kernel']} {name} ({spec['constexprs']}, {spec['options']}): "
                             f"{type(e).__name__}: {' | '.join(msg[-6:])}")
        return fails, report

    if __name__ == "__main__":
        specs, targets = json.load(sys.stdin)
        fails, report = [], []
        with ProcessPoolExecutor(max_workers=2) as pool:
            for f, r in pool.map(compile_one, specs):
                fails += f
                report += r
        json.dump({"fails": fails, "report": report}, sys.stdout)
''')


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm90_and_sm80(tmp_path):
    specs = gpu_specs(record_launches(workload))
    kernels = {s["kernel"] for s in specs}
    assert kernels >= {"_encode_kernel", "_gather_decode_kernel", "_gather_dot_kernel", "_feature_scatter_kernel",
                       "_chunk_reduce_kernel", "_clt_tied_decode_kernel", "_clt_tied_dot_kernel"}, kernels
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")  # compile for real, leave no cache behind
    script = tmp_path / "compile_kernels.py"  # a file, so that the process pool can import it
    script.write_text(COMPILE)
    proc = subprocess.run([sys.executable, str(script)], input=json.dumps([specs, TARGETS]), env=env,
                          capture_output=True, text=True, timeout=1200, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    n = sum(len(s["targets"]) for s in specs)
    assert not out["fails"], f"{len(out['fails'])} of {n} compiles failed:\n" + "\n".join(out["fails"][:20])
    assert len(out["report"]) == n
