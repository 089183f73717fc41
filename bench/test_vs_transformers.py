"""Our GPT against transformers' LlamaForCausalLM holding the same weights, in one process (issue 19).

Rows (backend "torch" is our GPT on the torch kernels, "triton" our GPT on our Triton kernels,
CUDA only, "transformers" LlamaForCausalLM with attn_implementation="sdpa", built by
model.hf.llama_model from the same weights, and on CUDA also "transformers-eager", the same with
attn_implementation="eager"):

- copy: `dst.copy_(src)` of 256 MiB, GB/s counting the read and the write once each (write-
  allocate traffic is not counted): the machine's copy bandwidth, measured in the same run.
- train_step: forward + backward + AdamW step (train.optim.make_optimizer) at the tiny preset
  (V=4096, B=8, T=256) and the small preset (V=8192, B=2, T=512), fp32 on CPU, bf16 autocast on
  CUDA, in tokens/s; both compute the same T-1 loss terms per row (transformers shifts its labels
  itself, so our last target is ignore_index). peak_MiB is the train step's peak memory: the
  model's parameters and buffers, the optimizer state, the batch, plus the peak above them during
  one step (after AdamW's state exists). On CUDA the peak above comes from
  torch.cuda.max_memory_allocated. On CPU it comes from torch.profiler(profile_memory=True): the
  profiler records every allocation and free in torch's CPU allocator with its size, and the
  running sum of those events in time order is the live total, whose maximum is the true peak of
  live tensor bytes, kernel-internal temporaries included (what max_memory_allocated counts on
  CUDA). A TorchDispatchMode tracking op outputs would miss the latter: torch.logsumexp's (N, V)
  temporary, for one, never surfaces as an op output. Memory that MKL or oneDNN allocate outside
  torch's allocator is not seen, for either model.
- generate: greedy generation from a 16-token prompt, 64 new tokens, batch 1 and 8: ours
  model.generate.generate (KV cache), transformers' generate(do_sample=False, max_new_tokens =
  min_new_tokens = 64). tokens/s counts new tokens; GB/s is the weight bytes read per second (all
  parameters once per decode step, the prefill counted as a step); bandwidth_fraction is that
  over the copy row's GB/s at the same thread count.

Every row runs at 1 thread and at all threads (torch.set_num_threads, restored after). Ours rows
carry vs_transformers (our tokens/s / transformers') and peak_vs_transformers (our peak /
transformers') in extra_info, written once both rows of a group have run, and
vs_transformers_paired: the median over paired rounds (as many as the row's timed rounds) of
transformers' (sdpa) seconds / ours, the two run back to back in
alternating order. A burst of load on a shared machine then slows both sides of one ratio, where
it may slow one whole row; the paired ratio is the one to quote.

On CPU the default set takes about 2 minutes on 2 quiet cores: the small preset runs one timed
round (a CPU train step there takes seconds), its train step only at all threads and its decode
only at batch 1, and a row whose rounds would take over ROW_BUDGET_S (a slow or busy machine:
all-thread rows on a shared 2-core box slow down tenfold) runs fewer. TRITONGPT_BENCH_FULL=1 runs
the full set without that cap (those rows too, and 3 timed rounds after a warm-up on the small
preset; about 10 minutes on 2 cores); -k picks rows, e.g. -k "generate and small". On CUDA every
row runs, with 20 rounds. All-thread timings on 2 cores move by 10-30% between runs; 1 thread is
the steady comparison.
"""
from __future__ import annotations

import copy
import functools
import os
import statistics
import time

import pytest
import torch

from tritongpt import kernels
from bench.ceilings import cpu_model
from bench.conftest import DEVICE, DTYPE, ON_GPU, sync
from model import GPT, ModelConfig
from model.generate import generate
from train.config import TrainConfig
from train.optim import make_optimizer

pytest.importorskip("transformers")
from model.io.hf import llama_model  # noqa: E402

FULL = os.environ.get("TRITONGPT_BENCH_FULL") == "1"
ALL_THREADS = torch.get_num_threads()
THREADS = {"1": 1, "all": ALL_THREADS}
PRESETS = {"tiny": dict(vocab=4096, batch=8, seq=256), "small": dict(vocab=8192, batch=2, seq=512)}
PROMPT, NEW_TOKENS = 16, 64
COPY_BYTES = 256 * 2**20
ROW_BUDGET_S = 6.0       # CPU default set: the most a row's timed rounds may take
IMPLS = ("triton", "torch", "transformers", "transformers-eager") if ON_GPU else ("torch", "transformers")
THEIRS = ("transformers", "transformers-eager")


