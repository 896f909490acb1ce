"""Model artifacts: safetensors + model.json round trip and refusal of mismatched weights."""

import json
import os

import pytest
import torch

from stages import networks
from stages.files import atomic, checkpoints
from stages.networks.precond import Precond

torch.set_num_threads(1)

ARCH = {"kind": "small_unet", "in_channels": 1, "resolution": 8, "channels": 8, "channel_mult": [1, 2],
        "num_blocks": 1, "dropout": 0.0}


def make_precond(seed, arch=ARCH, kind="edm"):
    torch.manual_seed(seed)
    net = networks.build(arch)
    with torch.no_grad():
        for p in net.parameters():  # every tensor random, including the zero-initialised ones
            p.normal_(0, 0.2)
    return Precond(net, kind=kind, sigma_data=0.5, sigma_boundary=0.002)


def meta_for(arch=ARCH, precond="ecm"):
    return {"architecture": arch, "precond": precond, "sigma_data": 0.5, "sigma_min": 0.002,
            "key": "abc123", "config": {"lr": 1e-4}}


def test_save_load_round_trip(tmp_path):
    net, ema = make_precond(0), make_precond(1)
    path = tmp_path / "model.safetensors"
    checkpoints.save(path, net=net, ema=ema, meta=meta_for())
    assert sorted(os.listdir(tmp_path)) == ["model.json", "model.safetensors"]  # no temporaries

    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["architecture"] == ARCH
    assert meta["precond"] == "ecm" and meta["sigma_data"] == 0.5 and meta["sigma_min"] == 0.002
    assert meta["format"] == checkpoints.FORMAT
    assert meta["sha256"] == atomic.sha256_file(path)
    assert meta["key"] == "abc123" and meta["config"] == {"lr": 1e-4}

    for which, source in (("ema", ema), ("net", net)):
        loaded, lmeta = checkpoints.load(path, which=which)
        assert lmeta == meta
        assert isinstance(loaded, Precond) and loaded.kind == "ecm"
        assert loaded.sigma_data == 0.5 and loaded.sigma_boundary == 0.002
        want = source.state_dict()
        got = loaded.state_dict()
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), (which, k)
    # the two entries really hold different weights
    assert not torch.equal(net.model.conv_in.weight, ema.model.conv_in.weight)


def test_loaded_model_computes_the_same_function(tmp_path):
    ema = make_precond(2, kind="ecm")
    path = tmp_path / "m.safetensors"
    checkpoints.save(path, ema=ema, meta=meta_for())
    loaded, _ = checkpoints.load(path)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 5.0])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, sigma), ema.eval()(x, sigma))


def test_load_overrides_kind_and_dropout(tmp_path):
    path = tmp_path / "m.safetensors"
    checkpoints.save(path, ema=make_precond(0), meta=meta_for(precond="edm"))
    loaded, _ = checkpoints.load(path, kind="ecm", dropout=0.2)
    assert loaded.kind == "ecm"
    assert all(m.p == 0.2 for m in loaded.modules() if isinstance(m, torch.nn.Dropout))


def test_missing_entry_raises(tmp_path):
    path = tmp_path / "m.safetensors"
    checkpoints.save(path, ema=make_precond(0), meta=meta_for())
    with pytest.raises(KeyError, match="no 'net' weights"):
        checkpoints.load(path, which="net")
    with pytest.raises(ValueError, match="nothing to save"):
        checkpoints.save(tmp_path / "empty.safetensors", meta=meta_for())


def test_load_into_wrong_width_lists_wrong_shapes(tmp_path):
    path = tmp_path / "m.safetensors"
    checkpoints.save(path, ema=make_precond(0), meta=meta_for())
    wider = make_precond(0, arch={**ARCH, "channels": 16})
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError) as err:
        checkpoints.load_into(wider, path, "ema")
    msg = str(err.value)
    assert "wrong shape" in msg and "model.conv_in.weight" in msg and str(path) in msg
    for k, v in wider.state_dict().items():  # nothing was half-loaded
        assert torch.equal(v, before[k])


def test_load_into_other_depth_lists_missing_keys(tmp_path):
    path = tmp_path / "m.safetensors"
    checkpoints.save(path, ema=make_precond(0), meta=meta_for())
    deeper = make_precond(0, arch={**ARCH, "num_blocks": 2})
    with pytest.raises(ValueError) as err:
        checkpoints.load_into(deeper, path, "ema")
    assert "missing" in str(err.value)
    shallower_path = tmp_path / "deep.safetensors"
    checkpoints.save(shallower_path, ema=deeper, meta=meta_for({**ARCH, "num_blocks": 2}))
    with pytest.raises(ValueError) as err:
        checkpoints.load_into(make_precond(0), shallower_path, "ema")
    assert "unexpected" in str(err.value)


def test_read_meta_without_json(tmp_path):
    path = tmp_path / "lonely.safetensors"
    path.write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        checkpoints.read_meta(path)
    assert str(tmp_path / "lonely.json") in str(err.value)


def test_read_meta_wrong_format(tmp_path):
    path = tmp_path / "m.safetensors"
    (tmp_path / "m.json").write_text(json.dumps({"format": "other/0"}))
    with pytest.raises(ValueError, match="format"):
        checkpoints.read_meta(path)
