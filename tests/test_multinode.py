"""A training rule's job across several nodes: what the rule asks SLURM's executor plugin for
(stages/config/multinode.py), the checks that the batch splits over nodes x GPUs, the launcher's
options in the rule's command, and (heavy) two launchers on this machine as two nodes of one process
each training what one node with two processes trains, through a signal on one node and a resume.
The SLURM submission and a real 2-node job: tests/test_slurm_nodes.py."""

import json
import os
import signal
import subprocess
import sys

import pytest
from stagekit import REPO, make_teacher, make_trajectories, midtrain_config, state_args
from workflow_runs import planned_resources, snakemake

from stages.config import checks, multinode, resolve
from stages.files import checkpoints
from stages.training import resume


def test_a_rule_on_several_nodes_asks_for_them_with_its_gpus_on_each():
    assert multinode.slurm_resources(8, 1) == {}  # one node: the rule's resources as they are
    assert multinode.slurm_resources(8, 4) == {"nodes": 4, "tasks": 4, "tasks_per_gpu": 0, "mpi": "srun", "gpu": 0,
                                               "gres": "gpu:8"}
    assert multinode.slurm_resources(4, 2, "h100")["gres"] == "gpu:h100:4"
    assert multinode.slurm_resources(4, 2, "h100")["gpu_model"] == ""  # else the plugin adds --gpus=h100:4
    assert "gres" not in multinode.slurm_resources(0, 2)
    # what the launcher is told, from the resources as the job sees them
    assert multinode.launch_gpus({"gpu": 8}) == 8 and multinode.launch_gpus({}) == 0
    assert multinode.launch_gpus({"gpu": 2, "nodes": 1}) == 2
    assert multinode.launch_gpus(multinode.slurm_resources(8, 4)) == "8 --nodes 4"
    assert multinode.launch_gpus(multinode.slurm_resources(4, 2, "h100")) == "4 --nodes 2"
    assert multinode.launch_gpus(multinode.slurm_resources(0, 2)) == "0 --nodes 2"


def test_nodes_for_a_rule_that_runs_one_process_are_refused():
    assert multinode.problems({"posttrain": 4, "midtrain_mf": 2, "sample": 1}) == []
    (found,) = multinode.problems({"sample": 2, "midtrain": 2})
    assert found.startswith("resources.sample.nodes: 2, but sample runs one process"), found
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="resources.midtrain.nodes: .* must be a whole number of nodes"):
            multinode.count(bad, "resources.midtrain.nodes")


def test_the_batch_must_split_over_nodes_x_gpus():
    """The default row: midtrain 8 trajectories a step from 4 shards, posttrain 128 images."""
    cfg = resolve()
    assert checks.process_problems(cfg, {"midtrain": 2, "posttrain": 4}, {"midtrain": 2, "posttrain": 8}) == []
    found = checks.process_problems(cfg, {"midtrain": 2, "posttrain": 3}, {"midtrain": 3, "posttrain": 2})
    assert found[0].startswith("resources.midtrain: 3 nodes x 2 GPUs (6 processes, one process each) cannot share "
                               "midtrain.batch / trajectories.nfe = 8 trajectories per step"), found
    assert "--set-resources midtrain:gpu=G midtrain:nodes=M with G x M" in found[0]
    assert found[1].startswith("resources.midtrain: 3 nodes x 2 GPUs (6 processes, one process each, reading their "
                               "own shards) but trajectories.num_shards is 4"), found
    assert found[2].startswith("resources.posttrain: 2 nodes x 3 GPUs (6 processes"), found
    # a node without GPUs runs one process
    assert checks.process_problems(cfg, {"posttrain": 0}, {"posttrain": 3})[0].startswith(
        "resources.posttrain: 3 nodes x 0 GPUs (3 processes")


@pytest.mark.heavy
def test_the_rule_asks_the_plugin_for_the_nodes_and_tells_the_launcher(tmp_path):
    """A dry run: the job's resources are the plugin's form of nodes x GPUs, and its command differs
    from one node's in the launcher's options alone (which are no part of Snakemake's rerun triggers:
    a function of `output`)."""
    one = planned_resources(snakemake(tmp_path, "-n", "-p"), "midtrain")[0]
    result = snakemake(tmp_path, "-n", "-p", "--set-resources", "midtrain:nodes=2", "midtrain:gpu=2",
                       "midtrain:cpus_per_task=4")
    rule, res, command = planned_resources(result, "midtrain")[0]
    assert {k: res[k] for k in ("nodes", "tasks", "tasks_per_gpu", "mpi", "gres", "gpu", "cpus_per_task")} == {
        "nodes": "2", "tasks": "2", "tasks_per_gpu": "0", "mpi": "srun", "gres": "gpu:2", "gpu": "0",
        "cpus_per_task": "4"}, res
    assert "python -m stages.launch --gpus 2 --nodes 2 stages.midtrain " in command
    assert command.replace("--gpus 2 --nodes 2 ", "--gpus 1 ") == one[2]  # the rest of the command as on one node
    for change, message in (("sample:nodes=2", "resources.sample.nodes: 2, but sample runs one process"),
                            ("posttrain:nodes=3", "resources.posttrain: 3 nodes x 1 GPUs (3 processes")):
        refused = snakemake(tmp_path, "-n", "--set-resources", change)
        assert refused.returncode != 0 and message in refused.stdout + refused.stderr