def rounds(preset: str) -> tuple[int, int]:
    """(warm-up rounds, timed rounds) for a preset on this device."""
    if ON_GPU:
        return 3, 20
    if preset == "small":
        return (1, 3) if FULL else (0, 1)
    return 2, 5


def _case(*values, id: str, full_only: bool):
    """A parameter set; on CPU, full_only ones run only with TRITONGPT_BENCH_FULL=1."""
    skip = full_only and not ON_GPU and not FULL
    return pytest.param(*values, id=id, marks=pytest.mark.skipif(skip, reason="set TRITONGPT_BENCH_FULL=1"))


# The default CPU set leaves out the small preset's train step at 1 thread and its batch-8 decode.
TRAIN_CASES = [_case(p, t, id=f"{p}-threads={t}", full_only=p == "small" and t == "1")
               for p in PRESETS for t in THREADS]
GENERATE_CASES = [_case(p, t, b, id=f"{p}-threads={t}-B={b}", full_only=p == "small" and b == 8)
                  for p in PRESETS for t in THREADS for b in (1, 8)]
THREAD_IDS = [f"threads={t}" for t in THREADS]


@pytest.fixture
def threads(request):
    """Run the test at the thread count its `threads` parameter names, then restore the old one."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS[request.param])
    yield request.param
    torch.set_num_threads(before)


def _threads_label(threads: str) -> str:
    return f"threads={THREADS[threads]}" + (" (all)" if threads == "all" else "")


def _label(benchmark, *, op: str, pass_: str, backend: str, shape: str, dtype: torch.dtype, threads: str) -> None:
    """The labels bench/report.py groups by, as bench/conftest.measure stores them."""
    benchmark.extra_info.update(
        op=op, pass_=pass_, backend=backend, shape=shape, dtype=str(dtype).removeprefix("torch."),
        device=torch.cuda.get_device_name() if ON_GPU else "cpu", threads=THREADS[threads],
        median_ms=benchmark.stats.stats.median * 1e3)
    if not ON_GPU:
        benchmark.extra_info["cpu_model"] = f"{cpu_model()}, {os.cpu_count()} logical CPUs"


def _time(benchmark, run, warmup: int, timed: int, estimate: float | None = None) -> float:
    """Median seconds of `timed` synchronised rounds of run() after `warmup` more. On CPU outside
    the full set, a row whose rounds would take over ROW_BUDGET_S at `estimate` seconds each (a
    slow or busy machine) runs fewer, and no further warm-up: the caller's first call was one."""
    def once():
        run()
        sync()

    if estimate and not ON_GPU and not FULL and estimate * (warmup + timed) > ROW_BUDGET_S:
        warmup, timed = 0, _within_budget(timed, estimate)
    for _ in range(warmup):
        once()
    benchmark.pedantic(once, rounds=timed, iterations=1, warmup_rounds=0)
    return benchmark.stats.stats.median


# Ours/transformers ratios: each group's extra_info dicts by backend, linked once both have run.
_GROUPS: dict[tuple, dict[str, dict]] = {}


def _record(group: tuple, backend: str, info: dict) -> None:
    rows = _GROUPS.setdefault(group, {})
    rows[backend] = info
    for reference in THEIRS:
        theirs = rows.get(reference)
        if theirs is None:
            continue
        suffix = reference.removeprefix("transformers").replace("-", "_")       # "" or "_eager"
        for name, ours in rows.items():
            if name in THEIRS:
                continue
            ours[f"vs_transformers{suffix}"] = ours["tokens/s"] / theirs["tokens/s"]
            if ours.get("peak_MiB") and theirs.get("peak_MiB"):
                ours[f"peak_vs_transformers{suffix}"] = ours["peak_MiB"] / theirs["peak_MiB"]


def models(preset: str, dtype: torch.dtype = torch.float32, attention: str = "sdpa"):
    """(our GPT, LlamaForCausalLM with that attn_implementation) with the same weights on DEVICE,
    built once per preset, dtype and attention."""
    return _models(preset, dtype, attention)


@functools.cache
def _models(preset: str, dtype: torch.dtype, attention: str):
    if dtype != torch.float32:
        ours, theirs = _models(preset, torch.float32, attention)
        return copy.deepcopy(ours).to(dtype), copy.deepcopy(theirs).to(dtype)
    ours = _our_model(preset)
    return ours, llama_model(ours, attn_implementation=attention)


