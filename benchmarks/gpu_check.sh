#!/usr/bin/env bash
# On a CUDA machine, in under 8 minutes, everything printed: zobench itself end to end (every optimizer on a
# random-init OPT-125m in fp16 and bf16, a killed-and-resumed run, a replay, a device-mapped run on two GPUs or
# more), the host memory of a checkpoint, the gpu tests, the numerics table and the MeZO step figures.
# With two GPUs or more, the torchrun rows too (about 10 minutes more): ZO data, directions, shard and FSDP2 Adam
# on 2 ranks (NCCL) against one process, and benchmarks/distributed.py's table for 1 and 2 GPUs.
#   bash benchmarks/gpu_check.sh                        # from the repository root, with zobench importable
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # dry run: the same zobench commands on CPU, tiny model
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_RANKS=1 bash ...     # the dry run with the torchrun rows (2 ranks, gloo)
#   GPU_CHECK_RANKS=only                                # the torchrun rows alone (CPU or CUDA)
#   GPU_CHECK_OUT=DIR keeps the runs in DIR (default: a new temporary folder)
# Exit status: 1 if a part failed (the others still run and print).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
RANKS="${GPU_CHECK_RANKS:-}"  # 1 or only: the torchrun rows (on CUDA they run anyway with two GPUs or more)
OUT="${GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
START=$SECONDS
FAILED=()

part() {  # part NAME SECONDS COMMAND...: run it with a time limit, say how it went
    local name="$1" limit="$2"
    shift 2
    echo "== $name (at $((SECONDS - START)) s, limit ${limit} s)"
    if ! timeout "$limit" "$@"; then
        echo "!! $name failed or ran out of time"
        FAILED+=("$name")
    fi
}

if [ "$DEVICE" = cpu ]; then
    MODEL=opt-tiny STEPS=4 LIMIT=1500  # a shared CPU: mostly the start-up of each zobench process
    BENCH_STEPS=1 BENCH_BATCH=2 RANKS_LIMIT=900 BACKEND=gloo
    python -c "import torch; print('device: cpu (dry run) | torch', torch.__version__)" || exit 1
else
    MODEL=opt-125m STEPS=20 LIMIT=260
    BENCH_STEPS=10 BENCH_BATCH=8 RANKS_LIMIT=420 BACKEND=nccl
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device')" \
        || exit 1
    python -c "import torch; print('device:', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), \
'| torch', torch.__version__)"
    if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ] && [ -z "$RANKS" ]; then
        RANKS=1  # NCCL takes one GPU per rank
    fi
fi
echo "runs in $OUT"

if [ "$RANKS" != only ]; then
    part "zobench end to end ($MODEL, $DEVICE)" "$LIMIT" \
        python benchmarks/gpu_check_runs.py --device "$DEVICE" --model "$MODEL" --steps "$STEPS" --out "$OUT/runs"
fi

if [ -n "$RANKS" ]; then
    part "torchrun rows: ZO data/directions/shard, FSDP2 Adam on 2 ranks ($BACKEND) against one process" \
        "$RANKS_LIMIT" python benchmarks/gpu_check_ranks.py --device "$DEVICE" --model "$MODEL" --out "$OUT/ranks"
    part "benchmarks/distributed.py (1 and 2 ranks, $BACKEND: step time, bytes sent per rank per step, peak)" \
        "$RANKS_LIMIT" python benchmarks/distributed.py --device "$DEVICE" --model "$MODEL" \
            --steps "$BENCH_STEPS" --batch-size "$BENCH_BATCH"
fi

if [ "$DEVICE" != cpu ] && [ "$RANKS" != only ]; then
    part "benchmarks/checkpoint_memory.py (host peak of a save, model on the GPU)" 40 \
        python benchmarks/checkpoint_memory.py --device cuda --layers 2
    part "pytest -m gpu" 60 python -m pytest -q -m gpu -s tests/test_gpu_precision.py tests/test_devices.py
    part "benchmarks/numerics.py (fp16/bf16, reference vs zobench; ZO and FO optimizers)" 50 \
        python benchmarks/numerics.py --device cuda --model opt-125m --steps 5 \
            --only mezo,sparse_mezo,adamezo,zo_adam,zo_sgd_momentum,zo_sgd_sign,sgd,adam,ip_sgd
    part "benchmarks/zo_step.py (both zo_update modes, fp16 weights on CUDA)" 30 \
        python benchmarks/zo_step.py --device cuda --model opt-125m --repeats 5
    part "benchmarks/zo_generator.py (portable z: drawn on the host and copied, against CUDA's generator)" 30 \
        python benchmarks/zo_generator.py --device cuda --model opt-125m --repeats 3
fi

echo "== gpu_check.sh: $((SECONDS - START)) s in all"
if [ ${#FAILED[@]} -gt 0 ]; then
    printf '!! failed: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all parts passed"
