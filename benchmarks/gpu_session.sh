#!/usr/bin/env bash
# The GPU checks and timings, in one command for a lent CUDA machine (BENCHMARKS.md, "On a GPU"). Each step has its
# own time limit, so that a slow step costs only itself; everything goes to $OUT/log.txt (default /tmp/gpu_out).
#
# What the machine needs beside the checkout: python3 with torch, pytorch-lightning, torchmetrics, numba; wheels of
# anything else (jsonargparse, docstring_parser, typeshed_client) in .whl/; MNIST's four .gz files in
# .gpudata/MNIST/raw/ and the CIFAR-10 subset in .gpudata/cifar10-subset/ (copies of ../shared/data); the
# LeNet-300-100 teacher checkpoint at runs/lenet300_100_teacher/checkpoints/last.ckpt (distill fit -c
# configs/mnist/lenet300_100_teacher.yaml). Then, from the repository root:
#   bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .gpudata ]; then
    mkdir -p /tmp/data && cp -r .gpudata/. /tmp/data/ && gunzip -kf /tmp/data/MNIST/raw/*.gz
    export DISTILL_DATA=/tmp/data
fi

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s, $(date +%T)): $*" >>"$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "=== $name rc=$? ($(date +%T))" >>"$LOG"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    nproc
    python3 -c "import sys, torch, pytorch_lightning as pl, torchmetrics, jsonargparse, numba; \
print(sys.version.split()[0], 'torch', torch.__version__, 'lightning', pl.__version__, 'torchmetrics', \
torchmetrics.__version__, 'jsonargparse', jsonargparse.__version__, 'numba', numba.__version__, \
'cuda', torch.cuda.is_available())"
} >>"$LOG" 2>&1

step cuda_tests "${T_TESTS:-150}" python3 -m pytest tests/test_cuda.py tests/test_prior_cuda.py -q -p no:cacheprovider -rs
step bench_prior "${T_PRIOR:-150}" python3 benchmarks/bench_prior.py --device cuda --fused-adam --reps 30 \
    --vgg-batch 128
step bench_gpu "${T_GPU:-180}" python3 benchmarks/bench_gpu.py --steps 200 --repeats 2 --json "$OUT/bench_gpu.json"
if [ -f runs/lenet300_100_teacher/checkpoints/last.ckpt ]; then
    step sws_lenet300 "${T_SWS:-240}" python3 -m distill fit -c configs/mnist/lenet300_100_sws.yaml \
        --trainer.accelerator gpu --trainer.devices 1 --trainer.enable_progress_bar false \
        --trainer.logger.init_args.save_dir /tmp/gpu_runs --checkpoint.dirpath /tmp/gpu_runs/sws/checkpoints
    cp /tmp/gpu_runs/lenet300_100_sws/version_0/accuracy.json "$OUT/sws_accuracy.json" 2>/dev/null
    cp /tmp/gpu_runs/lenet300_100_sws/version_0/compression_report.md "$OUT/sws_report.md" 2>/dev/null
fi
exit 0
