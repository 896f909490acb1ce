# The steps of a GPU session script (bench/gpu_first_contact.sh, bench/gpu_session.sh); sourced, not run.
#
#   steps_begin SCRIPT OUTDIR     an empty record in OUTDIR (a step's files there are replaced)
#   step LIMIT NAME COMMAND...    COMMAND under `timeout`, output in OUTDIR/NAME.log, then the summary
#   row LIMIT NAME CONFIG...      Snakemake over CONFIG files in its own workdir OUTDIR/work/NAME, to the
#                                 row's report; its report and failed jobs' logs are kept in OUTDIR/NAME/
#   rows_together SPEC...         rows at once (SPEC: NAME:LIMIT:CONFIG[+CONFIG...]), sharing the cores
#   note NAME STATUS TEXT         a step that did not run (skipped, not available), and why
#   install_and_record LIMIT LIMIT  the first two steps of every script: the carried wheels, the machine
# STEP_NA_RC=N before `step`: exit status N means "not available" (what the step checks does not exist yet).
#
# Every step rewrites OUTDIR/summary.json and summary.md (bench/gpu_summary.py), so a session cut short
# keeps what it did. Settings, from the environment:
#   PYTHON                  the interpreter (python3)
#   CMT_GPU_SCRIPTS_DEVICE  cuda (the default) or cpu: a dry run on a CPU, without --resources gpu=1
#   CMT_GPU_DEADLINE        seconds for the whole script: each step's limit is cut to what is left, and a
#                           step with under 10 s left is skipped (default: the script's own)
#   CMT_GPU_LIMIT_SCALE     a factor on every step's limit (1)
#   CMT_GPU_LIMITS          limits of named steps, e.g. "row-costs=200 tiny=90" (seconds, before the deadline)
#   CMT_GPU_CORES           Snakemake's --cores (the machine's, at most 8)
#   CMT_GPU_BUNDLE          a folder that gets the summary and a tarball of OUTDIR after every step
#                           (the device tool's $OUT)

PY=${PYTHON:-python3}
DEVICE=${CMT_GPU_SCRIPTS_DEVICE:-cuda}
SCALE=${CMT_GPU_LIMIT_SCALE:-1}
CORES=${CMT_GPU_CORES:-$(n=$(nproc); echo $((n < 8 ? n : 8)))}
export PYTHONUNBUFFERED=1

steps_begin() {  # steps_begin SCRIPT OUTDIR DEFAULT_DEADLINE
    STEPS_SCRIPT=$1
    STEPS_OUT=$(realpath -m "$2")
    STEPS_START=$(date +%s)
    STEPS_DEADLINE=${CMT_GPU_DEADLINE:-$3}
    mkdir -p "$STEPS_OUT/bin"
    rm -f "$STEPS_OUT/steps.jsonl"
    # the workflow's jobs run `python -m stages...`: make that this interpreter, whatever PATH holds
    printf '#!/bin/sh\nexec %q "$@"\n' "$("$PY" -c 'import sys; print(sys.executable)')" >"$STEPS_OUT/bin/python"
    chmod +x "$STEPS_OUT/bin/python"
    export PATH="$STEPS_OUT/bin:$PATH"
    "$PY" bench/gpu_summary.py "$STEPS_OUT" --script "$STEPS_SCRIPT"
}

_record() {  # _record NAME [gpu_summary options...]
    local name=$1
    shift
    "$PY" bench/gpu_summary.py "$STEPS_OUT" --script "$STEPS_SCRIPT" --name "$name" --log "$STEPS_OUT/$name.log" "$@" ||
        echo "== $name: could not record the step (bench/gpu_summary.py failed)" >&2
}

note() {  # note NAME STATUS TEXT...
    local name=$1 status=$2
    shift 2
    echo "== $name: $status: $*" | tee "$STEPS_OUT/$name.log"
    _record "$name" --status "$status" --note "$*"
}

