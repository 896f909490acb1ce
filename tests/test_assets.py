"""fetch_assets: offline it fails at once naming what to place where; online it resumes a partial
download over HTTP Range and checks the file (tested on a server on 127.0.0.1)."""

import hashlib
import time

import pytest
from range_server import PAYLOAD, RangeHandler

from stages.files import assets


def test_offline_fails_at_once_with_what_to_place_where(tmp_path):
    cfg = {"dir": str(tmp_path / "assets"), "urls": {"vgg16": "http://127.0.0.1:9/vgg16.pth",
                                                      "inception-2015-12-05": "http://127.0.0.1:9/inc.pt"}}
    t0 = time.perf_counter()
    with pytest.raises(assets.OfflineError) as err:
        assets.fetch(["vgg16"], cfg, log=lambda m: None, row_needs=["inception-2015-12-05"])
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert f"-> {tmp_path / 'assets' / 'vgg16-397923af.pth'}" in msg
    assert f"-> {tmp_path / 'assets' / 'inception-2015-12-05.pt'}" in msg and "place these files" in msg


def test_resume_and_checksums(server, tmp_path, monkeypatch):
    folder = tmp_path / "assets"
    folder.mkdir()
    name = "edm-cifar10-32x32-uncond-vp"
    (folder / f"{name}.pkl.part").write_bytes(PAYLOAD[:1000])  # an interrupted earlier transfer
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    cfg = {"dir": str(folder), "urls": {name: f"{server}/x.pkl"}, "sha256": {name: sha}}
    assets.fetch([name], cfg, log=lambda m: None)
    assert (folder / f"{name}.pkl").read_bytes() == PAYLOAD
    assert RangeHandler.requests == ["bytes=1000-"]
    assert (folder / f"{name}.pkl.sha256").read_text().split()[0] == sha
    assert not (folder / f"{name}.pkl.part").exists()

    # a published md5 that the served bytes do not match: refused, and the bad file removed
    monkeypatch.setitem(assets.CATALOG, "cifar10-python",
                        assets.Asset("unused", "cifar-10-python.tar.gz", md5="0" * 32))
    cfg = {"dir": str(folder), "urls": {"cifar10-python": f"{server}/c.tgz"}}
    with pytest.raises(ValueError, match="md5 is not the published"):
        assets.fetch(["cifar10-python"], cfg, log=lambda m: None)
    assert not (folder / "cifar-10-python.tar.gz").exists()

    # a later change to a recorded file is caught
    (folder / f"{name}.pkl").write_bytes(PAYLOAD[::-1])
    with pytest.raises(ValueError, match="differs from the one recorded"):
        assets.fetch([name], {"dir": str(folder)}, log=lambda m: None)


def test_edm2_catalog_names_and_urls():
    base = "https://nvlabs-fi-cdn.nvidia.com/edm2"
    for name in ("edm2-img64-s-1073741-0.075", "edm2-img64-xl-0671088-0.040", "edm2-img512-xxl-0939524-0.070",
                 "edm2-img512-xxl-0939524-0.075", "edm2-img512-m-0268435-0.155", "edm2-img512-m-2147483-0.100",
                 "edm2-img512-s-2147483-0.130"):
        asset = assets.resolve(name, {})
        assert (asset.url, asset.filename) == (f"{base}/posthoc-reconstructions/{name}.pkl", f"{name}.pkl")
    for name in ("img512", "img64"):
        asset = assets.resolve(f"edm2-dataset-refs-{name}", {})
        assert (asset.url, asset.filename) == (f"{base}/dataset-refs/{name}.pkl", f"edm2-dataset-refs-{name}.pkl")
