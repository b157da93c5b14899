#!/bin/bash
# Issue 30's device check, run on the lent GPU machine from the repository root after
# tools/gpu-kit.sh here (docs/performance.md#the-prepared-gpu-check). Two parts, each well
# inside one call's 10 minutes (about 4 on an H200), so that a failed part can be rerun:
#   part 1: mlp16 stacked (--stack auto) with its CUDA graphs and again with them off
#           (VAEBENCH_CUDA_GRAPHS=0), each with its --profile timeline; then
#           bench --stack 1,4,8,16 --device cuda
#   part 2: mlp16 with --stack off, with its timeline
# Everything it writes lands in $OUT (at most 8 files come back): log-N.txt and the timelines.
# For a rehearsal on a machine that has the packages (and no GPU: bench's part then fails):
#   OUT=/tmp/rehearsal KIT=none GRID=<a small grid> bash tools/gpu-check.sh 2
set -uo pipefail
part=${1:?part 1 or 2}
root=$PWD
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT" && OUT=$(realpath "$OUT")
log="$OUT/log-$part.txt"
grid_file=$(realpath "${GRID:-$root/experiments/mlp16.yaml}")
if [ "${KIT:-}" != none ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl >>"$log" 2>&1 || { echo "the kit did not install" >>"$log"; exit 1; }
fi
export PYTHONPATH="/tmp/site:$root" VAEBENCH_DATA="$root/.gpu-data" PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, mlflow; print('torch', torch.__version__, 'mlflow',
    mlflow.__version__, torch.cuda.get_device_name())"
} >>"$log" 2>&1

grid() {  # grid NAME [options]: mlp16 from an empty folder, its wall from the shell
  local name=$1; shift
  local folder=/tmp/mlp16-$name
  rm -rf "$folder" && mkdir "$folder" && cd "$folder" || return 1
  local started; started=$(date +%s%N)
  timeout 220 python3 -m vaebench run "$grid_file" --no-system-metrics \
    --profile "$OUT/mlp16-$name.json" "$@" >>"$log" 2>&1
  local status=$? ended; ended=$(date +%s%N)
  echo "mlp16 $name: exit $status, wall $(( (ended - started) / 1000000 )) ms" >>"$log"
  cp results/*.csv "$OUT/mlp16-$name.csv" 2>/dev/null
  cd "$root" || return 1
}

if [ "$part" = 1 ]; then
  grid stacked --stack auto
  VAEBENCH_CUDA_GRAPHS=0 grid stacked-eager --stack auto
  timeout 120 python3 -m vaebench bench --stack 1,4,8,16 --device cuda --epochs 3 \
    >>"$log" 2>&1
  echo "bench: exit $?" >>"$log"
else
  grid alone --stack off
fi
grep -i "graph" "$log" >"$OUT/graph-lines-$part.txt"  # a graph that differed warns
date -u >>"$log"
