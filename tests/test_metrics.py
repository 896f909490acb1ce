"""The metrics log and the trackers (stages/training/metrics.py): lines averaged as the docstring says
(checked by hand against what the loss returned), exactly one line per logged step through kills,
slices and resumes, equal to an uninterrupted run's; TensorBoard, W&B (offline) and MLflow (a local
file store) read back through their own readers hold the log's values."""

import json
import signal
import struct
import time

import pytest
import torch
from stagekit import (
    make_dataset,
    make_teacher,
    make_trajectories,
    midtrain_config,
    posttrain_config,
    run,
    run_in_process,
    state_args,
)

from stages.core import rng
from stages.files import checkpoints
from stages.training import loop, metrics, resume
from stages.training.ema import EMA
from stages.training.kept import Kept

torch.set_num_threads(1)

ADAM = {"name": "adam", "lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "schedule": "linear_to_zero"}
TIMING = ("images_per_second", "peak_memory_gib", "wall_seconds")


class Recorder:
    """A loss of a tiny regression that reports two terms and records each part's means."""

    def __init__(self, net, crash_at=None):
        self.net, self.crash_at, self.parts = net, crash_at, []

    def __call__(self, step, part):
        if step == self.crash_at:
            raise RuntimeError("the node went away")
        x = torch.randn(8, 6, generator=rng.generator(3, step, part, "data"))
        per_sample = (self.net(x).squeeze(1) - x.sum(1)).square()
        terms = {"double": 2 * per_sample, "step": torch.full((8,), float(step))}
        self.parts.append((step, per_sample.mean().item()))
        return per_sample, terms


def setup(tmp_path, name, every=3, total=7, micro=2, state_steps=None):
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 1)
    state = None
    if state_steps is not None:
        state = resume.TrainState(tmp_path / name / "state", stage="test", identity={"config": {}},
                                  every_steps=state_steps)
        kept = state.kept = Kept(state.dir)
    else:
        kept = Kept(tmp_path / name / "kept")
    accelerator = loop.make_accelerator()
    monitor = metrics.Monitor("test", accelerator, kept, metrics=tmp_path / name / "metrics.jsonl",
                              tracking={"log_every": every}, batch=8, total_steps=total)
    return net, state, accelerator, monitor


def fit(net, state, accelerator, monitor, loss, total=7, micro=2):
    optimizer = loop.build_optimizer(net.parameters(), ADAM)
    return loop.fit(stage="test", accelerator=accelerator, net=net, ema=EMA(net, 0.9), optimizer=optimizer,
                    opt_cfg=ADAM, total_steps=total, batch=8, seed=1, loss_fn=loss, status_every=1000,
                    state=state, micro_batches=micro, monitor=monitor)


def lines(path):
    return [json.loads(line) for line in open(path)]


def same_lines(a, b, rel=1e-9):
    """The same steps and kinds with the same values, timings aside."""
    assert [(e["step"], e["kind"]) for e in a] == [(e["step"], e["kind"]) for e in b]
    for x, y in zip(a, b, strict=True):
        keep = lambda e: {k: v for k, v in e.items() if k not in TIMING and k != "kind"}  # noqa: E731
        assert keep(x) == pytest.approx(keep(y), rel=rel)


def test_a_line_averages_the_parts_and_steps_since_the_last_one(tmp_path):
    net, state, accelerator, monitor = setup(tmp_path, "run", every=3, total=7)
    loss = Recorder(net)
    fit(net, state, accelerator, monitor, loss)
    monitor.kept.publish()
    got = lines(tmp_path / "run" / "metrics.jsonl")
    assert [e["step"] for e in got] == [3, 6, 7] and all(e["kind"] == "train" for e in got)
    for entry, (lo, hi) in zip(got, [(0, 3), (3, 6), (6, 7)], strict=True):
        means = [m for s, m in loss.parts if lo <= s < hi]
        assert len(means) == 2 * (hi - lo)  # two micro-batches a step
        assert entry["loss"] == pytest.approx(sum(means) / len(means), rel=1e-12)
        assert entry["term/double"] == pytest.approx(2 * entry["loss"], rel=1e-6)
        assert entry["term/step"] == pytest.approx(sum(range(lo, hi)) / (hi - lo))
        assert entry["images"] == 8 * hi
        assert entry["lr"] == loop.lr_at(hi - 1, 7, ADAM)
        assert entry["grad_norm"] > 0 and entry["images_per_second"] > 0 and entry["peak_memory_gib"] > 0
    assert got[0]["wall_seconds"] < got[1]["wall_seconds"] < got[2]["wall_seconds"]


