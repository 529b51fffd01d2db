#!/usr/bin/env bash
# One part of the GPU benchmark set per device command; each part fits a 10-minute call.
#
#   bash benchmarks/fetch_wheels.sh             # here, once: diffusers + tomesd wheels in .whl/
#   bash benchmarks/gpu_session.sh check        # on the device (carry .whl), then the others:
#   ... merge | sd15 | sdxl | more | pipeline
#   bash benchmarks/gpu_session.sh lease        # OR: the whole set cut to one call of 9.5
#                                               # minutes, for a 15-minute device lease
#
# Results go to results/ (kept on the device while it stays warm) and are copied to $OUT,
# which the device tool brings back; make the tables and plots here afterwards:
#   python benchmarks/report.py DIR/*.json; python benchmarks/plot.py DIR/unet_*.json --out-dir DIR/plots
set -uo pipefail
part=${1:?"usage: gpu_session.sh check|merge|sd15|sdxl|more|pipeline|lease"}
cd "$(dirname "$0")/.."

# The GPU image has jax, flax, torch and transformers; diffusers and tomesd travel as wheels.
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    echo "no .whl/ folder: the torch peer (diffusers + tomesd) will be skipped"
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
kind=$(python3 -c "import jax; print(jax.devices()[0].device_kind.split()[1].lower())" 2>/dev/null)
kind=${kind:-gpu}
mkdir -p results
# Each command is cut at a hard limit below the call's 10 minutes, so that the rows it
# finished (written after each row) are still copied to $OUT.
run() { local limit=$1; shift; echo "+ $*"; timeout "$limit" "$@"; }
# lease: every step gets min(its own limit, what is left of LEASE_S), copies its JSON to
# $OUT when it ends, and is skipped when under 25 s are left.
LEASE_S=${LEASE_S:-560}
step() {
    local limit=$1; shift
    local left=$(( LEASE_S - SECONDS ))
    (( left < limit )) && limit=$left
    if (( limit < 25 )); then echo "skipped (lease time used up): $*"; return 0; fi
    echo "+ [t=${SECONDS}s, limit ${limit}s] $*"
    timeout "$limit" "$@"; local rc=$?
    if [ -n "${OUT:-}" ]; then cp results/*.json "$OUT"/ 2>/dev/null; fi
    return $rc
}

case "$part" in
  check)   # versions, then correctness of the timed programs on this device
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import sys, jax, flax, numpy, torch; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__, jax.devices())"
    python3 -c "import diffusers, tomesd; print('diffusers', diffusers.__version__)" || true
    JAX_PLATFORMS=cuda run 200 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py
    run 300 python3 benchmarks/device_check.py --preset gpu --out "results/device_check_$kind.json"
    ;;
  merge)   # attention-level overhead of each method against the zero-cost probe
    run 560 python3 benchmarks/merge_overhead.py --preset gpu --time-budget 420 \
        --out "results/merge_overhead_$kind.json"
    ;;
  sd15)    # the goals' sizes at ratio 0.5, with diffusers + tomesd in the same run
    run 560 python3 benchmarks/unet_speed.py --preset gpu --models sd15 --sizes 512 1024 2048 \
        --ratios 0.5 --methods tome retom retom_cached_plan_static todo --torch \
        --time-budget 360 --out "results/unet_sd15_r05_$kind.json"
    ;;
  sdxl)
    run 560 python3 benchmarks/unet_speed.py --preset gpu --models sdxl --ratios 0.5 \
        --methods tome tome_md2 retom todo --torch --time-budget 360 \
        --out "results/unet_sdxl_r05_$kind.json"
    ;;
  more)    # the rest of the grid: other sizes and ratios, global matching
    run 275 python3 benchmarks/unet_speed.py --preset gpu --models sd15 --sizes 768 1536 \
        --ratios 0.5 --methods tome retom todo --time-budget 200 \
        --out "results/unet_sd15_more_$kind.json"
    run 275 python3 benchmarks/unet_speed.py --preset gpu --models sd15 --sizes 1024 2048 \
        --ratios 0.3 0.75 --methods tome retom retom_global --time-budget 200 \
        --out "results/unet_sd15_ratios_$kind.json"
    ;;
  pipeline) # seconds per image and whole-pipeline compile time
    run 560 python3 benchmarks/pipeline_speed.py --preset gpu --models sd15 --sizes 512 1024 \
        --time-budget 420 --out "results/pipeline_sd15_$kind.json"
    ;;
  lease)   # one call: smoke, correctness, the goals' rows with the torch peer, a profile
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import sys, jax, flax, numpy, torch; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__, jax.devices())"
    python3 -c "import diffusers, tomesd; print('diffusers', diffusers.__version__)" || true
    step 90 python3 benchmarks/unet_speed.py --preset tiny --models sd15-tiny --iters 3 \
        --warmup 1 --out "results/smoke_$kind.json" || { echo "SMOKE FAILED: stopping"; exit 3; }
    step 100 python3 benchmarks/device_check.py --preset gpu --methods none retom \
        --out "results/device_check_$kind.json"
    step 230 python3 benchmarks/unet_speed.py --preset gpu --models sd15 --sizes 512 1024 2048 \
        --ratios 0.5 --methods tome retom --torch --time-budget 180 \
        --out "results/unet_sd15_r05_$kind.json"
    step 60 python3 benchmarks/profile_call.py --model sd15 --size 1024 --method retom \
        --out "results/profile_sd15_1024_retom_$kind.json"
    step 120 python3 benchmarks/unet_speed.py --preset gpu --models sdxl --sizes 1024 \
        --ratios 0.5 --methods tome_md2 retom --torch --time-budget 75 \
        --out "results/unet_sdxl_r05_$kind.json"
    step 110 python3 benchmarks/pipeline_speed.py --preset gpu --models sd15 --sizes 512 \
        --methods none retom --repeats 5 --time-budget 50 --out "results/pipeline_sd15_$kind.json"
    ;;
  *) echo "unknown part '$part'"; exit 2 ;;
esac
status=$?
if [ -n "${OUT:-}" ]; then cp results/*.json "$OUT"/ 2>/dev/null; fi
python3 benchmarks/report.py results/*.json 2>/dev/null | tail -60
exit $status
