"""What every stage script does first: parse its arguments, size its threads, say what it runs."""

import argparse
import json
import os
import platform
import sys
import time

# stages/launch.py puts its start (seconds since the epoch) here for the processes it starts, and
# the number of nodes their job spans
STARTED_ENV = "CMT_JOB_STARTED"
NODES_ENV = "CMT_NODES"
_started = None


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", type=json.loads, required=True,
                   help="this stage's configuration as JSON (the Snakemake rule passes it)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch; Snakemake passes the job's cores")
    return p


def add_state_args(p):
    """The resume arguments of a training stage (the rule passes both; without --state-dir the
    stage runs start to finish and cannot resume)."""
    p.add_argument("--state-dir", default=None,
                   help="folder for the resumable training state, outside the rule's outputs")
    p.add_argument("--checkpoint", type=json.loads, default=None,
                   help="the config's checkpoint section as JSON (every_steps, every_minutes, slice_kimg)")
    p.add_argument("--metrics", default=None,
                   help="the metrics log (JSON lines) to publish when the run finishes (stages/training/metrics.py)")
    p.add_argument("--tracking", type=json.loads, default=None,
                   help="the tracking options as JSON (log_with, log_every, project, run, dir): "
                        "stages/config/stage_configs.py tracking_options")
    return p


def add_data_args(p, dataset_required=False):
    """The training data of a stage that reads images: the prepared pixels, or on a latent row the
    encoded dataset (stages/data/training_data.py) and how its shards are checked."""
    p.add_argument("--dataset", required=dataset_required, default=None, help="prepared dataset.npz (pixels)")
    p.add_argument("--latents", default=None,
                   help="a latent row: the encoded dataset's manifest (latent_manifest), read instead of --dataset")
    p.add_argument("--verify", choices=["full", "fast"], default="full",
                   help="--latents: check shards by sha256 or size")
    return p


def add_trajectory_args(p, manifest_required=True):
    """The trajectory inputs of a mid-training stage and how they are checked before the first
    step. The rule passes --verify and --spot-check apart from --config: they change nothing that
    training makes, so changing them reruns nothing. (midtrain's online route reads no manifest.)"""
    p.add_argument("--manifest", required=manifest_required, default=None, help="trajectory manifest.json")
    p.add_argument("--dataset", default=None, help="prepared dataset.npz (the spot check of x_T = data_plus_noise)")
    p.add_argument("--verify", choices=["full", "fast"], default="full",
                   help="check every shard against the manifest: size and sha256 (full) or size only (fast)")
    p.add_argument("--spot-check", type=int, default=0,
                   help="trajectories to regenerate from their seeds with the teacher and compare before training")
    return p


def start(args, stage):
    """Pin torch to the job's threads (more threads than cores slowed a job ninefold here), set
    TF32 from the config (precision.py) and print the resolved configuration at the top of the log."""
    global _started
    _started = launched_at() or time.time()
    import torch

    from stages.core import precision, provenance

    provenance.leave_for_store()
    tf32 = precision.apply()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set by an earlier import in this process
        pass
    print(f"[{stage}] python {platform.python_version()} torch {torch.__version__} "
          f"threads {threads} cuda {torch.cuda.is_available()} tf32 {tf32}", flush=True)
    print(f"[{stage}] argv {' '.join(sys.argv[1:])}", flush=True)
    return args.config


def launched_at():
    """The start of stages.launch that started this process (CMT_JOB_STARTED), or None."""
    value = os.environ.get(STARTED_ENV)
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{STARTED_ENV}={value!r}: not seconds since the epoch; stages.launch sets it, "
                         "unset it to time the job from the stage's start") from None


def started():
    """When this job started, in seconds since the epoch (the training stages record each job's wall
    time, stages/training/job_log.py): the start of stages.launch where it started the stage (a
    multi-GPU job's processes start after `accelerate launch`), else the call of start(); None
    before start()."""
    return _started


def launched_nodes():
    """The nodes of the job stages.launch started this process in (CMT_NODES), 1 where it was not."""
    value = os.environ.get(NODES_ENV)
    if not value:
        return 1
    try:
        nodes = int(value)
    except ValueError:
        nodes = 0
    if nodes < 1:
        raise ValueError(f"{NODES_ENV}={value!r}: not a number of nodes; stages.launch sets it, unset it to "
                         "record the job as one node's")
    return nodes
