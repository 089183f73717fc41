"""bench/compiled.py: every kernel compiles for every target (Hopper, Ampere, datacenter and
consumer Blackwell, the 99 KB parts sm_86, sm_89 and sm_120), ahead of time on the CPU, and fits
the shared memory a program may use there; the compiled code keeps the static goals of issue 13:
no register spills, warpgroup MMA for attention tiles of 64 rows or more, TMA loads where a
candidate asks for them, grids that fill the GPU.

The report runs in a subprocess without TRITON_INTERPRET (this suite interprets the kernels,
and interpreted kernels cannot be compiled), once per architecture for the whole module, on the
quick set: bf16, one benchmark shape per op and pass, every autotune candidate on sm_90a and
a subset on the other targets (OTHER_TARGETS). bench/results/compiled-<arch>.md hold the full
reports.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compiled

ROOT = Path(__file__).resolve().parents[2]


def report(tmp_path_factory, *flags: str) -> list[dict]:
    out = tmp_path_factory.mktemp("compiled") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-m", "bench.compiled", "--quick", "--json", str(out), *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def hopper(tmp_path_factory) -> list[dict]:
    return report(tmp_path_factory, "--arch", "sm_90a")


# The other targets' quick subsets (sm_90a compiles every candidate): the first candidate of each
# launch on sm_80 and on the two 99 KB codegens, sm_86 (Ampere's, as sm_89's) and sm_120
# (Blackwell's pipeline with warp MMAs), about 40 compiles and 35-45 s of CPU each on a cold
# cache; each kernel once (its first specialization, about 14 compiles, 12-15 s) on sm_89 and sm_100a.
OTHER_TARGETS = {"sm_80": "--one-config", "sm_86": "--one-config", "sm_120": "--one-config",
                 "sm_89": "--kernels-once", "sm_100a": "--kernels-once"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """arch -> its quick subset's report, compiled once for the module."""
    done: dict[str, list[dict]] = {}

    def rows(arch: str) -> list[dict]:
        if arch not in done:
            done[arch] = report(tmp_path_factory, "--arch", arch, OTHER_TARGETS[arch])
        return done[arch]
    return rows


def is_attention(row: dict) -> bool:
    return "attention" in row["kernel"]


@pytest.mark.parametrize("arch", OTHER_TARGETS)
def test_every_kernel_compiles_and_fits_every_target(hopper, reports, arch):
    """The same kernels as on sm_90a compile, and every program fits the target's shared memory
    (over it, a launch fails: the plans must prune what does not fit)."""
    rows = reports(arch)
    assert [r for r in rows if "error" in r] == []
    assert {r["kernel"] for r in rows} == {r["kernel"] for r in hopper}
    assert [(r["kernel"], r["spec"], r["shared"]) for r in rows if not r["fits"]] == []


@pytest.mark.parametrize("arch", OTHER_TARGETS)
def test_no_kernel_spills_on_any_target(reports, arch):
    assert [(r["kernel"], r["spec"], r["num_warps"]) for r in reports(arch)
            if r["spill_stores"] or r["spill_loads"]] == []


def test_every_kernel_compiles_for_sm90a(hopper):
    assert [r for r in hopper if "error" in r] == []
    assert all(r["fits"] for r in hopper)
    kernels = {r["kernel"] for r in hopper}
    assert {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
            "_cross_entropy_fwd_kernel", "_cross_entropy_bwd_kernel", "_attention_fwd_kernel",
            "_attention_delta_kernel", "_attention_dkdv_kernel", "_attention_dq_kernel",
            "_causal_attention_decode_kernel", "_causal_attention_combine_kernel", "_quantized_linear_fwd_kernel",
            "_rotary_fwd_kernel"} <= kernels


def test_no_selectable_candidate_spills(hopper):
    spilling = [(r["kernel"], r["spec"], r["num_warps"]) for r in hopper if r["spill_stores"] or r["spill_loads"]]
    assert spilling == []


def test_attention_tiles_of_64_rows_use_wgmma_and_tma_candidates_use_tma(hopper):
    attention = [r for r in hopper if is_attention(r) and "BLOCK_N" in r["spec"]]
    wide = [r for r in attention if int(compiled.constexprs_of(r)["BLOCK_M"]) >= 64]
    assert wide and all(r["hgmma"] > 0 for r in wide)
    tma = [r for r in attention if compiled.constexprs_of(r).get("USE_TMA") == "True"]
    assert {r["kernel"] for r in tma} == {"_attention_fwd_kernel", "_attention_dkdv_kernel", "_attention_dq_kernel"}
    assert all(r["utmaldg"] > 0 for r in tma)


def test_attention_backward_fits_two_programs_per_sm(hopper):
    for head_dim in ("64", "128"):
        dkdv = [r for r in hopper if r["kernel"] == "_attention_dkdv_kernel"
                and compiled.constexprs_of(r)["HEAD_DIM"] == head_dim]
        assert max(r["programs_per_sm"] for r in dkdv) >= 2


