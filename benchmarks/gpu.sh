#!/usr/bin/env bash
# All GPU figures in one go: the three benchmarks (`make bench`'s) on the GPU, a profile of the
# inference fast path, and the GPU-marked tests. Each step's log goes to $LOGS (default ./gpu-logs).
#
#   bash benchmarks/gpu.sh [steps...]     steps: infer train train-gather label infer32 probes tests (default: all)
#
# probes: what might pay next, measured before it is built: cuDNN's autotuning, GPU JPEG
# decoding (the infer step adds the fast path's stage times and a CUDA graph of its static part).
#
# All steps took about 11 minutes on an H100 (infer 44 s, infer32 31 s, label 150-200 s, train
# 32 s, tests ~5 min; probes not yet run, at most 3.5 min by their timeouts), more than one call
# of a lent device may run: split them, e.g. `gpu.sh infer probes label` then
# `gpu.sh train train-gather infer32 tests`.
#
# On a machine where the project is installed (`make install`), run it as is. On a bare image
# with torch but without Ray or pycocotools, put their wheels (and Ray as ray-py312.tar.xz, the
# wheel's contents less its Java jars and dashboard, to stay small) in .whl/: they are unpacked
# into /tmp/site first.
set -u
cd "$(dirname "$0")/.."
LOGS=${LOGS:-${OUT:-gpu-logs}}
mkdir -p "$LOGS"
PY=${PY:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    [ -f .whl/ray-py312.tar.xz ] && tar xJf .whl/ray-py312.tar.xz -C /tmp/site
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
steps=${*:-infer train train-gather label infer32 probes tests}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$LOGS/machine.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name()); import os; print('cpus', os.cpu_count())" | tee -a "$LOGS/machine.txt"

step() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date +%T))"
    local started=$SECONDS
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - started)) s"
}

for s in $steps; do
    case $s in
        infer) step infer 200 $PY -m benchmarks.model_inference --device cuda --batch 1 8 --images 16 --repeats 3 --precision bf16 --profile 30 --stages --cuda-graph ;;
        train) step train 400 $PY -m benchmarks.train_step --precisions bf16 fp32 --batch-sizes 2 8 16 --steps 20 ;;
        train-gather) step train-gather 200 $PY -m benchmarks.train_step --precisions bf16 --batch-sizes 2 8 --steps 20 --gather-roialign ;;
        label) step label 300 $PY -m benchmarks.label_pipeline --arch r50_fpn --image-size 480x640 --score-threshold 0 --images 2000 --distinct 64 --loop-images 64 --batch-size 8 --shard-size 64 --batches-in-flight 1 2 ;;
        infer32) step infer32 150 $PY -m benchmarks.model_inference --device cuda --batch 1 8 --images 16 --repeats 2 --precision fp32 ;;
        probes) step cudnn 150 $PY -m benchmarks.model_inference --device cuda --batch 8 --images 16 --repeats 3 --precision bf16 --cudnn-benchmark --stages
                step decode 60 $PY -m benchmarks.decode --images 64 --batch 8 32 ;;
        tests) step tests 420 $PY -m pytest -q -s -m gpu -p no:cacheprovider tests/test_overfit.py tests/test_train_step.py tests/test_job_train.py ;;
        *) echo "unknown step $s"; exit 2 ;;
    esac
done
# the summaries: the tables at the ends of the logs
for f in "$LOGS"/*.log; do echo "----- $f"; grep -vE "^ *(aten::|cuda|void |Self CPU|Self CUDA|---|Name )" "$f" | grep -v "^$" | tail -14; done
