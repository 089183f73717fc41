"""What the GPU will run, without a GPU: every kernel specialization compiled ahead of time.

    python -m bench.compiled [--arch sm_90a|sm_80|sm_100a|sm_86|sm_89|sm_120] [--quick] [--md FILE] [--json FILE]

Targets (TARGETS): sm_90a (H100/H200), sm_80 (A100), sm_100a (B200), sm_86 (RTX 3090, A10, A40),
sm_89 (RTX 4090, L40S) and sm_120 (RTX 5090; triton emits sm_120a code, as it does sm_90a and
sm_100a). The last three give a program 99 KB of shared memory, against 163-227 KB: every plan
must prune its candidates to the Gpu's smem_per_block.

Method. For each op, pass and benchmark shape (the model's training shapes: 16k rows of bf16 at
hidden sizes 1k-8k, SwiGLU widths 11008 and 14336, vocabularies 32000 and 128256; attention in bf16
and fp16 at sequence lengths 512-16k and head dims 64 and 128, plus decode steps, with and without
per-row key lengths), build the launchers' own plan (``plan_forward`` /
``plan_backward`` of kernels/triton_<op>.py) from meta tensors and the target's ``Gpu``, so the
grids, the fixed configs and the autotune candidates left after pruning are exactly those of a
launch. Each launch is bound by triton's own argument binder, so the signature carries the same
divisibility and constant specializations (16-byte-aligned pointers, strides of 1) as a real
launch. Every distinct (kernel, specialization, config) is compiled once with ``triton.compile``
for the target on the CPU, then:

- registers and spill bytes from ``ptxas -v`` (run again on the PTX with triton's flags;
  cuobjdump's LOCAL column reads 0 because spills land in the stack frame);
- shared memory from the compiled metadata, against what one program may opt in to (over it, a
  launch fails: the plan should have pruned the config);
- programs per SM from registers (allocated per warp in units of 256), shared memory (plus the
  1 KB each program reserves) and threads, and waves = grid / (SMs * programs per SM), per shape;
- from the SASS (cuobjdump -sass): warpgroup MMAs (HGMMA, Hopper) against warp MMAs (HMMA),
  TMA loads (UTMALDG), local-memory traffic (LDL/STL) and the width of every global load.

Compiles run in worker processes (as many as CPUs); results are cached by triton's kernel hash
under ~/.cache/tritongpt/compiled, so a rerun only compiles what changed. Needs TRITON_INTERPRET
unset: interpreted kernels cannot be compiled.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from model.command import Parser

CACHE = Path(os.environ.get("TRITONGPT_COMPILED_CACHE", Path.home() / ".cache" / "tritongpt" / "compiled"))


@dataclasses.dataclass(frozen=True)
class Target:
    arch: str
    capability: int
    sms: int
    smem_per_sm: int          # bytes of shared memory per SM
    smem_per_block: int       # bytes one program may opt in to
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    programs_per_sm: int = 32


# Per-SM limits from the CUDA programming guide's technical specifications per compute capability
# (64K registers everywhere; 8.6, 8.9 and 12.0 keep 1536 threads and 100 KB of shared memory per
# SM, 99 KB per program, the 1 KB left reserved per program as everywhere); the SM counts are
# those of the part named.
TARGETS = {
    "sm_90a": Target("sm_90a", 90, sms=132, smem_per_sm=228 * 1024, smem_per_block=227 * 1024),   # H100/H200 SXM
    "sm_80": Target("sm_80", 80, sms=108, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),     # A100
    "sm_100a": Target("sm_100a", 100, sms=148, smem_per_sm=228 * 1024, smem_per_block=227 * 1024),  # B200
    # RTX 3090 Ti, A40, RTX A6000 (84 SMs; RTX 3090: 82, A10: 72)
    "sm_86": Target("sm_86", 86, sms=84, smem_per_sm=100 * 1024, smem_per_block=99 * 1024, threads_per_sm=1536,
                    programs_per_sm=16),
    # RTX 4090 (128 SMs; L40S: 142)
    "sm_89": Target("sm_89", 89, sms=128, smem_per_sm=100 * 1024, smem_per_block=99 * 1024, threads_per_sm=1536,
                    programs_per_sm=24),
    # RTX 5090 (170 SMs), consumer Blackwell: warp MMAs like Ampere, no warpgroup MMA or tensor memory
    "sm_120": Target("sm_120", 120, sms=170, smem_per_sm=100 * 1024, smem_per_block=99 * 1024, threads_per_sm=1536,
                     programs_per_sm=32),
}


@dataclasses.dataclass
class Planned:
    """One launch of a plan at one shape: what bench.compiled compiles."""
    op: str
    shape: str
    dtype: str
    launch: Any


# ----------------------------------------------------------------------------- the launches

def planned(gpu, quick: bool) -> Iterator[Planned]:
    """Every launch the launchers plan at the benchmark shapes (quick: one shape per op and pass)."""
    import torch

    from tritongpt.kernels import triton_attention_decode as decode, triton_attention as att
    from tritongpt.kernels import triton_cross_entropy as ce, triton_rms_norm as rn
    from tritongpt.kernels import quantization, triton_quantized_linear as ql, triton_rotary as ro, triton_swiglu as sw
    from tritongpt.kernels.launching import default_chunk_rows

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device="meta")

    f32, i64 = torch.float32, torch.int64
    M = 16384
    for D in (4096, 8192) if quick else (1024, 2048, 4096, 8192):
        x, w, rstd = meta(M, D), meta(D), meta(M, dtype=f32)
        for residual in (False, True):
            label = f"M={M} D={D}" + (" +residual" if residual else "")
            for launch in rn.plan_forward(x, w, meta(M, D), rstd, 1e-6, x if residual else None,
                                          meta(M, D) if residual else None, gpu):
                yield Planned("rms_norm fwd", label, "bf16", launch)
            programs, _ = rn.backward_programs(M, D, gpu)
            for launch in rn.plan_backward(x, x, w, rstd, x if residual else None, meta(M, D),
                                           meta(programs, D, dtype=f32), gpu):
                yield Planned("rms_norm bwd", label, "bf16", launch)
    for width in (14336,) if quick else (11008, 14336):
        g = meta(M, width)
        for launch in sw.plan_forward(g, g, g, gpu):
            yield Planned("swiglu fwd", f"M={M} F={width}", "bf16", launch)
        for launch in sw.plan_backward(g, g, g, g, g, gpu):
            yield Planned("swiglu bwd", f"M={M} F={width}", "bf16", launch)
    # RoPE of q and k, views of a fused qkv projection: 16k training tokens with the (T, 1, D)
    # tables, and a batched decode step (T = 1) with per-row (B, 1, 1, D) tables.
    for B, T, Hq, Hkv, per_row in [(4, 4096, 32, 8, False)] if quick else [
            (4, 4096, 32, 8, False), (4, 4096, 32, 32, False), (64, 1, 32, 8, True)]:
        qkv = meta(B, T, Hq + 2 * Hkv, 128)
        q, k = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv]
        table = meta(*((B,) if per_row else ()), T, 1, 128, dtype=f32)
        q_out, k_out = meta(B, T, Hq, 128), meta(B, T, Hkv, 128)
        label = f"B={B} T={T} H={Hq}/{Hkv} D=128" + (" per-row tables" if per_row else "")
        for launch in ro.plan_forward(q, k, table, table, q_out, k_out, gpu):
            yield Planned("rotary fwd", label, "bf16", launch)
        for launch in ro.plan_backward(q_out, k_out, table, table, q_out, k_out, gpu):
            yield Planned("rotary bwd", label, "bf16", launch)

    def cross_entropy(op, n, vocab, write_grad):
        logits, t, rows = meta(n, vocab), meta(n, dtype=i64), meta(n, dtype=f32)
        one = meta(1, dtype=f32)
        label = f"N={n} V={vocab}"
        for launch in ce.plan_forward(logits, t, rows, rows, rows, -100, 0.0, 0.0,
                                      logits if write_grad else None, one if write_grad else None, gpu):
            yield Planned(f"{op} fwd", label, "bf16", launch)
        for launch in ce.plan_backward(logits, t, rows, rows, one, logits, -100, 0.0, 0.0, gpu):
            yield Planned(f"{op} bwd", label, "bf16", launch)

    for vocab in (128256,) if quick else (32000, 128256):
        yield from cross_entropy("cross_entropy", M, vocab, False)
        # linear_cross_entropy runs the same kernels on each chunk of rows, writing the gradient
        yield from cross_entropy("linear_cross_entropy", default_chunk_rows(M, vocab, torch.device("cuda"),
                                                                    torch.bfloat16.itemsize),
                                 vocab, True)

    for fmt in quantization.FORMATS:
        # decoding rows (M <= 16, the skinny path, split along K where N is narrow) and a prefill
        for M, KN in [(1, 4096), (16, 4096), (M, 4096)] if quick else [
                *((m, kn) for m in (1, 4, 16) for kn in (2048, 4096, 8192)), (M, 4096)]:
            (qshape, sshape), (qdtype, sdtype) = quantization.shapes(fmt, KN, KN), quantization.storage_dtypes(fmt)
            x = meta(M, KN)
            _, _, splits = ql.geometry(M, KN, KN, fmt, x.dtype, gpu)
            out = meta(splits, M, KN, dtype=f32) if splits > 1 else meta(M, KN)
            for launch in ql.plan_forward(x, meta(*qshape, dtype=qdtype), meta(*sshape, dtype=sdtype), fmt, out, gpu):
                yield Planned(f"quantized_linear {fmt}", f"M={M} K=N={KN}", "bf16", launch)

    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
        shapes = [(M // T, 2048 // D, 2048 // D, T, T, D) for T in ((4096,) if quick else
                                                                     (512, 1024, 2048, 4096, 8192, 16384))
                  for D in (64, 128)]
        shapes += [(1, 32, 8, 1, 4096, 128), (1, 32, 8, 16, 4096, 128)]        # decode, verification
        for B, Hq, Hkv, Tq, Tk, D in shapes:
            q, k = meta(B, Hq, Tq, D, dtype=dtype), meta(B, Hkv, Tk, D, dtype=dtype)
            lse = meta(B, Hq, Tq, dtype=f32)
            label = f"B={B} H={Hq}/{Hkv} T={Tq}/{Tk} D={D}"
            for launch in att.plan_forward(q, k, k, D ** -0.5, meta(B, Hq, Tq, D, dtype=dtype), lse, gpu):
                yield Planned("causal_attention fwd", label, name, launch)
            if Tq == Tk:
                for launch in att.plan_backward(q, q, k, k, q, lse, D ** -0.5, meta(B, Hq, Tq, D, dtype=dtype),
                                                meta(B, Hkv, Tk, D, dtype=dtype), meta(B, Hkv, Tk, D, dtype=dtype),
                                                lse, gpu):
                    yield Planned("causal_attention bwd", label, name, launch)
        # kernels.attention's other masks (sliding windows, softcap, non-causal) and packed sequences
        # (varlen: 16k tokens in documents of up to 4096), at head dims 64 and 128.
        T = 4096
        masks = {"window 511": att.Mask(511, 0), "window 4095": att.Mask(4095, 0), "softcap 50": att.Mask(softcap=50.0),
                 "non-causal": att.Mask(att.UNBOUNDED, att.UNBOUNDED)}
        for D in ((128,) if quick else (64, 128)):
            H = 2048 // D
            for mask_name, mask in (list(masks.items())[::2] if quick else masks.items()):   # quick: window, softcap
                q, lse = meta(M // T, H, T, D, dtype=dtype), meta(M // T, H, T, dtype=f32)
                label = f"B={M // T} H={H} T={T} D={D} {mask_name}"
                for launch in att.plan_forward(q, q, q, D ** -0.5, q, lse, gpu, mask):
                    yield Planned("attention fwd", label, name, launch)
                for launch in att.plan_backward(q, q, q, q, q, lse, D ** -0.5, q, q, q, lse, gpu, mask):
                    yield Planned("attention bwd", label, name, launch)
            q, lse, cu = meta(M, H, D, dtype=dtype), meta(H, M, dtype=f32), meta(17, dtype=torch.int32)
            packed = att.Packed(cu, cu, T, T)
            label = f"total={M} H={H} D={D} max_seqlen={T}"
            for launch in att.plan_forward(q, q, q, D ** -0.5, q, lse, gpu, att.CAUSAL, packed):
                yield Planned("varlen_attention fwd", label, name, launch)
            for launch in att.plan_backward(q, q, q, q, q, lse, D ** -0.5, q, q, q, lse, gpu, att.CAUSAL, packed):
                yield Planned("varlen_attention bwd", label, name, launch)
        # A serving engine's batched decode step, each row to its own length in a cache of 4096.
        # Only the split kernel specializes on the lengths: the combine is the one planned above.
        B, Hq, Hkv, Tk, D = 8, 32, 8, 4096, 128
        q, k = meta(B, Hq, 1, D, dtype=dtype), meta(B, Hkv, Tk, D, dtype=dtype)
        split = decode.plan_forward(q, k, k, D ** -0.5, meta(B, Hq, 1, D, dtype=dtype), meta(B, Hq, 1, dtype=f32),
                                    gpu, key_lengths=meta(B, dtype=torch.int32))[0]
        yield Planned("causal_attention fwd", f"B={B} H={Hq}/{Hkv} Tq=1 Tk<={Tk} D={D} key_lengths", name, split)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One compile: a kernel, its specialized signature and one config (all plain, picklable data)."""
    module: str
    kernel: str
    signature: tuple
    constexprs: tuple
    attrs: tuple
    num_warps: int
    num_stages: int

    def label(self) -> str:
        """The kernel's own constexpr arguments (not the arguments triton specialized to 1)."""
        declared = {p.name for p in getattr(importlib.import_module(self.module), self.kernel).params
                    if p.is_constexpr}
        return " ".join(f"{n}={v}" for n, v in self.constexprs if n in declared)


