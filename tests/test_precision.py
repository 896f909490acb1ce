"""TF32 from the config's `tf32` (CMT_TF32, which the Snakefile exports): every stage sets torch's
flags at start, and every model file records the flags it was computed under. The flags can be
set without a GPU; the end-to-end run with tf32: true is in test_pipeline."""

import argparse
import json

import pytest
import torch

from stages import networks
from stages.core import cli, precision
from stages.files import checkpoints
from stages.networks.precond import Precond


@pytest.fixture(autouse=True)
def restore_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("env, on", [("1", True), ("0", False), (None, False)])
def test_apply_sets_both_flags(monkeypatch, env, on):
    # start from the opposite of the wanted state (PyTorch's default is matmul off, cuDNN on)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not on
    if env is None:
        monkeypatch.delenv(precision.ENV, raising=False)
    else:
        monkeypatch.setenv(precision.ENV, env)
    assert precision.apply() == {"matmul": on, "cudnn": on}
    assert torch.backends.cuda.matmul.allow_tf32 is on and torch.backends.cudnn.allow_tf32 is on


def test_a_malformed_value_is_refused(monkeypatch):
    monkeypatch.setenv(precision.ENV, "true")
    with pytest.raises(ValueError, match="CMT_TF32='true': expected 0 or 1"):
        precision.apply()


def test_stage_start_sets_the_flags_and_says_so(monkeypatch, capsys):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    monkeypatch.setenv(precision.ENV, "1")
    cli.start(argparse.Namespace(config={}, threads=1), "test")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert "tf32 {'matmul': True, 'cudnn': True}" in capsys.readouterr().out


@pytest.mark.parametrize("on", [True, False])
def test_model_files_record_the_flags(tmp_path, on):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    arch = {"kind": "small_unet", "in_channels": 1, "resolution": 8, "channels": 8, "channel_mult": [1],
            "num_blocks": 1, "dropout": 0.0}
    net = Precond(networks.build(arch), "edm", 0.5, 0.002)
    checkpoints.save(tmp_path / "m.safetensors", net=net, meta={"architecture": arch, "precond": "edm"})
    assert json.loads((tmp_path / "m.json").read_text())["tf32"] == {"matmul": on, "cudnn": on}
