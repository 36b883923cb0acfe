"""The kernel resource report (benchmarks/kernel_resources.py) without compiling: parsing of the
ptxas and cuobjdump output, the rows' verdicts, which specialisations count as the hot path, the
CLI's files and exit status. (tests/test_triton_compile.py runs it on real compiles.)"""
import csv
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from benchmarks import kernel_resources as kr  # noqa: E402

# ptxas -v as Triton 3.9 (its "ptxas-blackwell", CUDA 13) and 3.6 (CUDA 12.8) print it
LOG_39 = ("ptxas-blackwell info    : 0 bytes gmem\n"
          "ptxas-blackwell info    : Compiling entry function '_encode_kernel' for 'sm_90a'\n"
          "ptxas-blackwell info    : Function properties for _encode_kernel\n"
          "    304 bytes stack frame, 476 bytes spill stores, 552 bytes spill loads\n"
          "ptxas-blackwell info    : Used 255 registers, used 1 barriers, 304 bytes cumulative stack size\n"
          "ptxas-blackwell info    : Compile time = 6.996 ms\n")
LOG_36 = ("ptxas info    : 0 bytes gmem\n"
          "ptxas info    : Compiling entry function 'k' for 'sm_80'\n"
          "ptxas info    : Function properties for k\n"
          "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
          "ptxas info    : Used 8 registers, used 0 barriers\n")
RES_USAGE = ("Fatbin elf code:\n================\narch = sm_90a\n\nResource usage:\n"
             " Common:\n  GLOBAL:0\n Function _encode_kernel:\n"
             "  REG:232 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:612 TEXTURE:0 SURFACE:0 SAMPLER:0\n")


def test_parse_ptxas_log():
    assert kr.parse_ptxas_log(LOG_39) == {"stack": 304, "spill_stores": 476, "spill_loads": 552, "registers": 255}
    assert kr.parse_ptxas_log(LOG_36) == {"stack": 0, "spill_stores": 0, "spill_loads": 0, "registers": 8}
    assert kr.parse_ptxas_log("") == {}


def test_parse_res_usage():
    assert kr.parse_res_usage(RES_USAGE) == {"registers": 232, "stack": 0}
    assert kr.parse_res_usage("no cubin here") == {}


def _spec(kernel="_encode_kernel", dtype="bf16", mode=2, sizes="aligned"):
    sig = {"x_ptr": "*" + dtype, "W": "*" + dtype, "MODE": "constexpr", "BLOCK_M": "constexpr"}
    return {"module": "m", "kernel": kernel, "signature": sig, "attrs": {},
            "constexprs": {"MODE": mode, "BLOCK_M": 128, "BLOCK_N": 256, "HAS_BIAS": True, "GROUP_M": 8},
            "options": {"num_warps": 8, "num_stages": 3}, "sizes": sizes, "targets": ["sm_90"]}


def _res(**kw):
    return dict({"registers": 200, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 1024}, **kw)


def test_rows_verdicts():
    row = kr.describe(_spec(), "sm_90", _res())
    assert (row["status"], row["hot"], row["mode"], row["tile"], row["dtype"]) == ("ok", 1, "candidates", "128x256",
                                                                                   "bf16")
    assert row["variant"] == "HAS_BIAS=1"
    assert kr.describe(_spec(), "sm_90", _res(spill_loads=4))["status"] == "SPILL"
    assert kr.describe(_spec(), "sm_80", _res(smem=166913))["status"] == "SMEM"
    assert kr.describe(_spec(), "sm_90", _res(spill_stores=4, smem=10**6))["status"] == "SPILL+SMEM"
    assert kr.describe(_spec(), "sm_90", {"status": "FAIL", "note": "x"})["status"] == "FAIL"
    # the hot path: the bf16 encode in every mode and every small kernel; fp32 encodes are reported only
    assert kr.describe(_spec(mode=3), "sm_90", _res())["hot"] == 1
    assert kr.describe(_spec(dtype="fp32"), "sm_90", _res(spill_stores=8))["hot"] == 0
    assert kr.describe(_spec("_gather_decode_kernel", dtype="fp32"), "sm_90", _res())["hot"] == 1
    rows = [kr.describe(_spec(dtype="fp32"), "sm_90", _res(spill_stores=8)),
            kr.describe(_spec(), "sm_90", _res())]
    assert kr.failures(rows) == []
    rows.append(kr.describe(_spec("_feature_scatter_kernel"), "sm_80", {"status": "FAIL", "note": "boom"}))
    assert [r["kernel"] for r in kr.failures(rows)] == ["_feature_scatter_kernel"]
    summ = kr.summary(rows)
    fp32 = next(s for s in summ if s["dtype"] == "fp32")
    assert (fp32["spilling"], fp32["max_spill_stores"], fp32["hot"]) == (1, 8, 0)
    assert next(s for s in summ if s["kernel"] == "_feature_scatter_kernel")["failed"] == 1