def bind(planned_launch: Planned, target: Target, one_config: bool = False) -> list[tuple[Spec, int]]:
    """(spec, grid size) for every candidate config of a planned launch (one_config: the first
    only), through triton's binder."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    launch = planned_launch.launch
    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", target.capability, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    out = []
    for config in launch.configs[:1] if one_config else launch.configs:
        kwargs = {**launch.constexprs, **config}
        launch.named(config)          # runs launch.prepare: descriptor tiles are part of the signature
        bound, specialization, options = binder(**launch.args, **kwargs)
        _, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, specialization, options)
        names = kernel.arg_names
        grid = math.prod(launch.grid(kwargs))
        spec = Spec(kernel.__module__, kernel.__name__, tuple(signature.items()),
                    tuple((names[k[0]], v) for k, v in sorted(constexprs.items())),
                    tuple((names[k[0]], tuple(map(tuple, v))) for k, v in sorted(attrs.items()) if v),
                    config["num_warps"], config["num_stages"])
        out.append((spec, grid))
    return out


# ----------------------------------------------------------------------------- compiling one spec

def _tool(name: str) -> str:
    import triton.backends.nvidia as nvidia
    return str(Path(nvidia.__file__).parent / "bin" / name)


def compile_spec(spec: Spec, target: Target) -> dict:
    """Compile one spec for the target and read its registers, spills, shared memory and SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    names = fn.arg_names
    source = ASTSource(fn, dict(spec.signature), {(names.index(n),): v for n, v in spec.constexprs},
                       {(names.index(n),): [list(a) for a in v] for n, v in spec.attrs})
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", target.capability, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as error:  # a compile error is a finding of the report, not a crash of it
        while error.__cause__ is not None:   # a jit function's error wraps its callee's: the root says why
            error = error.__cause__
        lines = [line.strip() for line in str(error).splitlines() if line.strip() not in ("", "^")]
        return {"error": f"{type(error).__name__}: {lines[-1].split('. ')[0] if lines else ''}"}
    key = f"{target.arch}-{compiled.metadata.hash}"
    cached = CACHE / f"{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        # The PTX's own target (triton's: sm_120a for sm_120), which ptxas must be given exactly.
        done = subprocess.run([get_ptxas(target.capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(target.capability)}", str(ptx), "-o",
                               str(Path(tmp) / "v.cubin")], capture_output=True, text=True)
        if done.returncode:
            lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            return {"error": f"ptxas: {lines[-1] if lines else done.returncode}"}
        log = done.stderr
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    result = {"registers": _number(r"Used (\d+) registers", log),
              "spill_stores": _number(r"(\d+) bytes spill stores", log),
              "spill_loads": _number(r"(\d+) bytes spill loads", log),
              "stack": _number(r"(\d+) bytes stack frame", log),
              "shared": compiled.metadata.shared, "warps": compiled.metadata.num_warps, **sass_facts(sass)}
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp_file = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_file.write_text(json.dumps(result))
    tmp_file.replace(cached)
    return result


