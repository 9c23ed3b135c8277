#!/usr/bin/env bash
# The checks that need a GPU, as one script with a time budget (a lent GPU machine is held for minutes, not hours).
# Each step writes its log and results under OUT as it ends, so that a budget cut short still leaves the steps before.
#
#   bash scripts/gpu_checks.sh BRAIN_DATASET OUT [SECONDS]
#
# BRAIN_DATASET: `python scripts/make_dataset.py --task brain --out DIR` (written on a machine that can fetch it).
# DEVICE (cuda), BENCH_ARGS (scripts/benchmark.py's sizes), BASELINE_EPOCHS, BASELINE_ITERATIONS, BASELINE_SECONDS
# LARGE_ARGS (scripts/benchmark_large_volume.py's) and ROI_2D (the 2D benchmark's crop) shrink it for a dry run on a
# CPU; METHODS (default: all four) chooses the 3D benchmarks.
# Steps, most important first:
#   1. the plan step on CUDA (selfreg bundle, brain): the settings it gives with the device's memory;
#   2. the plain baseline trained with that plan (AMP) and its sliding-window AMP inference on the held-out ROBEX
#      head, scored at the head's own resolution (scripts/recipe_benchmark.py);
#   3. NCCL: the multi-GPU overlay under torchrun on one GPU (one process: NCCL refuses two ranks on one device);
#   4. scripts/benchmark.py on CUDA for each method (96^3 crops, AMP): step time, memory and inference ratios (ReSeg's
#      teacher stage, which the benchmark trains first, shortened to 10 iterations: a step costs the same whatever the
#      teacher learnt);
#   5. SemSim against FixMatch in 2D (issue 16's cost target): the paper's UNet at 224^2, 2 + 2 slices;
#   6. scripts/benchmark_large_volume.py with its CUDA arms.
set -u
data=$(realpath "$1")
out=$(realpath -m "$2")
budget=${3:-480}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
bench_args=${BENCH_ARGS:-"--iters 10 --warmup 3 --roi 96 96 96"}
repo=$(cd "$(dirname "$0")/.." && pwd)
start=$SECONDS
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

left() { echo $((budget - (SECONDS - start))); }

# step NAME SECONDS COMMAND...: runs COMMAND with at most SECONDS (or what is left of the budget), logged to
# OUT/NAME.log; prints its exit status and time.
step() {
    local name=$1 limit=$2
    shift 2
    local remaining
    remaining=$(left)
    if [ "$remaining" -lt 20 ]; then
        echo "== $name: skipped, ${remaining}s of the budget left"
        return
    fi
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - t0))s (limit ${limit}s)"
    tail -n 4 "$out/$name.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$py" -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__)"
    nproc
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

selfreg="$repo/bundles/selfreg_segmentation"
run="$out/brain_run"
mkdir -p "$run"
cd "$selfreg" || exit 1
step plan 120 "$py" -m monai.bundle run plan --config_file configs/plan.json --meta_file configs/metadata.json \
    --logging_file configs/logging.conf --bundle_root "$run" --dataset_dir "$data"
cp "$run/models/plan.json" "$out/plan.json" 2>/dev/null

step brain_baseline "${BASELINE_SECONDS:-200}" "$py" "$repo/scripts/recipe_benchmark.py" --bundle selfreg_segmentation \
    --dataset_dir "$data" --out "$run" -- --selfreg_weight 0 --max_epochs "${BASELINE_EPOCHS:-2}" \
    --val_interval "${BASELINE_EPOCHS:-2}" --iterations_per_epoch "${BASELINE_ITERATIONS:-75}" --num_workers 12
cp "$run/recipe_benchmark.json" "$out/brain_baseline.json" 2>/dev/null

tiny="$out/tiny"
"$py" "$repo/scripts/make_dataset.py" --task synthetic --num-cases 4 --out "$tiny" >/dev/null 2>&1
step nccl 90 "$py" -m scripts.torchrun --standalone --nproc_per_node 1 -m monai.bundle run training \
    --config_file "['configs/train.json','configs/multi_gpu_train.json']" --meta_file configs/metadata.json \
    --logging_file configs/logging.conf --bundle_root "$out/nccl_run" --dataset_dir "$tiny" --max_epochs 1 \
    --iterations_per_epoch 4 --roi_size [64,64,64] --spacing [1.5,1.5,1.5] --num_workers 0 --progress_bar False \
    --preflight#probe '$print("probe: backend", dist.get_backend(), "device", @device, "amp", @amp)'

for method in ${METHODS:-selfreg segresnet_vae reseg semsim}; do
    step "benchmark_$method" 120 "$py" "$repo/scripts/benchmark.py" --method "$method" --device "$device" $bench_args \
        --extra "--iterations_per_epoch 10" --json "$out/benchmark_$method.json"
done

roi_2d=${ROI_2D:-224}
step benchmark_semsim_2d 90 "$py" "$repo/scripts/benchmark.py" --method semsim --against fixmatch --device "$device" \
    --roi "$roi_2d" "$roi_2d" --volume "$roi_2d" "$roi_2d" --iters 10 --warmup 3 --json "$out/benchmark_semsim_2d.json" \
    --extra "--backbone unet --spatial_dims 2 --spacing [1.0,1.0] --orientation RA --cache_rate 0 --batch_size 2
        --num_samples 1 --unlabeled_batch_size 2 --iterations_per_epoch 10"

step large_volume 120 "$py" "$repo/scripts/benchmark_large_volume.py" --out "$out/large_volume" \
    ${LARGE_ARGS:-}
echo "== done in $((SECONDS - start))s"
