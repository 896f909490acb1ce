"""The training state: round trip, refusals, atomic replacement, and fit() stopping and resuming."""

import copy
import itertools
import json
import os
import signal
import socket
import time

import pytest
import torch
import torch.nn.functional as F
from stagekit import make_samples

from stages.core import rng
from stages.data import shards
from stages.training import job_log, loop, resume
from stages.training.ema import EMA

torch.set_num_threads(1)

ADAM = {"name": "adam", "lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "schedule": "linear_to_zero"}


class _Tiny(torch.nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.lin = torch.nn.Linear(width, 1)

    def forward(self, x):
        return self.lin(F.dropout(x, p=0.5, training=self.training))


def _setup(width=6):
    torch.manual_seed(0)
    net = _Tiny(width)
    ema = EMA(net, 0.9, rampup=0.5)
    return net, ema, loop.build_optimizer(net.parameters(), ADAM)


def _loss_fn(net, on_step=None):
    def loss(step, part):
        if on_step is not None:
            on_step(step)
        x = torch.randn(8, 6, generator=rng.generator(3, step, part, "data"))
        return (net(x).squeeze(1) - x.sum(1)).square()
    return loss


def _fit(net, ema, opt, state, total=8, on_step=None, micro_batches=1):
    return loop.fit(stage="test", accelerator=loop.make_accelerator(), net=net, ema=ema, optimizer=opt,
                        opt_cfg=ADAM, total_steps=total, batch=8, seed=1, loss_fn=_loss_fn(net, on_step),
                        status_every=1000, state=state, micro_batches=micro_batches)


def _state(folder, identity=None, **kw):
    return resume.TrainState(folder, stage="test", identity=identity or {"config": {"lr": 1}}, **kw)


def _tensors(net, ema, opt):
    out = {f"net.{k}": v.clone() for k, v in net.state_dict().items()}
    out.update({f"ema.{k}": v.clone() for k, v in ema.module.state_dict().items()})
    for i, fields in opt.state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v.clone() for k, v in fields.items()})
    return out


def _assert_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_differences_lists_nested_keys():
    old = {"config": {"midtrain": {"lr": 1e-3, "steps": 10}, "seed": 0}, "teacher_sha256": "a"}
    new = {"config": {"midtrain": {"lr": 2e-3, "steps": 10, "extra": 1}, "seed": 0}, "teacher_sha256": "b"}
    assert resume.differences(old, new) == [
        "config.midtrain.extra: (absent) in the state, 1 now",
        "config.midtrain.lr: 0.001 in the state, 0.002 now",
        'teacher_sha256: "a" in the state, "b" now',
    ]
    assert resume.differences(old, copy.deepcopy(old)) == []


@pytest.mark.parametrize("micro", [1, 2], ids=["one-batch", "accumulated"])
def test_fit_signal_then_resume_equals_a_straight_run(tmp_path, micro):
    net, ema, opt = _setup()
    _fit(net, ema, opt, _state(tmp_path / "straight"), total=8, micro_batches=micro)
    straight = _tensors(net, ema, opt)

    net, ema, opt = _setup()
    sent = []

    def send_usr1(step):
        if step == 2 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGUSR1)

    state = _state(tmp_path / "resumed", every_steps=None)
    with pytest.raises(resume.Interrupted) as stop:
        _fit(net, ema, opt, state, total=8, on_step=send_usr1, micro_batches=micro)
    assert stop.value.code == 128 + signal.SIGUSR1
    assert [s for s, _ in state.saved()] == [3]  # saved after the step the signal arrived in
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handlers are given back

    net, ema, opt = _setup()  # a fresh process would build everything anew
    _fit(net, ema, opt, _state(tmp_path / "resumed"), total=8, micro_batches=micro)
    _assert_equal(_tensors(net, ema, opt), straight)
    # the comparison is not trivial: two fewer steps give other weights
    net2, ema2, opt2 = _setup()
    _fit(net2, ema2, opt2, None, total=6, micro_batches=micro)
    assert not torch.equal(net2.lin.weight, net.lin.weight)


def test_each_job_records_its_wall_time_steps_and_end_in_the_state(tmp_path):
    """A slice, a job that crashes after its save at step 5 (a SIGKILL leaves the same state), and
    the job that finishes: three records, steps without a gap, each timed from its own start."""
    now = time.time()
    net, ema, opt = _setup()
    with pytest.raises(resume.Interrupted):  # a slice of 3 steps of 8 images
        _fit(net, ema, opt, _state(tmp_path, slice_kimg=0.024, started=now - 100), total=8)

    def crash(step):
        if step == 5:
            raise RuntimeError("the node went away")

    net, ema, opt = _setup()
    with pytest.raises(RuntimeError, match="went away"):
        _fit(net, ema, opt, _state(tmp_path, every_steps=1, started=now - 50), total=8, on_step=crash)
    running = json.loads((tmp_path / "step-000000005" / "state.json").read_text())["jobs"]
    assert [(j["steps"], j["ended"]) for j in running] == [([0, 3], "slice"), ([3, 5], job_log.RUNNING)]

    net, ema, opt = _setup()
    last = _state(tmp_path, started=now - 10)
    _fit(net, ema, opt, last, total=8)
    jobs = last.log.through(8, "finished")  # what TrainingJob.finish writes into the model file
    assert [(j["steps"], j["ended"]) for j in jobs] == [([0, 3], "slice"), ([3, 5], "lost"), ([5, 8], "finished")]
    took = time.time() - now  # each record: the seconds since its start, at its last save
    for job, start in zip(jobs, (100, 50, 10), strict=True):
        assert start <= job["wall_seconds"] <= start + took
    assert jobs[1] == {**running[1], "ended": "lost"}
    with pytest.raises(ValueError, match="job ended 'killed'"):
        last.log.through(8, "killed")


