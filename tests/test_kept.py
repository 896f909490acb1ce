"""What a training run keeps past its state (stages/training/kept.py): rolled back to the step a run
resumes from, published to the declared outputs at the end."""

import json

import pytest

from stages.training.kept import JsonLog, Kept, step_name, truncate_log


def test_rollback_keeps_the_log_lines_and_step_files_up_to_the_saved_step(tmp_path):
    kept = Kept(tmp_path / "state")
    log = JsonLog(kept.keep("metrics.jsonl", tmp_path / "out" / "metrics.jsonl"))
    for step in (10, 20, 30):
        log.write({"step": step, "loss": step / 10})
    folder = kept.keep("phema", tmp_path / "out" / "phema", folder=True)
    for step in (10, 20, 30):
        (folder / step_name("ema-0.050", step, "safetensors")).write_bytes(b"x")
    (folder / "index.json").write_text("{}")  # a file of no step stays
    kept.rollback(20)
    assert [e["step"] for e in log.read()] == [10, 20]
    assert sorted(p.name for p in folder.iterdir()) == [
        "ema-0.050-step000000010.safetensors", "ema-0.050-step000000020.safetensors", "index.json"]
    # the resumed run appends after the saved step: each step once
    log.write({"step": 30, "loss": 3.5})
    assert [e["step"] for e in log.read()] == [10, 20, 30]
    kept.publish()
    assert [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()] == [
        1.0, 2.0, 3.5]
    assert sorted(p.name for p in (tmp_path / "out" / "phema").iterdir()) == sorted(p.name for p in folder.iterdir())


def test_a_line_torn_by_a_kill_is_dropped_with_what_follows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    truncate_log(path, 10)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_publishing_what_was_not_kept_is_an_error(tmp_path):
    kept = Kept(tmp_path / "state")
    kept.keep("metrics.jsonl", tmp_path / "out.jsonl")
    with pytest.raises(FileNotFoundError, match="kept no metrics.jsonl"):
        kept.publish()
