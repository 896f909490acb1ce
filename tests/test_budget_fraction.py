"""bench/budget_fraction.py: the fraction of the baseline's budget at which the CMT route reaches
the baseline's final FD, on a made-up results folder whose numbers are worked out by hand."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("budget_fraction", REPO / "bench" / "budget_fraction.py")
budget_fraction = importlib.util.module_from_spec(spec)
spec.loader.exec_module(budget_fraction)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def tsv(path, seconds):
    write(path, f"s\th:m:s\tmax_rss\n{seconds}\t0:00:00\t100\n")


def fid(path, curve):
    write(path, json.dumps({"snapshots": {name: {"images_seen": images, "2step": {"mean": fd2}, "1step": {"mean": fd1}}
                                          for name, (images, fd2, fd1) in curve.items()}}))


def test_fraction_in_images_and_seconds(tmp_path):
    # 2 shards x 50 trajectories in 10 + 10 s; baseline: 1000 images in 100 s = 0.1 s per image,
    # so a trajectory = 20 s / 100 / 0.1 = 2 images and the pool = 200 images
    write(tmp_path / "trajectories" / "manifest.json", json.dumps({"shards": [{"count": 50}, {"count": 50}]}))
    tsv(tmp_path / "benchmarks" / "trajectory_shard" / "000000.tsv", 10)
    tsv(tmp_path / "benchmarks" / "trajectory_shard" / "000001.tsv", 10)
    tsv(tmp_path / "benchmarks" / "midtrain.tsv", 30)
    tsv(tmp_path / "benchmarks" / "posttrain" / "cmt.tsv", 40)
    tsv(tmp_path / "benchmarks" / "posttrain" / "baseline.tsv", 100)
    write(tmp_path / "midtrain" / "model.json", json.dumps({"images_seen": 300}))
    fid(tmp_path / "fid" / "baseline.json", {"p000": (0, 5.0, 9.0), "p050": (500, 1.0, 2.0), "p100": (1000, 0.5, 0.8)})
    fid(tmp_path / "fid" / "cmt.json", {"p000": (0, 0.7, 1.0), "p050": (200, 0.45, 0.9), "p100": (400, 0.3, 0.85)})
    r = budget_fraction.fraction(tmp_path)
    assert r["ect_images_per_trajectory"] == pytest.approx(2.0)
    assert r["budget_images"]["cmt_route"] == pytest.approx(200 + 300 + 400)
    # 2-step: first <= 0.5 at p050: images (200 + 300 + 200) / 1000, seconds (20 + 30 + 20) / 100
    hit = r["2step"]["reached_at"]
    assert hit["snapshot"] == "p050"
    assert hit["images_fraction"] == pytest.approx(0.7) and hit["seconds_fraction"] == pytest.approx(0.7)
    assert (r["2step"]["baseline_final"], r["2step"]["cmt_final"]) == (0.5, 0.3)
    assert r["1step"]["reached_at"] is None  # 0.85 never reaches 0.8


def test_shards_from_the_store_have_no_measured_cost(tmp_path):
    write(tmp_path / "fid" / "cmt.json", "{}")
    write(tmp_path / "fid" / "baseline.json", "{}")
    write(tmp_path / "midtrain" / "model.json", "{}")
    with pytest.raises(FileNotFoundError, match="came from the store"):
        budget_fraction.fraction(tmp_path)