def test_save_keeps_only_complete_states_and_ignores_partial_ones(tmp_path):
    net, ema, opt = _setup()
    state = _state(tmp_path, every_steps=2)
    _fit(net, ema, opt, state, total=5)
    assert [s for s, _ in state.saved()] == [5]  # 2 and 4 replaced once a newer one was complete
    partial = tmp_path / ".tmp-step-000000009-123"
    partial.mkdir()
    (partial / "state.safetensors").write_bytes(b"half a file")
    net, ema, opt = _setup()
    assert state.restore(net=net, ema=ema.module, optimizer=opt)[0] == 5
    assert not partial.exists()
    info = json.loads((tmp_path / "step-000000005" / "state.json").read_text())
    assert info["format"] == resume.FORMAT and info["images"] == 40
    assert info["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]
    assert isinstance(opt.param_groups[0]["betas"], tuple)


def test_a_second_job_on_the_same_state_folder_is_refused(tmp_path):
    first = _state(tmp_path)
    first.lock()
    with pytest.raises(RuntimeError, match=rf"another job is training from this state folder right now "
                                           rf"\(pid {os.getpid()} on {socket.gethostname()}"):
        _state(tmp_path).lock()
    first.finish()
    _state(tmp_path).lock()  # free again once the first job is done


def test_saves_fall_due_by_steps_or_minutes(tmp_path):
    by_steps = _state(tmp_path, every_steps=5)
    assert [s for s in range(1, 16) if by_steps.due(s)] == [5, 10, 15]
    assert not _state(tmp_path, every_minutes=60).due(7)
    assert _state(tmp_path, every_minutes=1e-9).due(7)
    assert not _state(tmp_path).due(5)  # neither set: only signals, slices and the last step save
    sliced = _state(tmp_path, slice_kimg=0.1)
    assert not sliced.slice_done(99) and sliced.slice_done(100)


def test_restore_refuses_a_different_architecture_listing_keys(tmp_path):
    net, ema, opt = _setup()
    _fit(net, ema, opt, _state(tmp_path), total=2)
    net, ema, opt = _setup(width=7)
    with pytest.raises(ValueError, match=r"saved net tensors do not fit(.|\n)*wrong shape: lin.weight"):
        _state(tmp_path).restore(net=net, ema=ema.module, optimizer=opt)


def test_restore_refuses_a_damaged_state(tmp_path):
    net, ema, opt = _setup()
    _fit(net, ema, opt, _state(tmp_path), total=2)
    weights = tmp_path / "step-000000002" / "state.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 differs.*damaged"):
        _state(tmp_path).restore(net=net, ema=ema.module, optimizer=opt)


def test_nan_names_stage_step_and_last_good_state(tmp_path):
    net, ema, opt = _setup()

    def poison(step):
        if step == 3:
            with torch.no_grad():
                net.lin.bias.fill_(float("nan"))

    with pytest.raises(FloatingPointError) as err:
        _fit(net, ema, opt, _state(tmp_path, every_steps=2), total=8, on_step=poison)
    assert str(err.value).startswith("[test] loss is nan at step 3;")
    assert f"Last good state: {tmp_path / 'step-000000002'} (step 2)" in str(err.value)


def test_stream_resumes_mid_epoch_exactly(tmp_path):
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"s{k}.tar")
        shards.write_shard(paths[-1], make_samples(7 * k, 7))
    straight = shards.TrajectoryStream(paths, 5, shuffle_buffer=3)
    first = [next(straight)["index"] for _ in range(17)]  # 14 per epoch: stops 3 into epoch 1
    position = straight.state_dict()
    assert position == {"epoch": 1, "offset": 3}
    rest = [next(straight)["index"] for _ in range(20)]

    resumed = shards.TrajectoryStream(paths, 5, shuffle_buffer=3)
    resumed.load_state_dict(position)
    assert [s["index"] for s in itertools.islice(resumed, 20)] == rest
    fresh = shards.TrajectoryStream(paths, 5, shuffle_buffer=3)
    assert [s["index"] for s in itertools.islice(fresh, 20)] != rest  # the position matters
    assert sorted(first[:14]) == list(range(14))


def test_a_job_records_the_nodes_it_ran_on(monkeypatch):
    """stages.launch tells a job's processes its nodes (CMT_NODES); a record without them (written
    before records had them) is one node's, and a record with a number of nodes that is none is refused."""
    assert job_log.JobLog(nodes=4).through(3, "slice")[-1]["nodes"] == 4
    monkeypatch.delenv("CMT_NODES", raising=False)
    assert job_log.JobLog().through(3, "slice")[-1]["nodes"] == 1
    monkeypatch.setenv("CMT_NODES", "2")
    log = job_log.JobLog()
    log.resume([{"wall_seconds": 5.0, "steps": [0, 3], "ended": "slice"}], 3)  # an old record keeps its form
    assert [j.get("nodes") for j in log.through(6, "finished")] == [None, 2]
    assert job_log.check(log.through(6, "finished"), "m.json")
    for bad in ("two", "0"):
        monkeypatch.setenv("CMT_NODES", bad)
        with pytest.raises(ValueError, match=f"CMT_NODES='{bad}': not a number of nodes"):
            job_log.JobLog()
    for nodes in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"jobs\[0\] .* nodes >= 1 where given"):
            job_log.check([{"wall_seconds": 5.0, "steps": [0, 3], "ended": "finished", "nodes": nodes}], "m.json")