_limit() {  # _limit LIMIT NAME: the step's limit (CMT_GPU_LIMITS, else LIMIT x scale), cut to what the
            # deadline leaves; empty if under 10 s is left
    local left=$((STEPS_DEADLINE - ($(date +%s) - STEPS_START)))
    local want=$1 pair
    for pair in ${CMT_GPU_LIMITS:-}; do
        [ "${pair%%=*}" = "$2" ] && want=${pair#*=}
    done
    [ "$want" = "$1" ] && want=$(awk -v l="$1" -v s="$SCALE" 'BEGIN { v = l * s; printf "%d", (v < 1 ? 1 : v) }')
    [ "$left" -lt 10 ] && return 0
    echo $((want < left ? want : left))
}

_run() {  # _run LIMIT NAME WORKDIR COMMAND...
    local limit name=$2 workdir=$3
    limit=$(_limit "$1" "$name")
    shift 3
    if [ -z "$limit" ]; then
        note "$name" skipped "the script's deadline (${STEPS_DEADLINE} s) was reached before it"
        return 0
    fi
    echo "== $name (limit ${limit} s): $*" | tee "$STEPS_OUT/$name.log"
    local t0 rc seconds
    t0=$(date +%s.%N)
    timeout --kill-after=15 "$limit" "$@" >>"$STEPS_OUT/$name.log" 2>&1
    rc=$?
    seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    echo "== $name: exit $rc after $seconds s$([ "$rc" -eq 124 ] && echo " (time limit $limit s)")" |
        tee -a "$STEPS_OUT/$name.log"
    local where=()
    [ -z "$workdir" ] || where=(--workdir "$workdir")
    [ -z "${STEP_NA_RC:-}" ] || where+=(--not-available-rc "$STEP_NA_RC")
    _record "$name" --rc "$rc" --seconds "$seconds" --limit "$limit" "${where[@]}"
    return 0
}

step() {  # step LIMIT NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    _run "$limit" "$name" "" "$@"
}

row() {  # row LIMIT NAME CONFIG...
    local limit=$1 name=$2 configs=() c
    shift 2
    for c in "$@"; do configs+=("$(realpath -m "$c")"); done
    local work="$STEPS_OUT/work/$name"
    rm -rf "$work" "${STEPS_OUT:?}/$name"
    mkdir -p "$work"
    local gpu=()
    [ "$DEVICE" = cpu ] || gpu=(--resources "gpu=${ROW_GPUS:-1}")
    # its own GPU lock folder: a job left behind by an earlier step that ran out of time cannot hold
    # this step's claim; and a claim that waits means the claims are wrong, so it gives up soon
    CMT_GPU_LOCKS="$work/gpu-locks" CMT_CLAIM_TIMEOUT=${CMT_CLAIM_TIMEOUT:-60} \
        _run "$limit" "$name" "$work" "$PY" -m snakemake --snakefile "$PWD/Snakefile" -d "$work" \
        -c"${ROW_CORES:-$CORES}" --scheduler greedy "${gpu[@]}" --configfile "${configs[@]}"
}

rows_together() {  # rows_together SPEC...: every row at once, each with its share of the cores (at least 2)
    local cores=$(($(nproc) / $#)) spec name limit configs files
    [ "$cores" -ge 2 ] || cores=2
    [ "$cores" -le "$CORES" ] || cores=$CORES
    for spec in "$@"; do
        IFS=: read -r name limit configs <<<"$spec"
        IFS=+ read -r -a files <<<"$configs"
        ROW_CORES=$cores row "$limit" "$name" "${files[@]}" &
    done
    wait
}

steps_end() {  # the summary's first line; the script's exit status: 1 if a step failed or ran out of time
    head -n 1 "$STEPS_OUT/summary.md"
    echo "summary: $STEPS_OUT/summary.md, $STEPS_OUT/summary.json"
    "$PY" bench/gpu_summary.py "$STEPS_OUT" --script "$STEPS_SCRIPT" --exit-status
}


install_and_record() {  # install_and_record INSTALL_LIMIT ENVIRONMENT_LIMIT
    local wheels=${CMT_GPU_WHEELS:-.gpu-wheels}
    if [ -d "$wheels" ]; then
        step "$1" install bench/gpu_install.sh "$wheels"
    else
        note install skipped "no wheel folder $wheels (make it with bench/gpu_wheels.sh and carry it)"
    fi
    step "$2" environment "$PY" bench/gpu_environment.py --out "$STEPS_OUT/environment.json"
}