def test_a_crash_past_a_save_then_a_resume_logs_each_step_once_as_a_straight_run(tmp_path):
    """Saves at 5 and 10, lines every 3: a crash in step 8 leaves the line of step 6 past the last
    save; the resumed run drops it, writes it again from the sums kept with the state of step 5 (steps
    4 and 5), and ends with the straight run's lines."""
    net, state, accelerator, monitor = setup(tmp_path, "straight", total=12, state_steps=5)
    fit(net, state, accelerator, monitor, Recorder(net), total=12)
    straight = lines(monitor.kept.folder / "metrics.jsonl")

    net, state, accelerator, monitor = setup(tmp_path, "crashed", total=12, state_steps=5)
    with pytest.raises(RuntimeError, match="went away"):
        fit(net, state, accelerator, monitor, Recorder(net, crash_at=7), total=12)
    log = monitor.kept.folder / "metrics.jsonl"
    assert [e["step"] for e in lines(log)] == [3, 6]
    assert [p.name for p in (monitor.kept.folder / "metrics-pending").iterdir()] == ["pending-step000000005.json"]

    net, state, accelerator, monitor = setup(tmp_path, "crashed", total=12, state_steps=5)
    fit(net, state, accelerator, monitor, Recorder(net), total=12)
    resumed = lines(log)
    assert [e["step"] for e in resumed] == [3, 6, 9, 12]
    same_lines(resumed, straight, rel=1e-12)


def test_a_loss_that_changes_its_terms_is_an_error(tmp_path):
    net, state, accelerator, monitor = setup(tmp_path, "run")

    def loss(step, part):
        per_sample = net(torch.randn(4, 6)).squeeze(1).square()
        return per_sample, ({"a": per_sample} if step == 0 else {"b": per_sample})

    with pytest.raises(ValueError, match=r"reported terms \['term/b'\] after \['term/a'\]"):
        fit(net, state, accelerator, monitor, loss)


def test_a_tracker_whose_package_is_missing_names_the_fix(monkeypatch):
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError,
                       match=r"tracking.log_with wandb: the wandb package .*'cmt-pipeline\[tracking\]'"):
        metrics.log_with({"log_with": "wandb"})
    assert metrics.log_with({"log_with": "none"}) is None


# ----------------------------------------------------------------------------------------------
# Through the stages: slices and kills


N = 12


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    return {"dir": d, "teacher": make_teacher(d / "teacher.safetensors"), "dataset": make_dataset(d / "data"),
            "manifest": make_trajectories(d / "trajectories")}


def mid_args(inputs, run_dir, tracking=None, **checkpoint):
    return ["--config", json.dumps(midtrain_config()), "--teacher", inputs["teacher"], "--manifest", inputs["manifest"],
            "--out", run_dir / "model.safetensors", "--metrics", run_dir / "metrics.jsonl",
            "--tracking", json.dumps({"log_every": 2, "dir": str(run_dir / "tracking"), "run": "test",
                                      **(tracking or {})}),
            *state_args(run_dir / "state", **checkpoint)]


