"""EDM2 pickles (the post-hoc reconstructions' layout, written here by the test): nothing embedded
runs, the architecture and the encoder's settings come out as data, the weights round-trip; foreign
or inconsistent pickles are refused."""

import copy

import pytest
import torch

from stages.files import edm2_import, unpickle
from stages.networks import edm2
from tests.edm_format import EDM2_NAMES, RunsShell, edm2_encoder_state, edm2_kwargs, write_edm2_pickle
from tests.tiny_edm2 import TINY, TINY_EXTRA, tiny_inputs, tiny_net

torch.set_num_threads(1)

def snapshot(tmp_path, encoder="vae", net=None, extra=TINY_EXTRA, **kwargs):
    net = tiny_net() if net is None else net
    path = tmp_path / "edm2-test.pkl"
    write_edm2_pickle(path, net, tmp_path / "marker", edm2_kwargs(TINY, **extra), encoder=encoder, **kwargs)
    return net, path


def test_round_trip_runs_nothing_and_keeps_the_encoder_as_data(tmp_path):
    original, path = snapshot(tmp_path)
    got = edm2_import.load_edm2(path)
    assert not (tmp_path / "marker").exists()  # neither the module source nor the persistence hook ran

    assert got.architecture == {"kind": "edm2", **edm2.DEFAULTS, **TINY}
    assert got.sigma_data == 0.5 and isinstance(got.net, edm2.EDM2Precond) and not got.net.training
    # the pickle stores float16 (as EDM2 does): the import holds exactly those values, in float32
    stored = copy.deepcopy(original).half().float().eval()
    want = stored.state_dict()
    for name, tensor in got.net.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, want[name]), name
    x, sigma, labels = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(got.net(x, sigma, labels), stored(x, sigma, labels))
        assert torch.equal(got.net.logvar(sigma), stored.logvar(sigma))

    enc = got.encoder
    assert enc["class_name"] == "StabilityVAEEncoder" and enc["vae_name"] == "stabilityai/sd-vae-ft-mse"
    assert enc["raw_mean"] == [5.81, 3.25, 0.12, -2.15] and enc["raw_std"] == [4.17, 4.62, 3.71, 3.28]
    assert enc["final_mean"] == 0.0 and enc["final_std"] == 0.5 and enc["batch_size"] == 8
    assert enc["scale"] == pytest.approx([0.5 / 4.17, 0.5 / 4.62, 0.5 / 3.71, 0.5 / 3.28], rel=1e-6)
    assert enc["bias"] == pytest.approx([-5.81 * 0.5 / 4.17, -3.25 * 0.5 / 4.62, -0.12 * 0.5 / 3.71,
                                         2.15 * 0.5 / 3.28], rel=1e-6)
    assert all(type(v) in (str, int, float, list) for v in enc.values())  # plain data, JSON-ready

    info = got.info
    assert info["class"] == "Precond" and info["tensors"] == 126 and info["stored_dtypes"] == ["float16"]
    assert info["use_fp16"] is True and info["loss_fn"] == {"class": "EDM2Loss", "P_mean": -0.8, "P_std": 1.6,
                                                            "sigma_data": 0.5}


def test_pixel_model_with_the_rgb_encoder(tmp_path):
    path = tmp_path / "uncond.pkl"
    write_edm2_pickle(path, tiny_net(label_dim=0), tmp_path / "marker",
                      edm2_kwargs({**TINY, "label_dim": 0}, **TINY_EXTRA), encoder="rgb")
    got = edm2_import.load_edm2(path)
    assert got.encoder == {"class_name": "StandardRGBEncoder"}
    assert got.architecture["label_dim"] == 0 and "unet.emb_label.weight" not in got.net.state_dict()
    assert not (tmp_path / "marker").exists()


def test_code_in_the_encoder_is_refused_unrun(tmp_path):
    marker = tmp_path / "marker"
    _, state = edm2_encoder_state("vae")
    _, path = snapshot(tmp_path, encoder_state={**state, "_vae": RunsShell(marker)})
    with pytest.raises(unpickle.UnsafePickleError, match=r"refused global \S*\.system"):
        edm2_import.load_edm2(path)
    assert not marker.exists()


def test_inconsistent_or_foreign_pickles_are_refused(tmp_path):
    # kwargs that do not describe the tensors (num_blocks not recorded: the default 3, tensors hold 2)
    _, path = snapshot(tmp_path, extra={k: v for k, v in TINY_EXTRA.items() if k != "num_blocks"})
    with pytest.raises(ValueError, match=r"'ema' tensors .* do not fit this model\n  missing: unet.dec"):
        edm2_import.load_edm2(path)

    _, path = snapshot(tmp_path, extra={**TINY_EXTRA, "resample_filter": [1, 3, 3, 1]})
    with pytest.raises(ValueError, match=r"resample_filter=\[1, 3, 3, 1\]; only \[1, 1\]"):
        edm2_import.load_edm2(path)

    kwargs = edm2_kwargs(TINY, **TINY_EXTRA)
    kwargs["unet"]["dropout"] = 0.5
    write_edm2_pickle(path, tiny_net(), tmp_path / "marker", kwargs)
    with pytest.raises(ValueError, match="Precond and UNet records disagree: dropout"):
        edm2_import.load_edm2(path)

    _, path = snapshot(tmp_path, extra={**TINY_EXTRA, "use_bias": True})
    with pytest.raises(ValueError, match=r"not understood \['use_bias'\]"):
        edm2_import.load_edm2(path)

    _, state = edm2_encoder_state("vae")
    _, path = snapshot(tmp_path, encoder_state={**state, "scale": state["scale"] * 2})
    with pytest.raises(ValueError, match="does not follow from its settings"):
        edm2_import.load_edm2(path)

    _, path = snapshot(tmp_path, class_names={**EDM2_NAMES, "EDM2Precond": "EDMPrecond"})
    with pytest.raises(ValueError, match="'ema' is EDMPrecond, expected EDM2's Precond .*edm_import"):
        edm2_import.load_edm2(path)
    assert not (tmp_path / "marker").exists()


def record(class_name, init_kwargs, modules=None):
    return unpickle.PersistentRecord({"type": "class", "version": 6, "module_src": "", "class_name": class_name,
                                      "state": {"_init_args": (), "_init_kwargs": init_kwargs,
                                                "_modules": modules or {}}})


@pytest.mark.parametrize("name, channels, kwargs", [
    ("edm2-img64-s", 3, {"model_channels": 192, "dropout": 0.0}),
    ("edm2-img64-xl", 3, {"model_channels": 384, "dropout": 0.1}),
    ("edm2-img512-xxl", 4, {"model_channels": 448, "dropout": 0.1}),
])
def test_the_official_presets_kwargs_give_our_presets(name, channels, kwargs):
    # what train_edm2.py records for a preset: the dataset's interface, the width and the dropout
    kw = {"img_resolution": 64, "img_channels": channels, "label_dim": 1000, **kwargs}
    ema = record("Precond", kw, {"unet": record("UNet", kw)})
    architecture, sigma_data, use_fp16 = edm2_import.architecture_of(ema)
    assert architecture == edm2.preset(name) and list(architecture) == list(edm2.preset(name))
    assert sigma_data == 0.5 and use_fp16
