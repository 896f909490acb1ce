#!/usr/bin/env bash
# The GPU measurements of bench/RESULTS.md in one go, for a session on one card (about 10 minutes
# on one H100, an estimate: it has not run on a GPU yet). Each script has its own time limit, and
# what a script finished is kept when a later one runs out:
#   1. bench/row_costs.py: every row's seconds per unit on its own networks and the projected
#      GPU-hours beside the paper's, and each job's minutes against the runtime its row asks;
#   2. bench/gpu_figures.py: the CIFAR-10 DDPM++'s throughput in fp32 and bf16 and the speed levers;
#   3. bench/pipeline_ratios.py on the CIFAR-10 row: trajectory stage against NFE forwards, shard
#      reader against the step, offline against online mid-training.
# Usage: bench/gpu_session.sh OUTDIR [ROW ...]   (rows: bench/row_costs.py's --rows; default every row)
# torch.compile comes last in gpu_figures.py: where the limit cuts it, the other levers are written.
# Then copy OUTDIR/*.json into bench/ under the card's name and record them in bench/RESULTS.md.
set -uo pipefail
out=${1:?usage: bench/gpu_session.sh OUTDIR [ROW ...]}
shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no GPU: these are GPU measurements')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$out/card.csv" 2>&1

status=0
run() {  # run LIMIT_SECONDS NAME COMMAND...: its output in OUTDIR/NAME.log, a timeout or failure noted
    local limit=$1 name=$2
    shift 2
    echo "== $name: $*" | tee "$out/$name.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "== $name: exit $rc$([ "$rc" -eq 124 ] && echo " (time limit $limit s)")" | tee -a "$out/$name.log"
        status=1
    fi
}

# the rows whose sizes nothing has measured yet first (XXL, MF-XL/2, EDM2-S), the digits last; each
# row's figures are written as it ends, and rows that share a stage's networks share its measurement
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(imagenet512-cmt-ecd imagenet256-cmt-mf imagenet64-cmt-ecd cifar10-cmt-ect
                              imagenet512-cmt-ect imagenet64-cmt-ect ffhq64-cmt-ect afhqv2-64-cmt-ect
                              digits-cmt-ect digits-cmt-mf)
run 360 row-costs python bench/row_costs.py --out "$out/row-costs.json" --rows "${rows[@]}"
run 150 gpu-figures python bench/gpu_figures.py --out "$out/gpu-figures.json"
run 60 ratios-cifar10 python bench/pipeline_ratios.py --repeats 3 --config config/rows/cifar10-cmt-ect.yaml \
    --out "$out/ratios-cifar10.json"
exit $status
