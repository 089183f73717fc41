"""Helpers the launchers share: launch plans, the GPU they plan for, row views, loss plumbing.

A launcher does not call its kernels directly: it builds a plan, a list of ``Launch`` values
(kernel, grid, arguments by name, the candidate configs), from its tensors and a ``Gpu``, and
runs it. A kernel autotuned over several tiles gets its launches from an ``Autotune`` of named
``Tile`` configs.
bench/compiled.py builds the same plans from meta tensors and a compile target's ``Gpu`` and
compiles them ahead of time, so what it reports is what a launch would run, without a GPU.

Nothing here imports triton, so kernels/__init__.py and kernels/reference.py can use it while
``import tritongpt.kernels`` stays cheap.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import torch

# Stands in for the SM count when the interpreter runs the kernels on the CPU.
INTERPRETER_SMS = 4


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What a launch plan knows of the GPU it plans for: a real device or a compile target."""
    sms: int                  # streaming multiprocessors
    smem_per_block: int       # bytes of shared memory one program may opt in to
    capability: int = 0       # compute capability as major * 10 + minor (90: Hopper); 0: interpreter

    @property
    def hopper_class(self) -> bool:
        """Hopper and datacenter Blackwell (sm_90, sm_100, sm_103): MMAs that read their operands
        from shared memory (wgmma, tcgen05) and TMA. Not consumer Blackwell (sm_120), whose
        mma.sync holds them in registers as Ampere and Ada do."""
        return 90 <= self.capability < 120

    @property
    def datacenter_blackwell(self) -> bool:
        """sm_100 and sm_103 (B200, B300). There triton pairs fp32 arithmetic (f32x2) and ptxas, given
        no .maxnreg, picks its own occupancy target (128 registers for 8 warps, 64-72 for some 4-warp
        kernels) and spills what does not fit it; plans leave out the tiles that overflow it."""
        return 100 <= self.capability < 120


# The interpreter has no shared-memory limit; its plans use fixed small tiles anyway.
INTERPRETER_GPU = Gpu(sms=INTERPRETER_SMS, smem_per_block=2**30)


@dataclasses.dataclass
class Launch:
    """One kernel launch as a plain value.

    args are the kernel's run-time arguments by name (the constexprs apart), so a launcher never
    lists strides by position. configs are the candidate meta-parameters, each a dict of
    constexprs plus num_warps and num_stages; there is exactly one unless ``tuner`` (a triton
    autotuner over the same kernel) picks among them by measurement at run time. grid maps the
    chosen meta-parameters (constexprs and config together) to the launch grid. prepare, when
    set, adjusts the arguments to a config before it runs (it is also the autotuner's pre-hook):
    it gets the kernel's arguments by name with the constexprs and the config.
    """
    kernel: Any
    grid: Callable[[dict], tuple[int, ...]]
    args: dict[str, Any]
    constexprs: dict
    configs: list[dict]
    tuner: Any = None
    prepare: Callable[[dict], None] | None = None

    def named(self, config: dict) -> dict:
        """The kernel's arguments by name, with the constexprs and config, after prepare."""
        named = {**self.args, **self.constexprs, **config}
        if self.prepare is not None:
            self.prepare(named)
        return named

    @classmethod
    def fixed(cls, kernel: Any, grid: tuple[int, ...], args: dict[str, Any], num_warps: int, num_stages: int = 3,
              **constexprs: Any) -> Launch:
        """A launch with one config and a grid that does not depend on it."""
        return cls(kernel, lambda meta: grid, args, constexprs, [{"num_warps": num_warps, "num_stages": num_stages}])

    def __call__(self) -> None:
        if self.tuner is not None:
            self.tuner[self.grid](**self.args, **self.constexprs)
            return
        (config,) = self.configs
        if self.prepare is not None:          # no per-launch dict for the plain kernels
            self.named(config)
        self.kernel[self.grid({**self.constexprs, **config})](**self.args, **self.constexprs, **config)


