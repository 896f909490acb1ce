#!/usr/bin/env bash
# First contact with a GPU, in about 5 minutes: the pipeline on CUDA through Snakemake, each step under
# its own time limit and the whole under a deadline, writing what it has after every step.
#   1. install: bench/gpu_install.sh from the carried wheels (.gpu-wheels, made by bench/gpu_wheels.sh)
#   2. environment: nvidia-smi, Python, torch, CUDA, cuDNN (OUTDIR/environment.json)
#   3. checks: bench/gpu_checks.py (the device as the stages see it, the launcher's GPU claim, TF32,
#      bf16 autocast, one training step of each network the rows train), then its guide_fp16 check
#   4. the tiny rows and the smoke overlays through `snakemake --resources gpu=1`, each in its own
#      workdir and under its own limit, all at once, to its report: tests/tiny.yaml, + tests/tiny-mf.yaml,
#      and the CIFAR-10, ImageNet-64, ImageNet-512 and ImageNet-256 smoke overlays (with
#      bench/gpu-smoke.yaml: their GPU rules ask a GPU)
#   5. the DDP path (the tiny row's training over two processes, NCCL): only where nvidia-smi -L shows
#      two GPUs, since two NCCL processes cannot share one GPU
# OUTDIR gets summary.md and summary.json (what passed, what failed, the first error line of each
# failure), each step's log, and per row its report and the logs of its failed jobs; the Snakemake
# workdirs are under OUTDIR/work. With the device tool:
#   CMT_GPU_BUNDLE=$OUT bench/gpu_first_contact.sh /tmp/first-contact     (carry .gpu-wheels; docs/gpu.md)
# Usage: bench/gpu_first_contact.sh OUTDIR
# Environment (besides bench/gpu_steps.sh's): CMT_GPU_WHEELS (.gpu-wheels), CMT_GPU_ROWS (the rows to
# run, as NAME:LIMIT:CONFIG[+CONFIG...] separated by spaces), CMT_GPU_CHECKS (names of checks; all).
# CMT_GPU_SCRIPTS_DEVICE=cpu is the dry run on a CPU: no GPU claims, the checks on the CPU, the tiny row.
set -uo pipefail
out=${1:?usage: bench/gpu_first_contact.sh OUTDIR}
cd "$(dirname "$0")/.."
. bench/gpu_steps.sh
steps_begin first-contact "$out" 330

install_and_record 60 20
if [ "$DEVICE" != cpu ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    note cuda failed "torch sees no CUDA device: the rest would run on the CPU (CMT_GPU_SCRIPTS_DEVICE=cpu for that)"
    steps_end
    exit
fi

if [ -f bench/gpu_checks.py ]; then
    # shellcheck disable=SC2086  # the names are words
    step 60 checks "$PY" -m bench.gpu_checks --device "$DEVICE" --out "$STEPS_OUT/checks.json" \
        ${CMT_GPU_CHECKS:-cuda_device launch_claim tf32_flags autocast_bf16 train_step}
    STEP_NA_RC=3 step 20 guide-fp16 "$PY" -m bench.gpu_checks --device "$DEVICE" \
        --out "$STEPS_OUT/checks-guide.json" guide_fp16
else
    note checks "not available" "no bench/gpu_checks.py in this tree"
fi

# The rows run at once, each in its own workdir with its own GPU lock folder: within a row the GPU jobs
# take turns through the launcher's claims (about 5 s of Python, torch and CUDA start each), across
# rows they share the card, so the rows take about as long as the longest alone.
if [ "$DEVICE" = cpu ]; then
    default_rows="tiny:240:tests/tiny.yaml"  # a CPU takes 1 to 2 minutes, and the smoke rows 2 to 4 each
else
    smoke=bench/gpu-smoke.yaml
    default_rows="tiny:200:tests/tiny.yaml tiny-mf:160:tests/tiny.yaml+tests/tiny-mf.yaml
        cifar10-smoke:160:config/rows/cifar10-cmt-ect.yaml+config/rows/smoke/pixel-ect.yaml+$smoke
        imagenet64-smoke:160:config/rows/imagenet64-cmt-ecd.yaml+config/rows/smoke/imagenet64.yaml+$smoke
        imagenet512-smoke:200:config/rows/imagenet512-cmt-ecd.yaml+config/rows/smoke/imagenet512.yaml+$smoke
        imagenet256-smoke:160:config/rows/imagenet256-cmt-mf.yaml+config/rows/smoke/imagenet256.yaml+$smoke"
fi
# shellcheck disable=SC2086  # the specs are words
rows_together ${CMT_GPU_ROWS:-$default_rows}

gpus=0
[ "$DEVICE" = cpu ] || gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
if [ "$gpus" -ge 2 ]; then
    ROW_GPUS=2 row 60 ddp-tiny tests/tiny.yaml bench/gpu-ddp2.yaml
else
    note ddp skipped "the DDP path needs two GPUs (nvidia-smi -L shows $gpus):" \
        "two processes cannot share one GPU with NCCL"
fi
steps_end