@functools.cache
def _our_model(preset: str) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.preset(preset, vocab_size=PRESETS[preset]["vocab"])).to(DEVICE)


def _attention(impl: str) -> str:
    """transformers' attn_implementation for a row (ours rows share the sdpa pair's GPT)."""
    return "eager" if impl == "transformers-eager" else "sdpa"


def _allocator_peak_above(step) -> int:
    """CPU: peak bytes above the start that step() holds in torch's CPU allocator, from the
    allocation and free events torch.profiler records with profile_memory=True (each event is
    one allocation's or free's signed size; their running sum in time order is the live total)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _unique_bytes(tensors) -> int:
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _state_tensors(model, optimizer, batch) -> list[torch.Tensor]:
    tensors = [*model.parameters(), *model.buffers(), *batch]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def _peak_bytes(step, model, optimizer, batch) -> int:
    """Peak memory of one step(): the static tensors plus the peak of what the step allocates."""
    static = _state_tensors(model, optimizer, batch)
    if ON_GPU:
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        above = torch.cuda.max_memory_allocated() - before
    else:
        above = _allocator_peak_above(step)
    return _unique_bytes(static) + above


def _init_optimizer_state(model, optimizer) -> None:
    """Create AdamW's state with one zero-gradient step, so that the first measured step already
    holds it, as every later step does."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


_COPY_GBPS: dict[str, float] = {}     # the copy row's GB/s by thread count