@dataclasses.dataclass(frozen=True)
class Tile:
    """One candidate config of a tiled kernel, by name: a block_m x block_n tile, warps, pipeline
    stages, whether it streams its tiles through TMA descriptors (tma), whether it is kept to
    Gpu.hopper_class targets (hopper; tma implies it), e.g. because it spills with the
    register-held MMA operands of sm_80, sm_86, sm_89 and sm_120, and whether it is left out on
    Gpu.datacenter_blackwell targets (spills_sm100) because it spills there."""
    block_m: int
    block_n: int
    warps: int
    stages: int
    tma: bool = False
    hopper: bool = False
    spills_sm100: bool = False

    def config(self) -> dict:
        """The kernel's meta-parameters: constexprs BLOCK_M, BLOCK_N, USE_TMA, num_warps, num_stages."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.warps,
                "num_stages": self.stages, "USE_TMA": self.tma}


class Autotune:
    """Launches of one kernel whose config is chosen among named Tiles.

    candidates(named, gpu) says which tiles a launch may run (named: its arguments and constexprs
    by name): on a GPU the autotuner measures those and keeps the fastest per value of key; in
    the interpreter (gpu.capability == 0) the plan runs the first, so candidates returns one
    there. The decision is taken per plan, from the Gpu it plans for, so nothing depends on the
    environment at import. The triton autotuner is made on the first GPU plan, over every tile
    in tiles, and prunes them with candidates at run time; prepare is its pre-hook (see Launch).
    """

    def __init__(self, kernel: Any, tiles: list[Tile], key: list[str],
                 candidates: Callable[[dict, Gpu], list[Tile]], prepare: Callable[[dict], None] | None = None):
        self.kernel, self.key, self.candidates, self.prepare = kernel, key, candidates, prepare
        self.configs = list({tuple(t.config().items()): t.config() for t in tiles}.values())   # distinct

    @functools.cached_property
    def tuner(self) -> Any:
        import triton   # here, not at the top: `import tritongpt.kernels` never imports triton

        configs = [triton.Config({k: v for k, v in c.items() if not k.startswith("num_")}, num_warps=c["num_warps"],
                                 num_stages=c["num_stages"], pre_hook=self.prepare) for c in self.configs]
        return triton.autotune(configs, key=self.key, prune_configs_by={"early_config_prune": self._prune})(self.kernel)

    def launch(self, grid: Callable[[dict], tuple[int, ...]], args: dict[str, Any], constexprs: dict,
               gpu: Gpu) -> Launch:
        """The Launch of the kernel on args with the candidates for gpu."""
        configs = [t.config() for t in self.candidates({**args, **constexprs}, gpu)]
        return Launch(self.kernel, grid, args, constexprs, configs, None if gpu.capability == 0 else self.tuner,
                      self.prepare)

    def _prune(self, configs: list, named_args: dict, **kwargs) -> list:
        named = {**named_args, **kwargs}
        device = next(v.device for v in named.values() if isinstance(v, torch.Tensor))
        keep = [t.config() for t in self.candidates(named, gpu_of(device))]
        return [c for c in configs if {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} in keep]


def run(plan: list[Launch]) -> None:
    for launch in plan:
        launch()


def gpu_of(device: torch.device) -> Gpu:
    """The Gpu of a tensor's device: INTERPRETER_GPU in the interpreter or off CUDA."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_GPU
    return _cuda_gpu(device)


@functools.cache
def _cuda_gpu(device: torch.device) -> Gpu:
    props = torch.cuda.get_device_properties(device)
    return Gpu(sms=props.multi_processor_count, smem_per_block=props.shared_memory_per_block_optin,
               capability=props.major * 10 + props.minor)


# Bytes of logits (and their gradient) one linear_cross_entropy chunk may hold at once. On a GPU
# 256 MiB keeps every chunk a large GEMM (>= 1024 rows of bf16 logits even at a 128k vocabulary,
# about 8 waves of the cross-entropy kernel's one-row programs on 132 SMs) while the default CUDA
# shape's full logits take 2 GiB (32k rows x 16k vocab). On the CPU 8 MiB is an eighth of the
# full logits of the default run (4096 rows x 4096 vocab: 64 MiB of fp32): 256 rows there, 128 at
# an 8k vocabulary, where CPU GEMMs run as fast as at thousands of rows; the chunk's logits and
# their softmax temporary stay small next to a training step's activations, whose peak the
# loss's forward reaches.
LCE_CHUNK_BUDGET_BYTES = {"cuda": 256 * 2**20, "cpu": 8 * 2**20}


def interpreting() -> bool:
    """True when the Triton interpreter runs the kernels (TRITON_INTERPRET=1, for tests).

    The one place that reads the variable. It reads the environment on every call, because the
    backend switch must see what a test sets at run time, and plans decide by it (through
    gpu_of) when they are made, never at import. Triton itself decides when a module's
    ``@triton.jit`` functions are created, at import, which is why tests/conftest.py sets it before
    triton is imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (M, D) with unit column stride, as the row kernels index it: rows by stride,
    columns by 1. Rows may keep any stride (no copy then); otherwise the result is a copy."""
    t2 = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def reduce_losses(losses: torch.Tensor, kept: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row losses (N,) reduced as every cross-entropy backend does: "none", "sum", or "mean"
    over the kept (non-ignored) rows, which is 0 when no row is kept."""
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / kept.sum().clamp(min=1)  # count stays on the device: no host sync


def default_chunk_rows(n_rows: int, vocab: int, device: torch.device, bytes_per_logit: int) -> int:
    """Rows per linear_cross_entropy chunk whose logits fit the device's budget, at bytes_per_logit
    (the torch path: 8, fp32 logits and their gradient; the Triton path: the compute dtype's
    size, as it overwrites its one buffer of logits with their gradient)."""
    budget = LCE_CHUNK_BUDGET_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(1, min(n_rows, budget // (bytes_per_logit * vocab)))


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick, or the promoted dtype of the inputs without it."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)
