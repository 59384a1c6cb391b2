#!/usr/bin/env bash
# bench_resnet.py on one GPU, its runs as parallel processes: a ResNet-20 step leaves most of an
# H100-class GPU idle, so runs side by side take little longer than one. Phase 1: vanilla and
# hashed of every seed at once; phase 2: magnitude (it follows the hashed run's widths) and the
# one-shot part of every seed at once; then one table over all seeds.
#   bash benchmarks/run_resnet_gpu.sh OUT_DIR [bench_resnet.py options, e.g. --epochs 15 --overrides ...]
# Env: PYTHON (default python3), SEEDS (default "0 1 2"), THREADS (CPU threads per run, default 2),
# DEVICE (default cuda).
# Logs: OUT_DIR/<seed>_<part>.log. Table: benchmarks/bench_resnet.md (or --md). Runs already in
# OUT_DIR are reused, so a rerun resumes.
set -uo pipefail
out=${1:?usage: run_resnet_gpu.sh OUT_DIR [bench_resnet.py options]}
shift
py=${PYTHON:-python3}
seeds=${SEEDS:-0 1 2}
threads=${THREADS:-2}
device=${DEVICE:-cuda}
mkdir -p "$out"
rc=0
phase() {  # phase PART...: every seed x part in parallel
    local pids=()
    for s in $seeds; do
        for part in "$@"; do
            $py benchmarks/bench_resnet.py --device "$device" --seeds "$s" --runs "$part" --threads "$threads" \
                --out-dir "$out" "${opts[@]}" >"$out/s${s}_${part}.log" 2>&1 &
            pids+=($!)
        done
    done
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
}
opts=("$@")
phase vanilla hashed
phase magnitude oneshot
[ $rc -eq 0 ] || echo "some runs failed: see $out/s*_*.log" >&2
# shellcheck disable=SC2086
$py benchmarks/bench_resnet.py --device "$device" --seeds $seeds --out-dir "$out" --report-only "$@" \
    --note "Run with \`bash benchmarks/run_resnet_gpu.sh\`: on one GPU, vanilla and hashed of all seeds as parallel processes, then magnitude and the one-shot part of all seeds; wall-time ratios therefore compare runs that shared the GPU with different neighbours (vanilla with hashed, magnitude with the one-shot fine-tunes)."
exit $rc
