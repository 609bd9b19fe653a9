#!/usr/bin/env bash
# The GPU figures of the README in one script sized for a short loan of one GPU (about 9 minutes on one
# H100/H200 with 16 CPU cores):
#   1. retraining speed with and without CUDA graphs (benchmarks/retrain_speed.py) for both recipes below;
#   2. the CUDA tests (tests/test_cuda.py), beside 3 and 4;
#   3. run A: DNAD vs SNPS vs random vs ResNet-18, seeds 0 and 1, 3 architectures per method and seed,
#      8 retraining epochs each at C=7 on all 60,000 training images (batch 512, AdamW, crop + flip);
#   4. run B: the largest DNAD seed-0 architecture under 768K parameters, retrained at C=22 with cutout
#      for as many epochs as fit in B_S seconds at the speed measured in 1 (sharing the GPU with A).
# A's retrainings run 3 at a time, round-robin over (method, seed), and start only while they can end
# before A's deadline, so a cut leaves every method with the same number of architectures.
# Searches: the quick profile's (5 cells, C=8, 250 steps of batch 256 on 16,000 images) with a ResNet-18
# teacher. Their emissions are cached per method and seed; SEED_DIR (default: the ones recorded by the
# first GPU session, benchmarks/results/gpu-h200-2026-11-26/quality-a) is copied in first, so that the
# searches are not run again (delete SEED_DIR's emissions-*.json to search from scratch).
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
SEED_DIR=${SEED_DIR:-benchmarks/results/gpu-h200-2026-11-26/quality-a}
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

DEV=cuda JOBS=3 THREADS=14 TA=470 B_S=400 SPEED_STEPS=20 BC=22 EP_A=8
SIZE=(retrain.epochs=$EP_A)
if [ "${DRY:-0}" = 1 ]; then
    DEV=cpu JOBS=2 THREADS=2 TA=600 B_S=60 SPEED_STEPS=3 BC=8 EP_A=1
    SIZE=(retrain.epochs=1 data.train_subset=1000 data.test_subset=500 retrain_data.train_subset=1000
          search.epochs=2 search.warmup_epochs=1 search.batch_size=64 search.distill.teacher.epochs=1)
fi
T0=$(date +%s)

# 1. retraining speed, CUDA graphs on and off: A's recipe (DNAD s0's densest at C=7) and B's (C=BC)
ARCH=$($PY -c "import json,sys; c=json.load(open(sys.argv[1]))['candidates'][0]; print(c['genotype'])" \
       "$SEED_DIR/emissions-DNAD-0.json" 2>/dev/null)
if [ -n "$ARCH" ]; then
    echo "$ARCH" >/tmp/arch.json
    for C in 7 $BC; do
        timeout 120 $PY benchmarks/retrain_speed.py --device $DEV --genotype /tmp/arch.json --C $C --batch 512 \
            --steps $SPEED_STEPS --epochs 2
    done | tee "$OUT/retrain_speed.jsonl"
fi
# B's epochs: B_S seconds at 0.3 of the measured graph speed (A's 3 processes share the GPU), 60,000 images,
# +10 % for the tests
EP_B=$($PY - "$OUT/retrain_speed.jsonl" "$B_S" "$BC" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if sys.argv[1] else []
ips = [r["img_per_s"] for r in rows if r["mode"] == "auto" and r["C"] == int(sys.argv[3])]
print(max(4, min(100, int(float(sys.argv[2]) * 0.3 * ips[0] / 60000 / 1.1))) if ips else 10)
EOF
)
echo "run B: $EP_B epochs"

# 2-4. quality runs A and B, with the CUDA tests beside them
COMMON=(--profile quick --device $DEV --threads $THREADS data.root="$FMNIST" data.train_subset=16000
        search.batch_size=256 search.distill.teacher.kind=torchvision search.distill.teacher.arch=resnet18
        search.distill.teacher.batch_size=256 search.distill.teacher.lr=0.1 search.distill.teacher.epochs=4
        retrain.batch_size=512 retrain_data.train_subset=all retrain_data.augment=true
        teacher.cache_dir=/tmp/dnad-teachers)
QA=/tmp/quality-a QB=/tmp/quality-b
mkdir -p $QA $QB
cp "$SEED_DIR"/emissions-*.json $QA/ 2>/dev/null
cp "$SEED_DIR"/emissions-DNAD-0.json $QB/ 2>/dev/null
DL=$(( (TA - 20) / 6 ))  # deadline in tenths of a minute
timeout -k 5 $TA $PY benchmarks/quality.py "${COMMON[@]}" --seeds 0 1 --max-archs 3 --jobs $JOBS \
    --deadline-min "$((DL / 10)).$((DL % 10))" --out $QA retrain.C=7 retrain.lr=0.008 retrain.weight_decay=0.01 \
    retrain.test_every=4 "${SIZE[@]}" >"$OUT/quality-a.log" 2>&1 &
timeout -k 5 $((B_S + 60)) $PY benchmarks/quality.py "${COMMON[@]}" --seeds 0 --methods DNAD --max-archs 1 \
    --max-params 768000 --out $QB retrain.C=$BC retrain.lr=0.006 retrain.weight_decay=0.05 data.cutout=8 \
    retrain.test_every=2 "${SIZE[@]}" retrain.epochs=$EP_B >"$OUT/quality-b.log" 2>&1 &
if [ "$DEV" = cuda ]; then
    timeout 150 $PY -m pytest -q -m gpu tests/test_cuda.py -p no:cacheprovider >"$OUT/pytest-gpu.txt" 2>&1
    tail -3 "$OUT/pytest-gpu.txt"
fi
wait
for q in $QA $QB; do
    [ -d "$q" ] && tar -czf "$OUT/$(basename $q).tgz" -C "$q" --exclude='*.tmp' .
    head -40 "$q/quality.md" 2>/dev/null
done
tail -n 4 "$OUT/quality-a.log" "$OUT/quality-b.log"
echo "session: $(( $(date +%s) - T0 )) s"
