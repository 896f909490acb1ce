#!/usr/bin/env bash
# The GPU measurements of bench/RESULTS.md in about 5 minutes on one card, each script under its own
# time limit and the whole under a deadline, writing what it has after every step (the limits are
# estimates until a GPU has run them; each script writes its JSON as it goes, so a cut keeps the rest):
#   1. install: bench/gpu_install.sh from the carried wheels (.gpu-wheels, made by bench/gpu_wheels.sh)
#   2. environment: the card, driver, torch, CUDA (OUTDIR/environment.json)
#   3. bench/row_costs.py: every row's seconds per unit on its own networks and the projected GPU-hours
#      beside the paper's, and each job's minutes against the runtime its row asks; the sizes nothing
#      has measured yet first (XXL, MF-XL/2, EDM2-S), the digits last, rows sharing a stage's networks
#      sharing its measurement;
#   4. bench/gpu_figures.py: the CIFAR-10 DDPM++'s throughput in fp32 and bf16 and the speed levers
#      (torch.compile last: where the limit cuts it, the other levers are written);
#   5. bench/pipeline_ratios.py on the CIFAR-10 row: trajectory stage against NFE forwards, shard reader
#      against the step, offline against online mid-training.
# OUTDIR gets summary.md and summary.json (bench/gpu_summary.py: what passed, what failed, the first
# error line of each failure), each step's log and its JSON. With the device tool:
#   CMT_GPU_BUNDLE=$OUT bench/gpu_session.sh /tmp/bench-session      (carry .gpu-wheels; docs/gpu.md)
# Then copy OUTDIR/*.json into bench/ under the card's name and record them in bench/RESULTS.md.
# Usage: bench/gpu_session.sh OUTDIR [ROW ...]   (rows: bench/row_costs.py's --rows; default every row)
# Environment: as bench/gpu_steps.sh says, and CMT_GPU_WHEELS (.gpu-wheels). CMT_GPU_SCRIPTS_DEVICE=cpu
# is the dry run on a CPU: each script's CPU proof (row_costs --smoke on the digits row, gpu_figures
# --tiny, pipeline_ratios on the digits row).
set -uo pipefail
out=${1:?usage: bench/gpu_session.sh OUTDIR [ROW ...]}
shift
cd "$(dirname "$0")/.."
. bench/gpu_steps.sh
steps_begin bench-session "$out" 310

install_and_record 45 15

rows=("$@")
if [ "$DEVICE" = cpu ]; then
    [ ${#rows[@]} -gt 0 ] || rows=(digits-cmt-ect)
    step 120 row-costs "$PY" bench/row_costs.py --smoke --out "$STEPS_OUT/row-costs.json" --rows "${rows[@]}"
    step 120 gpu-figures "$PY" bench/gpu_figures.py --tiny --skip-compile --repeats 1 \
        --out "$STEPS_OUT/gpu-figures.json"
    step 120 ratios-digits "$PY" bench/pipeline_ratios.py --repeats 1 --out "$STEPS_OUT/ratios-digits.json"
    steps_end
    exit
fi
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    note cuda failed "torch sees no CUDA device: these are GPU measurements (CMT_GPU_SCRIPTS_DEVICE=cpu: the dry run)"
    steps_end
    exit
fi
[ ${#rows[@]} -gt 0 ] || rows=(imagenet512-cmt-ecd imagenet256-cmt-mf imagenet64-cmt-ecd cifar10-cmt-ect
                              imagenet512-cmt-ect imagenet64-cmt-ect ffhq64-cmt-ect afhqv2-64-cmt-ect
                              digits-cmt-ect digits-cmt-mf)
step 140 row-costs "$PY" bench/row_costs.py --out "$STEPS_OUT/row-costs.json" --rows "${rows[@]}"
step 60 gpu-figures "$PY" bench/gpu_figures.py --out "$STEPS_OUT/gpu-figures.json"
step 40 ratios-cifar10 "$PY" bench/pipeline_ratios.py --repeats 3 --config config/rows/cifar10-cmt-ect.yaml \
    --out "$STEPS_OUT/ratios-cifar10.json"
steps_end
