#!/usr/bin/env bash
# The GPU check of psch-jax (issue 22), prepared by benchmarks/gpu_prepare.sh and run
# as `bash .gpu/check.sh` from the project's root on a machine with an NVIDIA GPU and a
# Python 3.12 with jax[cuda] (that machine's jax is used). One pass, under 10 minutes:
#   1. the Fashion-MNIST main job (preset "ssdh"), end to end;
#   2. bench_accelerator: VGG-16 at 224x224 and the small CNN, float32 and bfloat16,
#      batch 128 / 1024: FLOPs per step, step time, MFU;
#   3. the same :tiny run twice with train.deterministic on (the default) and twice
#      with it off: are the codes bitwise equal within each pair?
#   4. bench_evaluation (10,000 x 50,000 and NUS-WIDE's 2,100 x 193,734 at 64 bits:
#      the device forms of the ranking on the GPU, the host form on its CPU; faiss
#      only if installed there);
#   5. preset "modern" in the time left.
# Writes $OUT/run.log, $OUT/util.csv (GPU utilisation every 0.5 s) and $OUT/work.tar.gz
# (every log, and the small files of every work directory: metrics.jsonl holds each
# epoch's data-wait fraction).
export PYTHONUNBUFFERED=1
root=$(pwd); gpu=$root/.gpu; out=${OUT:-/tmp/gpu_out}; work=/tmp/gpu_work
mkdir -p "$out" "$work/logs"
start=$(date +%s)
exec > >(tee "$out/run.log") 2>&1
log() { echo "== +$(( $(date +%s) - start ))s $*"; }

log environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 --version; nproc
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$gpu"/whl/*.whl || { log "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$root
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__)"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 500 \
  > "$out/util.csv" 2>&1 &
sampler=$!

step() { # name, timeout in s, command...
  local name=$1 limit=$2; shift 2
  log "$name start"
  local began rc
  began=$(date +%s)
  timeout "$limit" "$@" > "$work/logs/$name.log" 2>&1; rc=$?
  log "$name rc=$rc wall=$(( $(date +%s) - began ))s"
  grep -vE "^\s*$" "$work/logs/$name.log" | tail -n 25
}
same_codes() { # two work directories: their codes compared byte for byte
  for f in "$1"/codes/*.npy; do
    if cmp -s "$f" "$2/codes/$(basename "$f")"; then
      echo "bitwise equal: $(basename "$f") ($3)"
    else
      echo "DIFFERENT: $(basename "$f") ($3)"
    fi
  done
}
main="python3 main.py"
data="--config.data.manual_dir=$gpu/fm"
step ssdh 120 $main --config=configs/fashion_mnist.py --workdir="$work/ssdh" $data
step accelerator 150 python3 -m benchmarks.bench_accelerator --batch-vgg 128 \
  --batch-cnn 1024 --steps 10
for run in det1 det2; do
  step "tiny_$run" 40 $main --config=configs/fashion_mnist.py:tiny \
    --workdir="$work/tiny_$run" $data
done
same_codes "$work/tiny_det1" "$work/tiny_det2" "train.deterministic=True"
for run in fast1 fast2; do
  step "tiny_$run" 40 $main --config=configs/fashion_mnist.py:tiny \
    --config.train.deterministic=False --workdir="$work/tiny_$run" $data
done
same_codes "$work/tiny_fast1" "$work/tiny_fast2" "train.deterministic=False"
step evaluation 120 python3 -m benchmarks.bench_evaluation \
  --sizes=10000x50000,2100x193734 --numpy-queries 100 --repeats 1
left=$(( 560 - ($(date +%s) - start) ))
if [ "$left" -gt 30 ]; then
  step modern "$left" $main --config=configs/fashion_mnist.py \
    --config.data.preset=modern --workdir="$work/modern" $data
fi
kill "$sampler" 2>/dev/null
tar czf "$out/work.tar.gz" -C "$work" --exclude=checkpoints --exclude='*.png' . 2>/dev/null
log done
