#!/usr/bin/env bash
# Every GPU figure of the README in one script sized for a short loan of one GPU (about 7 minutes on one
# H100/H200 with 16 CPU cores): the search super-network's step speed on CUDA, the CUDA tests
# (tests/test_cuda.py), and a Fashion-MNIST quality run (benchmarks/quality.py) on the GPU:
#   A: DNAD vs SNPS vs random vs ResNet-18, seeds 0 and 1, 3 architectures per method and seed,
#      8 retraining epochs each on the full training set (7 at a time on the one GPU);
#   B: the largest DNAD (seed 0) architecture under 100K parameters, retrained for 20 epochs.
# Both use the quick profile's search (5 cells, C=8, 250 steps) on 16,000 images at batch 256 with a
# ResNet-18 teacher, and retrain at C=7, batch 512, AdamW, crop + flip, on all 60,000 training images.
#
#   OUT=gpu-results bash benchmarks/gpu_session.sh          # python3 with torch, pydantic, ptflops, pandas, plotly
#   DRY=1 OUT=/tmp/dry bash benchmarks/gpu_session.sh       # the same flow on the CPU at toy sizes (a check)
#
# Data: data.root=${FMNIST:-/usr/share/datasets/fashion-mnist}. Where python lacks pydantic/ptflops/plotly,
# the wheels in .whl/ (if any) are installed into /tmp/site first (a machine with torch but not the rest).
set -u
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! $PY -c "import pydantic, ptflops, plotly" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
{
    nvidia-smi -L 2>&1
    nproc
    $PY -c "import torch, pydantic, ptflops, pandas, plotly, yaml, safetensors; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0), 'pydantic', pydantic.__version__, \
'pandas', pandas.__version__, 'ptflops ok')"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
$PY -c "import pydantic, ptflops, pandas, plotly" || exit 1

DEV=cuda JOBS=7 THREADS=14 TA=400 TB=380 DL=5.5 PRESET=paper-cifar
SIZE=(search.distill.teacher.epochs=4 retrain.epochs=8)
SIZEB=(retrain.epochs=20)
if [ "${DRY:-0}" = 1 ]; then
    DEV=cpu JOBS=2 THREADS=2 TA=900 TB=900 DL=30 PRESET=tiny
    SIZE=(search.distill.teacher.epochs=1 retrain.epochs=1 data.train_subset=1000 data.test_subset=500
          retrain_data.train_subset=1000 search.epochs=2 search.warmup_epochs=1 search.batch_size=64)
    SIZEB=(retrain.epochs=1 data.train_subset=1000 data.test_subset=500 retrain_data.train_subset=1000
           search.epochs=2 search.warmup_epochs=1 search.batch_size=64)
fi

# 1. step speed of the search super-network (dnad's depthwise dispatch, then plain F.conv2d)
for k in dnad plain; do
    timeout 120 $PY benchmarks/supernet_speed.py --preset $PRESET --device $DEV --steps 20 --warmup 5 --kernels $k
done | tee "$OUT/speed.jsonl"

# 2. quality runs A and B (B waits for A's seed-0 DNAD search), with the CUDA tests beside them
COMMON=(--profile quick --device $DEV --threads $THREADS data.root="$FMNIST" data.train_subset=16000
        search.batch_size=256 search.distill.teacher.kind=torchvision search.distill.teacher.arch=resnet18
        search.distill.teacher.batch_size=256 search.distill.teacher.lr=0.1 retrain.C=7 retrain.batch_size=512
        retrain.lr=0.008 retrain.weight_decay=0.01 retrain_data.train_subset=all retrain_data.augment=true
        teacher.cache_dir=/tmp/dnad-teachers)
QA=/tmp/quality-a QB=/tmp/quality-b
timeout -k 5 $TA $PY benchmarks/quality.py "${COMMON[@]}" --seeds 0 1 --max-archs 3 --jobs $JOBS \
    --deadline-min $DL --out $QA "${SIZE[@]}" >"$OUT/quality-a.log" 2>&1 &
PID_A=$!
(
    while [ ! -f $QA/emissions-DNAD-0.json ] && kill -0 $PID_A 2>/dev/null; do sleep 1; done
    mkdir -p $QB && cp $QA/emissions-DNAD-0.json $QB/ || exit 1
    timeout -k 5 $TB $PY benchmarks/quality.py "${COMMON[@]}" --seeds 0 --methods DNAD --max-archs 1 \
        --max-params 100000 --out $QB "${SIZE[@]}" "${SIZEB[@]}"
) >"$OUT/quality-b.log" 2>&1 &
if [ "$DEV" = cuda ]; then
    timeout 150 $PY -m pytest -q -m gpu tests/test_cuda.py -p no:cacheprovider >"$OUT/pytest-gpu.txt" 2>&1
    tail -3 "$OUT/pytest-gpu.txt"
fi
wait
for q in $QA $QB; do
    [ -d "$q" ] && tar -czf "$OUT/$(basename $q).tgz" -C "$q" --exclude='*.tmp' .
    cat "$q/quality.md" 2>/dev/null | head -40
done
tail -n 5 "$OUT/quality-a.log" "$OUT/quality-b.log"
