#!/usr/bin/env bash
# GPU figures in one script sized for a short loan of one GPU:
#   1. the search step's speed (benchmarks/supernet_speed.py, with its ratio to the textbook network) and
#      the retraining step's with and without CUDA graphs (benchmarks/retrain_speed.py, ratio to a plain
#      PyTorch loop) at C=7 and C=BC;
#   2. the CUDA tests (tests/test_cuda.py);
#   3. where Ray is installed: the strategy comparison (benchmarks/quality.py: one pipeline run over
#      search.strategy × seeds, every architecture retrained twice). A loan whose machine cannot install
#      Ray (its wheel exceeds what the device tool carries) skips it.
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
    git rev-parse --short HEAD 2>/dev/null
    $PY -c "import torch, pydantic, ptflops, pandas, plotly, yaml, safetensors; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0), 'pydantic', pydantic.__version__, \
'pandas', pandas.__version__, 'ptflops ok')"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
$PY -c "import pydantic, ptflops, pandas, plotly" || exit 1

DEV=cuda THREADS=14 TA=470 SPEED_STEPS=20 BC=22 EP_A=8
SIZE=(retrain.epochs=$EP_A)
if [ "${DRY:-0}" = 1 ]; then
    DEV=cpu THREADS=2 TA=900 SPEED_STEPS=3 BC=8
    SIZE=(retrain.epochs=1 retrain.min_steps=0 data.train_subset=1000 data.test_subset=500
          retrain_data.train_subset=1000 search.epochs=2 search.min_steps=0 search.warmup_epochs=1
          search.batch_size=64 search.distill.teacher.epochs=1 search.distill.teacher.min_steps=0)
fi
T0=$(date +%s)

# 1. speed: the search step (ratio to the textbook network, dense and half deleted) and the retraining
#    step with CUDA graphs on and off (ratio to a plain PyTorch loop), for both recipes below
timeout 300 $PY benchmarks/supernet_speed.py --preset paper-cifar --device $DEV --steps $SPEED_STEPS --rounds 2 \
    | tee "$OUT/supernet_speed.jsonl"
for C in 7 $BC; do
    timeout 180 $PY benchmarks/retrain_speed.py --device $DEV --genotype benchmarks/genotypes/quick_densest.json \
        --C $C --batch 512 --steps $SPEED_STEPS --rounds 2 --cuda-graph auto off --threads $THREADS
done | tee "$OUT/retrain_speed.jsonl"

# 2. the CUDA tests
if [ "$DEV" = cuda ]; then
    timeout 150 $PY -m pytest -q -m gpu tests/test_cuda.py -p no:cacheprovider >"$OUT/pytest-gpu.txt" 2>&1
    tail -3 "$OUT/pytest-gpu.txt"
fi

# 3. strategies compared (benchmarks/quality.py drives one pipeline run: it needs Ray on this machine)
if $PY -c "import ray" 2>/dev/null; then
    timeout -k 5 $TA $PY benchmarks/quality.py --profile quick --seeds 2 --repeats 2 --out "$OUT/quality" \
        data.root="$FMNIST" retrain.C=7 retrain.lr=0.008 retrain.weight_decay=0.01 retrain.batch_size=512 \
        retrain_data.train_subset=all retrain_data.augment=true "${SIZE[@]}" >"$OUT/quality.log" 2>&1
    tail -n 30 "$OUT/quality/quality.md" 2>/dev/null
else
    echo "no Ray here: the strategy comparison (benchmarks/quality.py, through pipeline/run.py) is skipped"
fi
echo "session: $(( $(date +%s) - T0 )) s"
