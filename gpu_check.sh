#!/usr/bin/env bash
# The original example's full job on one GPU, with every timing table, in one command (a few minutes).
#
#   bash gpu_check.sh [CIFAR_SOURCE] [LOG_DIR]
#
# CIFAR_SOURCE: folder holding make_cifar10.py and cifar10_jpeg.npz (default ../shared/cifar10), used only when
# ./data/cifar-10-batches-py is missing. On a lent machine that cannot see ../shared, copy that folder into an
# ignored folder of the checkout (e.g. .gpu_data/) and pass it. Every step's output is tee'd to LOG_DIR.
set -euo pipefail
cd "$(dirname "$0")"
SOURCE=${1:-../shared/cifar10}
LOGS=${2:-./gpu_logs}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
python -c "import torch, safetensors, tqdm, scipy, matplotlib" 2>/dev/null || python -m pip install -q -r requirements.txt
python -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.cuda.get_device_name())"
[ -d data/cifar-10-batches-py ] || python "$SOURCE/make_cifar10.py" ./data

step() {
    local name=$1 start=$SECONDS
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$LOGS/$name.log"
    echo "== $name: $((SECONDS - start)) s wall" | tee -a "$LOGS/$name.log"
}

step train_clean python train.py --dataset_dir ./data --checkpoint_dir ./checkpoints --use_channels_last
step train_corrupt python train.py --dataset_dir ./data --checkpoint_dir ./checkpoints --use_channels_last \
    --corrupt_percentage 0.1
step analyze_ekfac python analyze.py --query_batch_size 1000 --dataset_dir ./data --checkpoint_dir ./checkpoints \
    --factor_strategy ekfac --profile
step analyze_ekfac_half python analyze.py --query_batch_size 1000 --dataset_dir ./data --checkpoint_dir ./checkpoints \
    --factor_strategy ekfac --use_half_precision --profile
step half_precision python half_precision_analysis.py
step detect_ekfac python detect_mislabeled_dataset.py --dataset_dir ./data --checkpoint_dir ./checkpoints \
    --corrupt_percentage 0.1 --factor_strategy ekfac --profile
step bench_fp32 python bench.py --num_train 50000 --num_queries 2000 --query_batch_size 1000 --dataset_dir ./data
step bench_bf16 python bench.py --num_train 50000 --num_queries 2000 --query_batch_size 1000 --dataset_dir ./data \
    --use_half_precision