def _number(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    return int(found.group(1)) if found else 0


def sass_facts(sass: str) -> dict:
    """Tensor-core, TMA, local-memory and global-load facts of one kernel's SASS."""
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)
    loads: dict[str, int] = {}
    for op in opcodes:
        if op.startswith("LDG") or op.startswith("LDGSTS"):
            width = next((w for w in ("128", "64") if f".{w}" in op), "32" if ".U16" not in op and ".S16" not in op
                         and ".U8" not in op else "16")
            loads[width] = loads.get(width, 0) + 1
    return {"hgmma": sum(op.startswith("HGMMA") for op in opcodes),
            "hmma": sum(op.startswith("HMMA") for op in opcodes),
            "utmaldg": sum(op.startswith("UTMALDG") for op in opcodes),
            "local": sum(op.startswith(("LDL", "STL")) for op in opcodes),
            "loads": dict(sorted(loads.items(), key=lambda kv: -int(kv[0])))}


def programs_per_sm(result: dict, spec: Spec, target: Target) -> int:
    """Resident programs per SM, limited by registers, shared memory and threads (with the warps
    the compiler gave the program: warp specialization adds producer warps)."""
    warps = result.get("warps", spec.num_warps)
    threads = 32 * warps
    regs_per_warp = math.ceil(max(result["registers"], 1) * 32 / 256) * 256
    by_regs = (target.regs_per_sm // regs_per_warp) // warps
    by_smem = target.smem_per_sm // (result["shared"] + 1024)
    return max(0, min(by_regs, by_smem, target.threads_per_sm // threads, target.programs_per_sm))


# ----------------------------------------------------------------------------- the report

def build(target: Target, quick: bool, jobs: int, one_config: bool = False, kernels_once: bool = False) -> list[dict]:
    """One row per distinct (kernel, specialization, config), with the shapes that launch it
    (kernels_once: only the first specialization and config of each kernel)."""
    from tritongpt.kernels.launching import Gpu

    gpu = Gpu(sms=target.sms, smem_per_block=target.smem_per_block, capability=target.capability)
    rows: dict[Spec, dict] = {}
    for item in planned(gpu, quick):
        for spec, grid in bind(item, target, one_config or kernels_once):
            if kernels_once and spec not in rows and any(s.kernel == spec.kernel for s in rows):
                continue
            row = rows.setdefault(spec, {"op": item.op, "dtype": item.dtype, "kernel": spec.kernel,
                                         "spec": spec.label(), "num_warps": spec.num_warps,
                                         "num_stages": spec.num_stages, "shapes": {}})
            row["shapes"][item.shape] = grid
    specs = list(rows)
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        for spec, result in zip(specs, pool.map(compile_spec, specs, [target] * len(specs))):
            row = rows[spec]
            row.update(result)
            if "error" not in result:
                # A program over the opt-in limit fails at launch (triton's OutOfResources).
                row["fits"] = result["shared"] <= target.smem_per_block
                per_sm = programs_per_sm(result, spec, target)
                row["programs_per_sm"] = per_sm
                row["waves"] = {s: g / (target.sms * per_sm) if per_sm else math.inf for s, g in row["shapes"].items()}
    return list(rows.values())


def constexprs_of(row: dict) -> dict:
    """A row's constexprs as {name: text}."""
    return dict(item.split("=") for item in row["spec"].split())


def goals(rows: list[dict], target: Target) -> list[str]:
    """The static goals of issue 13, as measured in these rows."""
    built = [r for r in rows if "error" not in r]
    tiled = [r for r in built if r["kernel"].startswith(("_attention", "_causal_attention")) and "BLOCK_N" in r["spec"]]
    wide = [r for r in tiled if int(constexprs_of(r)["BLOCK_M"]) >= 64]
    tma = [r for r in tiled if constexprs_of(r).get("USE_TMA") == "True"]
    decode = [w for r in built if r["kernel"] == "_causal_attention_decode_kernel"
              for shape, w in r["waves"].items() if "H=32/8 T=1/4096" in shape]
    lines = [f"- compiled: {len(built)} of {len(rows)} specializations",
             f"- without register spills: {sum(not (r['spill_stores'] or r['spill_loads']) for r in built)} "
             f"of {len(built)}",
             f"- within the {target.smem_per_block // 1024} KB of shared memory a program may use: "
             f"{sum(r['fits'] for r in built)} of {len(built)}",
             f"- attention tiles of >= 64 rows on warpgroup MMA (HGMMA): {sum(r['hgmma'] > 0 for r in wide)} "
             f"of {len(wide)}",
             f"- TMA candidates loading through TMA (UTMALDG): {sum(r['utmaldg'] > 0 for r in tma)} of {len(tma)}"]
    if decode:
        lines.append(f"- decode step B=1 Hq=32 Hkv=8 Tk=4096: {min(decode):.2f} waves")
    for head_dim in sorted({constexprs_of(r)["HEAD_DIM"] for r in tiled}, key=int):
        dkdv = [r["programs_per_sm"] for r in tiled
                if r["kernel"] == "_attention_dkdv_kernel" and constexprs_of(r)["HEAD_DIM"] == head_dim]
        if dkdv:
            lines.append(f"- dK/dV at head dim {head_dim}: at most {max(dkdv)} programs per SM")
    return lines


def markdown(rows: list[dict], target: Target, command: str) -> str:
    lines = [f"# Compiled kernels for {target.arch} ({target.sms} SMs)", "",
             f"Generated on a CPU by `{command}` (every kernel specialization and autotune candidate "
             "the launchers plan at the benchmark shapes, compiled ahead of time; method in "
             "bench/compiled.py). Waves: grid / (SMs x resident programs per SM), the range over the "
             "shapes that launch the row.", "", *goals(rows, target),
             "", "| op | dtype | kernel | constexprs | warps/stages | regs | spill B (st/ld) | smem KB | "
             "programs/SM | waves | MMA | TMA | global loads (bits: count) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['dtype']} | {r['kernel']} | {r['spec']} | {r['num_warps']}/"
                         f"{r['num_stages']} | compile error: {r['error']} |||||||")
            continue
        waves = sorted(r["waves"].values())
        wave_text = f"{waves[0]:.2f}" if len(waves) == 1 or waves[0] == waves[-1] else f"{waves[0]:.2f}-{waves[-1]:.2f}"
        mma = f"HGMMA {r['hgmma']}" if r["hgmma"] else (f"HMMA {r['hmma']}" if r["hmma"] else "-")
        loads = " ".join(f"{w}:{n}" for w, n in r["loads"].items()) or "-"
        warps = f"{r['num_warps']}" + (f" ({r['warps']})" if r.get("warps", r["num_warps"]) != r["num_warps"] else "")
        lines.append(f"| {r['op']} | {r['dtype']} | `{r['kernel']}` | {r['spec']} | {warps}/{r['num_stages']}"
                     f" | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['shared'] / 1024:.1f}"
                     f"{'' if r['fits'] else ' (over the limit)'} | "
                     f"{r['programs_per_sm']} | {wave_text} | {mma} | {r['utmaldg'] or '-'} | {loads} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m bench.compiled", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(TARGETS), default="sm_90a", help="the GPU target to compile for")
    parser.add_argument("--quick", action="store_true", help="one benchmark shape per op and pass, bf16 only (CI)")
    parser.add_argument("--one-config", action="store_true",
                        help="compile only the first candidate of each launch (does every kernel compile?)")
    parser.add_argument("--kernels-once", action="store_true",
                        help="compile each kernel once: its first specialization and candidate (a smoke test)")
    parser.add_argument("--md", type=Path, help="also write the markdown report to this file")
    parser.add_argument("--json", type=Path, help="write the rows as JSON to this file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile worker processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("error: TRITON_INTERPRET=1 makes the kernels interpreted, so they cannot be compiled; "
              "unset it and run again", file=sys.stderr)
        return 2
    target = TARGETS[args.arch]
    rows = build(target, args.quick, max(1, args.jobs), args.one_config, args.kernels_once)
    command = (f"python -m bench.compiled --arch {args.arch}" + " --quick" * args.quick
               + " --one-config" * args.one_config + " --kernels-once" * args.kernels_once)
    text = markdown(rows, target, command)
    print(text, end="")
    for path, content in ((args.md, text), (args.json, json.dumps(rows, indent=1, default=str))):
        if path is not None:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(content)
            tmp.replace(path)
    return 1 if any("error" in r or not r["fits"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
