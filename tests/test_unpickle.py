"""The restricted unpickler: EDM persistence pickles load as inert data; code is refused unrun."""

import builtins
import pickle

import numpy as np
import pytest
import torch

from stages import networks
from stages.files import unpickle
from stages.networks.precond import Precond
from tests.edm_format import RunsShell, randomize, write_edm_pickle

torch.set_num_threads(1)

ARCH = {"kind": "small_unet", "in_channels": 3, "resolution": 8, "channels": 8, "channel_mult": [1, 2],
        "num_blocks": 1, "dropout": 0.0}


def test_edm_layout_loads_as_inert_data(tmp_path):
    marker = tmp_path / "marker"
    net = randomize(Precond(networks.build(ARCH), "edm"), seed=0)
    kwargs = {"model_channels": 8, "skip_scale": np.sqrt(0.5), "resample_filter": [1, 1]}
    write_edm_pickle(tmp_path / "net.pkl", net, marker, {"": kwargs})

    data = unpickle.load(tmp_path / "net.pkl")
    assert not marker.exists()  # neither the module source nor the persistence hook ran
    ema = data["ema"]
    assert isinstance(ema, unpickle.PersistentRecord) and ema.class_name == "EDMPrecond"
    assert ema.init_kwargs["skip_scale"] == pytest.approx(0.5**0.5)
    assert "pathlib" in ema.module_src  # kept as text
    assert data["dataset_kwargs"]["max_size"] == 50000 and data["loss_fn"].state["P_mean"] == -1.2

    got, want = unpickle.state_dict(ema), net.state_dict()
    assert list(got) == list(want)  # same names, same order as torch's state_dict
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
        assert not isinstance(got[name], torch.nn.Parameter)


class RunsExec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('x')",)


class GetsAttribute:
    def __reduce__(self):
        return getattr, ("text", "upper")


@pytest.mark.parametrize("payload, refused", [(RunsShell, ".system"), (RunsExec, "builtins.exec")])
def test_code_is_refused_and_not_run(tmp_path, payload, refused):
    marker = tmp_path / "marker"
    blob = pickle.dumps({"ema": payload(marker)})
    with pytest.raises(unpickle.UnsafePickleError, match=rf"refused global \S*{refused}") as err:
        unpickle.loads(blob, source="evil.pkl")
    assert "evil.pkl" in str(err.value)
    assert not marker.exists()


def test_code_hidden_inside_a_network_record_is_refused(tmp_path):
    marker = tmp_path / "marker"
    net = Precond(networks.build(ARCH), "edm")
    kwargs = {"model_channels": 8, "hook": RunsShell(marker)}
    write_edm_pickle(tmp_path / "net.pkl", net, marker, {"model": kwargs})
    with pytest.raises(unpickle.UnsafePickleError, match="refused global"):
        unpickle.load(tmp_path / "net.pkl")
    assert not marker.exists()


def test_getattr_and_object_arrays_are_refused():
    with pytest.raises(unpickle.UnsafePickleError, match="builtins.getattr"):
        unpickle.loads(pickle.dumps(GetsAttribute()))
    with pytest.raises(unpickle.UnsafePickleError):
        unpickle.loads(pickle.dumps(np.array([1, "a"], dtype=object)))
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(unpickle.loads(pickle.dumps(arr)), arr)
