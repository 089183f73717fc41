#!/usr/bin/env bash
# The one-call GPU protocol (README, "On a GPU machine"):  bash bench/gpu.sh OUT_DIR
#
# On one H100/H200 with the packages preinstalled and no network, in under 8 minutes, from the
# repo root with PYTHONPATH=. and nothing installed:
#   1. env.json / env.txt: GPU, driver, versions and the measured copy and bf16 matmul ceilings
#      (python -m bench.ceilings);
#   2. the kernel tests on CUDA (tests/numerics.py runs bf16 next to fp16 and fp32 by itself there);
#   3. the benchmarks, one pytest per suite: triton vs torch eager vs torch.compile, SDPA flash and
#      cuDNN for attention, SDPA with an explicit mask and FlexAttention for windowed, softcapped
#      and packed-document attention, Liger-Kernel where it imports, and the small preset's train
#      step in tokens/s and MFU against the measured matmul ceiling (TRITONGPT_CEILINGS); the
#      shapes the goals name (TRITONGPT_BENCH_QUICK=1 unless set otherwise);
#   4. bench.json (all suites merged) and report.md (environment, step statuses, test summary,
#      benchmark table with fractions of the ceilings).
# Each step runs under `timeout -s INT`, so an overrunning pytest still reports and writes what it
# measured, within a budget that keeps the whole under the deadline; a failing step never stops
# the script: every step's exit status goes to OUT_DIR/steps.txt and report.md, and the script
# exits 1 if any step failed. Without a CUDA GPU it prints one line and exits with status 2.
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu.sh OUT_DIR" >&2
    exit 2
fi
OUT=$(realpath -m "$1")            # before the cd below, so a relative OUT_DIR means the caller's
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export TRITONGPT_CEILINGS="$OUT/env.json"
export TRITONGPT_BENCH_QUICK="${TRITONGPT_BENCH_QUICK:-1}"
# Steps end by this deadline; then the report gets its own 30 s and a timeout's kill grace 15 s.
DEADLINE=$((SECONDS + ${TRITONGPT_GPU_BUDGET_S:-435}))
PYTEST=(python -m pytest -q -p no:cacheprovider)

# Environment and ceilings first. Status 2 is bench.ceilings' "no CUDA GPU present: ..." (on
# stderr, so it reaches the terminal): that is the dry run, and it ends here, writing nothing.
env_lines=$(timeout -s INT -k 15 60 python -m bench.ceilings "$OUT/env.json")
status=$?
if [ "$status" -eq 2 ]; then exit 2; fi
mkdir -p "$OUT/logs" "$OUT/bench" || exit 1
rm -f "$OUT"/bench/*.json "$OUT/bench.json" "$OUT/bench.md"     # an earlier run's results must not merge in
printf '%s\n' "$env_lines" | tee "$OUT/env.txt"
printf 'ceilings\t%s\t%s\n' "$status" "$SECONDS" > "$OUT/steps.txt"

# step NAME BUDGET_S CMD...: CMD under a timeout (at most BUDGET_S, never past the deadline),
# output to OUT/logs/NAME.log, status and seconds appended to OUT/steps.txt.
step() {
    local name=$1 budget=$2 start=$SECONDS status
    shift 2
    (( budget > DEADLINE - SECONDS )) && budget=$((DEADLINE - SECONDS))
    if (( budget < 10 )); then
        printf '%s\tnot run (out of time)\t0\n' "$name" >> "$OUT/steps.txt"
        echo "== $name: not run, out of time"
        return
    fi
    echo "== $name (at most ${budget}s)"
    timeout -s INT -k 15 "$budget" "$@" > "$OUT/logs/$name.log" 2>&1
    status=$?
    case $status in
        0) ;;
        124|137) status="$status (timed out after ${budget}s; partial)" ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$OUT/steps.txt"
    echo "   status $status, $((SECONDS - start))s: $(tail -n 1 "$OUT/logs/$name.log")"
}

# No -x: every failure is recorded. A module whose imports fail (say hypothesis is missing) is
# reported as an error while the other modules still run.
step kernel-tests 100 "${PYTEST[@]}" --continue-on-collection-errors tests/kernels/test_triton_*.py tests/kernels/test_kernels*.py

# Seconds per suite at the quick shapes, about 7 minutes in all: estimates, not yet timed on a GPU,
# with room for a fresh process's imports and torch.compile's first compiles in each. The train
# step (the MFU headline) goes first, attention (the largest) last: causal, then windowed and
# softcapped (attention) and packed documents (varlen_attention), whose FlexAttention rows compile
# a kernel per mask and pass. Past the deadline the last suites get what time is left (and a
# partial JSON). quantized_linear includes greedy decoding of the small preset in full precision,
# int8 and fp4.
for suite in train_step:80 rms_norm:35 swiglu:20 cross_entropy:30 linear_cross_entropy:40 quantized_linear:40 \
        causal_attention:80 attention:60 varlen_attention:45; do
    name=${suite%:*}
    step "bench-$name" "${suite#*:}" "${PYTEST[@]}" "bench/test_$name.py" --benchmark-only \
        --benchmark-json "$OUT/bench/$name.json"
done

jsons=()
for f in "$OUT"/bench/*.json; do [ -s "$f" ] && jsons+=("$f"); done
ceilings=()
[ -s "$OUT/env.json" ] && ceilings=(--ceilings "$OUT/env.json")
DEADLINE=$((SECONDS + 30))
if (( ${#jsons[@]} )); then
    step report 30 python -m bench.report "${jsons[@]}" "${ceilings[@]}" --json "$OUT/bench.json" --output "$OUT/bench.md"
else
    printf 'report\tnot run (no benchmark JSON)\t0\n' >> "$OUT/steps.txt"
fi

if commit=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || commit="$commit (dirty)"
else
    commit="unknown (not a git checkout)"
fi
{
    echo "# GPU protocol run ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo
    echo "\`bash bench/gpu.sh\` at commit $commit, TRITONGPT_BENCH_QUICK=$TRITONGPT_BENCH_QUICK, ${SECONDS}s in all."
    echo
    echo "## Environment and ceilings"
    echo
    sed 's/^/    /' "$OUT/env.txt"
    echo
    echo "## Steps"
    echo
    echo "| step | exit status | seconds |"
    echo "|---|---|---|"
    awk -F'\t' '{ printf "| %s | %s | %s |\n", $1, $2, $3 }' "$OUT/steps.txt"
    echo
    echo "## Kernel tests (tests/kernels/test_triton_*.py, tests/kernels/test_kernels*.py on CUDA)"
    echo
    echo "    $(tail -n 1 "$OUT/logs/kernel-tests.log" 2>/dev/null)"
    grep -E '^(FAILED|ERROR) ' "$OUT/logs/kernel-tests.log" 2>/dev/null | head -n 60 | sed 's/^/    /'
    echo
    echo "## Benchmarks"
    echo
    if [ -s "$OUT/bench.md" ]; then sed 's/^# /### /' "$OUT/bench.md"; else echo "No benchmark report (see steps)."; fi
} > "$OUT/report.md"

echo "report: $OUT/report.md  results: $OUT/bench.json  environment: $OUT/env.json  steps: $OUT/steps.txt  logs: $OUT/logs/"
if awk -F'\t' '$2 != "0" { bad = 1 } END { exit !bad }' "$OUT/steps.txt"; then
    exit 1      # some step failed, timed out or did not run: see steps.txt
fi