def _copy_run():
    src = torch.ones(COPY_BYTES // 4, device=DEVICE)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


@pytest.mark.parametrize("threads", list(THREADS), ids=THREAD_IDS, indirect=True)
def test_copy_bandwidth(benchmark, threads):
    median = _time(benchmark, _copy_run(), warmup=2, timed=30 if ON_GPU else 5)
    _label(benchmark, op="copy", pass_="fwd", backend="torch", dtype=torch.float32, threads=threads,
           shape=f"{COPY_BYTES >> 20} MiB {_threads_label(threads)}")
    benchmark.extra_info["GB/s"] = _COPY_GBPS[threads] = 2 * COPY_BYTES / median / 1e9


def copy_gbps(threads: str) -> float:
    """The copy row's GB/s at this thread count, or (when -k left that row out) measured here alike."""
    if threads not in _COPY_GBPS:
        run, times = _copy_run(), []
        for _ in range(7):
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
        _COPY_GBPS[threads] = 2 * COPY_BYTES / statistics.median(times[2:]) / 1e9
    return _COPY_GBPS[threads]


def _train_step(impl: str, preset: str):
    """(model, step(), optimizer, batch) for one train step of impl at preset, the optimizer's
    state already created."""
    ours, theirs = models(preset, attention=_attention(impl))
    model = theirs if impl in THEIRS else ours
    model.train()
    V, B, T = (PRESETS[preset][k] for k in ("vocab", "batch", "seq"))
    x = torch.randint(0, V, (B, T), device=DEVICE)
    y = torch.randint(0, V, (B, T), device=DEVICE)
    y[:, -1] = -100                                    # transformers predicts T-1 tokens per row
    labels = torch.cat((y[:, :1], y[:, :-1]), dim=1)   # which it shifts back to y[:, :-1]
    optimizer = make_optimizer(model, TrainConfig(), torch.device(DEVICE))

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=ON_GPU):
            if impl in THEIRS:
                loss = model(input_ids=x, labels=labels, use_cache=False).loss
            else:
                loss = model(x, targets=y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with kernels.use(_backend(impl)):
        _init_optimizer_state(model, optimizer)
    return model, step, optimizer, (x, y, labels)


def _backend(impl: str) -> str:
    return "triton" if impl == "triton" else "torch"


def _paired_ratio(ours, theirs, rounds: int) -> float:
    """Median over rounds of theirs' seconds / ours' seconds, the two run back to back (in
    alternating order), so that a burst of load on a shared machine slows both sides of a
    ratio instead of one whole row."""
    ratios, pair = [], (("ours", ours), ("theirs", theirs))
    for r in range(rounds):
        seconds = {}
        for name, run in pair if r % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            run()
            sync()
            seconds[name] = time.perf_counter() - start
        ratios.append(seconds["theirs"] / seconds["ours"])
    return statistics.median(ratios)


def _paired_rounds(preset: str, seconds_per_pair: float) -> int:
    """Paired rounds for an ours row: the timed rounds' count, fewer on CPU outside the full
    set when they would take over ROW_BUDGET_S."""
    timed = rounds(preset)[1]
    return timed if ON_GPU or FULL else _within_budget(timed, seconds_per_pair)


def _within_budget(count: int, seconds_each: float) -> int:
    """At most count rounds, as many as fit in ROW_BUDGET_S, at least one."""
    return max(1, min(count, int(ROW_BUDGET_S / seconds_each)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("preset,threads", TRAIN_CASES, indirect=["threads"])
def test_train_step(benchmark, preset, threads, impl):
    model, step, optimizer, batch = _train_step(impl, preset)
    V, B, T = (PRESETS[preset][k] for k in ("vocab", "batch", "seq"))
    warmup, timed = rounds(preset)
    with kernels.use(_backend(impl)):
        start = time.perf_counter()
        peak = _peak_bytes(step, model, optimizer, batch)                # also the first warm-up step
        median = _time(benchmark, step, warmup, timed, estimate=time.perf_counter() - start)
    shape = f"{preset} V={V} B={B} T={T} {_threads_label(threads)}"
    _label(benchmark, op="train_step", pass_="fwdbwd", backend=impl, shape=shape, dtype=DTYPE, threads=threads)
    info = benchmark.extra_info
    info.update({"tokens/s": B * T / median, "peak_MiB": peak / 2**20,
                 "peak_method": "torch.cuda.max_memory_allocated" if ON_GPU else "torch.profiler allocator events"})
    if impl not in THEIRS:
        theirs, their_step, their_optimizer, _ = _train_step("transformers", preset)
        their_step()                                                     # its warm-up
        with kernels.use(_backend(impl)):
            info["vs_transformers_paired"] = _paired_ratio(step, their_step, _paired_rounds(preset, 2 * median))
        del their_optimizer
        theirs.zero_grad(set_to_none=True)
    _record(("train_step", shape), impl, info)
    del optimizer
    model.zero_grad(set_to_none=True)


def _generate_run(impl: str, preset: str, batch: int):
    """run(new tokens) for greedy generation by impl from a random (batch, PROMPT) prompt."""
    ours, theirs = models(preset, DTYPE, _attention(impl))
    model = (theirs if impl in THEIRS else ours).eval()
    prompt = torch.randint(0, PRESETS[preset]["vocab"], (batch, PROMPT), device=DEVICE)

    def run(new: int = NEW_TOKENS):
        if impl in THEIRS:
            with torch.no_grad():
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=new, min_new_tokens=new)
        else:
            out = generate(model, prompt, new, temperature=0, use_cache=True)
        assert out.shape == (batch, PROMPT + new)
    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("preset,threads,batch", GENERATE_CASES, indirect=["threads"])
def test_generate(benchmark, preset, threads, batch, impl):
    run = _generate_run(impl, preset, batch)
    warmup, timed = rounds(preset)
    with kernels.use(_backend(impl)):
        start = time.perf_counter()
        run(4)                                             # a short warm-up: code paths, allocator
        short = time.perf_counter() - start
        median = _time(benchmark, run, warmup, timed, estimate=short * NEW_TOKENS / 4)
    V = PRESETS[preset]["vocab"]
    shape = f"{preset} V={V} B={batch} prompt={PROMPT} new={NEW_TOKENS} {_threads_label(threads)}"
    _label(benchmark, op="generate", pass_="greedy", backend=impl, shape=shape, dtype=DTYPE, threads=threads)
    info = benchmark.extra_info
    ours = models(preset, DTYPE, _attention(impl))[0]
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())   # tied head counted once
    info.update({"tokens/s": batch * NEW_TOKENS / median, "GB/s": NEW_TOKENS * weight_bytes / median / 1e9,
                 "weight_MiB": weight_bytes / 2**20})
    info["copy_GB/s"] = copy_gbps(threads)
    info["bandwidth_fraction"] = info["GB/s"] / info["copy_GB/s"]
    if impl not in THEIRS:
        theirs = _generate_run("transformers", preset, batch)
        theirs(4)                                          # its warm-up
        with kernels.use(_backend(impl)):
            info["vs_transformers_paired"] = _paired_ratio(run, theirs, _paired_rounds(preset, 2 * median))
    _record(("generate", shape), impl, info)