# ---- two machines of one process each against one machine of two ------------------------------

N = 8  # steps; the signal falls at step 3 on the second machine only


def launch(module_args, tmp_path, *options, faults=(), name="run"):
    """`python -m stages.launch ... stages.midtrain` in a new session (a machine's own processes), through
    tests/run_stage.py where it has `faults`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    for key in ("SLURM_JOB_ID", "CMT_NODE_RANK", "CMT_MAIN_ADDRESS", "CMT_MAIN_PORT"):
        env.pop(key, None)
    log = open(tmp_path / f"{name}.log", "w")
    stage = ["run_stage", *faults, "--", "stages.midtrain"] if faults else ["stages.midtrain"]
    proc = subprocess.Popen([sys.executable, "-m", "stages.launch", *options, *stage, *map(str, module_args),
                             "--threads", "1"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = tmp_path / f"{name}.log"
    return proc


def finish(*procs, timeout=300):
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def two_machines(module_args, tmp_path, name, faults_on_second=()):
    port = str(_free_port())
    machines = [launch(module_args, tmp_path, "--nodes", "2", "--node-rank", str(rank), "--main-address", "127.0.0.1",
                       "--main-port", port, faults=faults_on_second if rank == 1 else (), name=f"{name}-{rank}")
                for rank in (1, 0)]
    codes = finish(*machines)
    return codes[::-1], [m.log.read_text() for m in machines[::-1]]


def _free_port():
    from stages import launch as launcher

    return launcher.free_port()


def midtrain_inputs(tmp_path):
    """(run name -> a mid-training's arguments, the teacher): 3 shards of 4 trajectories."""
    teacher = make_teacher(tmp_path / "teacher.safetensors")
    manifest = make_trajectories(tmp_path / "traj", num_shards=3, per_shard=4)

    def args(run):
        return ["--config", json.dumps(midtrain_config(steps=N)), "--teacher", teacher, "--manifest", manifest,
                "--out", tmp_path / run / "model.safetensors", *state_args(tmp_path / run / "state")]

    return args, teacher


@pytest.mark.heavy
def test_two_machines_of_one_process_train_what_one_machine_of_two_trains_through_a_resume(tmp_path):
    """Mid-training (each rank reads its own shards) for 8 steps: one machine with two processes
    straight through, and two launchers on this machine as two nodes of one process each, where a
    SIGUSR1 reaches the second machine's process alone at step 3: every rank stops after that step,
    rank 0 saves, both machines exit; the same two launchers again resume from the state on the
    shared folder and finish. The models agree to float tolerance, and the model's record says both
    jobs ran on two nodes."""
    import torch
    from safetensors.torch import load_file

    args, teacher = midtrain_inputs(tmp_path)
    one = launch(args("one"), tmp_path, "--processes", "2", name="one")
    assert finish(one) == [0], one.log.read_text()[-3000:]

    codes, logs = two_machines(args("two"), tmp_path, "first", faults_on_second=("--signal-at", "3:SIGUSR1"))
    assert all(code != 0 for code in codes), logs
    for log in logs:  # the first machine stopped too, its process told by the collective of the step
        assert f"stopped by SIGUSR1; state saved at step 4/{N}" in log, log[-3000:]
    assert "received SIGUSR1" in logs[1] and "received SIGUSR1" not in logs[0]
    assert "on node 0 of 2, main process at 127.0.0.1" in logs[0] and "on node 1 of 2" in logs[1]
    assert sorted(p.name for p in (tmp_path / "two" / "state").glob("step-*")) == [f"step-{4:09d}"]

    codes, logs = two_machines(args("two"), tmp_path, "second")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert f"at step 4/{N}" in logs[0] and "resumed from" in logs[1]
    jobs = checkpoints.read_meta(tmp_path / "two" / "model.safetensors")["jobs"]
    assert [(j["steps"], j["ended"], j.get("signal"), j["nodes"]) for j in jobs] == [
        ([0, 4], "signal", "SIGUSR1", 2), ([4, N], "finished", None, 2)]
    assert checkpoints.read_meta(tmp_path / "one" / "model.safetensors")["jobs"][0]["nodes"] == 1

    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("one", "two"))
    init = load_file(str(teacher))
    assert any(not torch.equal(a[k], init["ema." + k.split(".", 1)[1]]) for k in a if k.startswith("net."))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.heavy
def test_ranks_on_other_nodes_leave_a_state_folder_another_job_holds_alone(tmp_path):
    """Another job holds the state folder (its lock) and is writing a state into it: a job of two
    machines on the same folder stops before any rank touches it. The main process finds the lock;
    the rank on the other machine learns so from it, before it would tidy the folder (a killed
    writer's partial state, which here is the other job's save in progress) or read it."""
    args, _ = midtrain_inputs(tmp_path)
    folder = tmp_path / "run" / "state"
    other = resume.TrainState(folder, stage="midtrain", identity={})
    other.lock()
    partial = folder / ".tmp-step-000000004-999"
    partial.mkdir()
    (partial / "state.safetensors").write_bytes(b"being written")
    codes, logs = two_machines(args("run"), tmp_path, "locked")
    assert all(code != 0 for code in codes), logs
    assert partial.exists() and not list(folder.glob("step-*"))
    assert "another job is training from this state folder" in logs[0], logs[0][-3000:]
    assert "the main process found another job training from this state folder" in logs[1], logs[1][-3000:]
    other.unlock()