def test_grids_fill_the_gpu(hopper):
    """Decoding spreads over at least 2 waves; the RMSNorm backward's fixed grid is resident at
    once; the cross-entropy inside linear cross-entropy runs at least 4 waves per chunk."""
    decode = [r for r in hopper if r["kernel"] == "_causal_attention_decode_kernel"]
    assert decode and all(w >= 2 for r in decode for s, w in r["waves"].items() if "H=32/8 T=1/4096" in s)
    rms_backward = [r for r in hopper if r["kernel"] == "_rms_norm_bwd_kernel"]
    assert rms_backward and all(w <= 1 for r in rms_backward for w in r["waves"].values())
    lce = [r for r in hopper if r["op"] == "linear_cross_entropy fwd"]
    assert lce and all(w >= 4 for r in lce for w in r["waves"].values())


def test_decode_with_key_lengths_is_its_own_specialization(hopper):
    """Per-row key lengths specialize the split kernel only (a None pointer otherwise), and it
    still runs on warpgroup MMA."""
    rows = [r for r in hopper if r["kernel"] == "_causal_attention_decode_kernel"
            and any("key_lengths" in s for s in r["shapes"])]
    assert len(rows) == 1 and all("key_lengths" in s for s in rows[0]["shapes"])
    assert rows[0]["hgmma"] > 0


def test_quantized_linear_runs_on_warpgroup_mma_and_fills_the_gpu_when_decoding(hopper):
    """Both formats and both paths dequantize into HGMMA on Hopper; a one-row decode step splits K
    until every one of the 132 SMs has programs to run."""
    rows = [r for r in hopper if r["kernel"] == "_quantized_linear_fwd_kernel"]
    assert {compiled.constexprs_of(r)["FP4"] for r in rows} == {"True", "False"}
    assert all(r["hgmma"] > 0 for r in rows)
    decode = [grid for r in rows for s, grid in r["shapes"].items() if s.startswith("M=1 ")]
    assert decode and min(decode) >= compiled.TARGETS["sm_90a"].sms
    assert any(compiled.constexprs_of(r)["SPLIT"] == "True" for r in rows)


def test_sass_facts_read_the_instructions():
    sass = """
        /*0100*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0110*/              @!P0 LDG.E.U16 R8, desc[UR6][R6.64] ;
        /*0120*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0130*/                   UTMALDG.2D [UR8], [UR10] ;
        /*0140*/                   STL.64 [R1], R4 ;
    """
    facts = compiled.sass_facts(sass)
    assert facts == {"hgmma": 1, "hmma": 0, "utmaldg": 1, "local": 1, "loads": {"128": 1, "16": 1}}


def test_occupancy_counts_registers_shared_memory_and_threads():
    h100 = compiled.TARGETS["sm_90a"]
    spec = compiled.Spec("m", "k", (), (), (), num_warps=4, num_stages=3)
    assert compiled.programs_per_sm({"registers": 255, "shared": 0}, spec, h100) == 2      # 64K regs / (256 * 128)
    assert compiled.programs_per_sm({"registers": 32, "shared": 100 * 1024}, spec, h100) == 2   # shared memory
    assert compiled.programs_per_sm({"registers": 16, "shared": 0}, spec, h100) == 16     # 2048 threads
    rtx = compiled.TARGETS["sm_86"]                              # 1536 threads, 100 KB, 16 programs
    assert compiled.programs_per_sm({"registers": 16, "shared": 0}, spec, rtx) == 12      # 1536 threads
    assert compiled.programs_per_sm({"registers": 32, "shared": 49 * 1024}, spec, rtx) == 2   # 100 KB
    one_warp = dataclasses.replace(spec, num_warps=1)
    assert compiled.programs_per_sm({"registers": 16, "shared": 0, "warps": 1}, one_warp, rtx) == 16


def test_targets_match_the_programming_guide():
    """Per compute capability: shared memory per SM and per program, threads and programs per SM."""
    limits = {arch: (t.capability, t.smem_per_sm // 1024, t.smem_per_block // 1024, t.threads_per_sm,
                     t.programs_per_sm) for arch, t in compiled.TARGETS.items()}
    assert limits == {"sm_80": (80, 164, 163, 2048, 32), "sm_86": (86, 100, 99, 1536, 16),
                      "sm_89": (89, 100, 99, 1536, 24), "sm_90a": (90, 228, 227, 2048, 32),
                      "sm_100a": (100, 228, 227, 2048, 32), "sm_120": (120, 100, 99, 1536, 32)}


def test_refuses_interpreted_kernels(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert compiled.main(["--quick"]) == 2
    assert "unset it" in capsys.readouterr().err