@pytest.mark.parametrize("hot_spill", [False, True])
def test_cli_files_and_exit_status(tmp_path, monkeypatch, capsys, hot_spill):
    """The CLI writes ptxas-<target>-triton<version>/resources.{csv,md} and meta.json and exits 1
    exactly when a hot-path specialisation spills (here: compiles replaced by fixed results)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kr, "recorded_specs", lambda targets, quick=False: [dict(_spec(), targets=list(targets)),
                                                                            dict(_spec(dtype="fp32"), targets=list(targets))])

    def compile_specs(specs, jobs=2):
        return [kr.describe(s, t, _res(spill_stores=8 if (s["signature"]["x_ptr"] == "*fp32" or hot_spill) else 0))
                for s in specs for t in s["targets"]]
    monkeypatch.setattr(kr, "compile_specs", compile_specs)
    status = kr.main(["--target", "all", "--out", str(tmp_path), "--jobs", "1"])
    out = capsys.readouterr().out
    assert status == (1 if hot_spill else 0)
    assert ("FAILED: 2 hot-path" in out) == hot_spill
    for target in kr.TARGETS:
        folder = tmp_path / kr.report_folder(target, triton.__version__)
        with open(folder / "resources.csv") as f:
            rows = list(csv.DictReader(f))
        assert [r["dtype"] for r in rows] == ["bf16", "fp32"] and all(r["target"] == target for r in rows)
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["hot_path_failures"] == (1 if hot_spill else 0) and meta["target"] == target
        assert "## Summary" in (folder / "resources.md").read_text()


def test_cli_saved_specs(tmp_path, monkeypatch):
    """--save-specs writes what is compiled; --specs compiles it without recording (for a Triton
    whose interpreter cannot run the workload), restricted to --target."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kr, "recorded_specs", lambda targets, quick=False: [dict(_spec(), targets=list(targets))])
    compiled = []

    def compile_specs(specs, jobs=2):
        compiled.append(specs)
        return [kr.describe(s, t, _res()) for s in specs for t in s["targets"]]
    monkeypatch.setattr(kr, "compile_specs", compile_specs)
    saved = tmp_path / "specs.json"
    assert kr.main(["--out", str(tmp_path / "a"), "--save-specs", str(saved)]) == 0
    assert json.loads(saved.read_text()) == compiled[0]

    def no_recording(*args, **kwargs):
        raise AssertionError("--specs must not record")
    monkeypatch.setattr(kr, "recorded_specs", no_recording)
    assert kr.main(["--out", str(tmp_path / "b"), "--specs", str(saved), "--target", "sm_80"]) == 0
    assert [s["targets"] for s in compiled[1]] == [["sm_80"]]
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    with pytest.raises(SystemExit) as e:
        kr.main(["--out", str(tmp_path / "c"), "--specs", str(tmp_path / "bad.json")])
    assert e.value.code == 2


def test_cli_bad_arguments(tmp_path):
    with pytest.raises(SystemExit) as e:
        kr.main(["--jobs", "0", "--out", str(tmp_path)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        kr.main(["--target", "sm_70", "--out", str(tmp_path)])
    assert e.value.code == 2