@pytest.fixture(scope="module")
def mid_straight(inputs):
    run_dir = inputs["dir"] / "straight"
    run_in_process("stages.midtrain", mid_args(inputs, run_dir, every_steps=N // 2))
    return lines(run_dir / "metrics.jsonl")


def test_a_sliced_midtrain_publishes_one_line_per_logged_step(inputs, mid_straight):
    run_dir = inputs["dir"] / "sliced"
    args = mid_args(inputs, run_dir, slice_kimg=5 * 8 / 1000)  # 5 steps a job: slices end between lines
    for _ in range(2):
        with pytest.raises(SystemExit) as stop:
            run_in_process("stages.midtrain", args)
        assert stop.value.code == resume.EXIT_SLICE
        assert not (run_dir / "metrics.jsonl").exists()  # published only with the model
    run_in_process("stages.midtrain", args)
    assert [e["step"] for e in mid_straight] == [2, 4, 6, 8, 10, 12]
    assert {"term/distance_first", "term/distance_last"} <= set(mid_straight[0])
    same_lines(lines(run_dir / "metrics.jsonl"), mid_straight)
    assert not (run_dir / "state").exists()
    # each job recorded the device it used (the ledger's GPU-hours): this CPU, one process
    jobs = checkpoints.read_meta(run_dir / "model.safetensors")["jobs"]
    assert [(j["ended"], j["device"], j["processes"], j["gpus"], j["nodes"]) for j in jobs] == [
        ("slice", "cpu", 1, 0, 1), ("slice", "cpu", 1, 0, 1), ("finished", "cpu", 1, 0, 1)]


def test_a_midtrain_killed_after_a_save_resumes_its_log(inputs, mid_straight):
    run_dir = inputs["dir"] / "killed"
    args = mid_args(inputs, run_dir, every_steps=5)
    first = run("stages.midtrain", args, faults=["--kill-after-save", 5])
    assert first.returncode == -signal.SIGKILL, first.log
    run_in_process("stages.midtrain", args)
    same_lines(lines(run_dir / "metrics.jsonl"), mid_straight)


# ----------------------------------------------------------------------------------------------
# Trackers, read back through their own readers


def post_args(inputs, run_dir, log_with, **checkpoint):
    cfg = posttrain_config(steps=N, batch=8, snapshots=[0, 0.5, 1.0])
    return ["--config", json.dumps(cfg), "--init", "teacher", "--init-model", inputs["teacher"],
            "--dataset", inputs["dataset"], "--out", run_dir / "model.safetensors", "--snapshots", run_dir / "snaps",
            "--metrics", run_dir / "metrics.jsonl",
            "--tracking", json.dumps({"log_with": log_with, "log_every": 3, "dir": str(run_dir / "tracking"),
                                      "run": "test", "project": "cmt-test"}),
            *state_args(run_dir / "state", **checkpoint)]


def scalar_names(entry):
    return sorted(k for k, v in entry.items() if k not in ("kind", "step") and isinstance(v, (int, float)))


@pytest.mark.heavy
def test_tensorboard_reads_back_the_log_after_a_kill_past_the_save(inputs):
    """Saves every 4 steps, lines every 3: a SIGKILL in step 11 leaves the events of step 9 past the
    state of step 8; the resumed job's purge_step hides them, and its own take their place."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = inputs["dir"] / "tensorboard"
    args = post_args(inputs, run_dir, "tensorboard", every_steps=4)
    first = run("stages.posttrain", args, faults=["--signal-at", "10:SIGKILL"])
    assert first.returncode == -signal.SIGKILL, first.log
    time.sleep(1.1)  # TensorBoard reads a run's event files in the order of their names: the second they were opened
    run_in_process("stages.posttrain", args)
    log = lines(run_dir / "metrics.jsonl")
    assert [e["step"] for e in log] == [3, 6, 9, 12]
    folders = list((run_dir / "tracking" / "tensorboard" / "cmt-test" / "test" / "posttrain-teacher").iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("events.out.tfevents.*"))) == 2  # one run, two jobs
    events = EventAccumulator(str(folders[0]), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert sorted(events.Tags()["scalars"]) == scalar_names(log[0])
    for name in scalar_names(log[0]):
        points = events.Scalars(name)
        assert [p.step for p in points] == [3, 6, 9, 12], name
        if name not in TIMING:
            assert [p.value for p in points] == pytest.approx([e[name] for e in log], rel=1e-6), name
    # the snapshots at 0, 6 and 12 as images, 64 samples of 8x8 in a grid of 8 x 8
    images = events.Images("samples")
    assert [i.step for i in images] == [0, 6, 12]
    assert (images[0].width, images[0].height) == (8 * 9 + 1, 8 * 9 + 1)


def wandb_history(folder):
    """{step: values} of every offline run under `folder` (their .wandb transaction logs, LevelDB's log
    format of wandb.proto Records), in the order the runs were made."""
    from wandb.proto import wandb_internal_pb2

    history = {}
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert struct.unpack("<4sHB", data[:7])[:2] == (b":W&B", 0xBEE1), path
        pos, block, chunks = 7, 32768, b""
        while pos + 7 <= len(data):
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if block - pos % block < 7 or (length, kind) == (0, 0):  # the rest of the block is padding
                pos += block - pos % block
                continue
            chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunks)
                chunks = b""
                if record.WhichOneof("record_type") == "history":
                    step = record.history.step.num
                    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    history.setdefault(step, []).append({k: v for k, v in items.items() if not k.startswith("_")})
    return history


@pytest.mark.heavy
@pytest.mark.parametrize("log_with", ["wandb", "mlflow"])
def test_wandb_offline_and_mlflow_local_hold_the_log_of_a_sliced_run(inputs, log_with, monkeypatch):
    run_dir = inputs["dir"] / log_with
    args = post_args(inputs, run_dir, log_with, slice_kimg=7 * 8 / 1000)
    # each job a process of its own: W&B's service writes its log by the time the process has ended
    first, second = run("stages.posttrain", args), run("stages.posttrain", args)
    assert first.returncode == resume.EXIT_SLICE, first.log
    assert second.returncode == 0, second.log
    log = lines(run_dir / "metrics.jsonl")
    assert [e["step"] for e in log] == [3, 6, 9, 12]
    names = scalar_names(log[0])
    if log_with == "wandb":
        history = wandb_history(run_dir / "tracking")
        runs = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "tracking" / "wandb").glob("offline-run-*")}
        assert len(runs) == 1  # both jobs logged to one run id
        assert sorted(history) == [0, 3, 6, 9, 12]
        for entry in log:
            (got,) = [h for h in history[entry["step"]] if "loss" in h]  # one row of scalars a step
            assert {k: got[k] for k in names} == pytest.approx({k: entry[k] for k in names}, rel=1e-9)
            assert {k.split("/")[0] for k in got} == {k.split("/")[0] for k in names} | (
                {"samples"} if entry["step"] in (6, 12) else set())  # the snapshots' images in their rows
        assert history[0] == [{k: v for k, v in history[0][0].items() if k.startswith("samples/")}]
    else:
        import mlflow

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as the stage does for its file store
        client = mlflow.tracking.MlflowClient((run_dir / "tracking" / "mlruns").as_uri())
        (experiment,) = [e for e in client.search_experiments() if e.name == "cmt-test"]
        (found,) = client.search_runs([experiment.experiment_id])  # both jobs logged to one run
        assert found.info.run_name == "test/posttrain:teacher"
        assert found.data.params["posttrain.q"] == "4"
        assert sorted(found.data.metrics) == names
        for name in names:
            points = sorted(client.get_metric_history(found.info.run_id, name), key=lambda m: m.step)
            assert [p.step for p in points] == [3, 6, 9, 12], name
            assert [p.value for p in points] == pytest.approx([e[name] for e in log], rel=1e-9), name


def test_a_term_that_overflows_is_logged_as_null_and_training_goes_on(tmp_path, capsys):
    net, state, accelerator, monitor = setup(tmp_path, "run", every=3, total=3)

    def loss(step, part):
        per_sample = (net(torch.randn(4, 6, generator=rng.generator(0, step, part, "x"))).squeeze(1)).square()
        return per_sample, {"weight": torch.full((4,), float("inf") if step == 1 else 1.0)}

    fit(net, state, accelerator, monitor, loss, total=3)
    (entry,) = lines(monitor.kept.folder / "metrics.jsonl")
    assert entry["term/weight"] is None and entry["loss"] > 0
    said = capsys.readouterr().out
    assert "step 3: term/weight not finite over the steps since the last line; logged as null" in said
