"""The GPU session scripts on a CPU, so that they cannot rot before a GPU runs them: bench/gpu_install.sh
against wheels built here, bench/gpu_summary.py's reading of Snakemake logs, and dry runs of
bench/gpu_first_contact.sh and bench/gpu_session.sh (CMT_GPU_SCRIPTS_DEVICE=cpu) with a step that
fails and steps cut by their time limits; the full CPU dry runs are heavy."""

import ensurepip
import json
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest
from workflow_runs import REPO

from bench import gpu_summary

FIRST_CONTACT = REPO / "bench" / "gpu_first_contact.sh"
SESSION = REPO / "bench" / "gpu_session.sh"


def run_script(script, out, env, *args, timeout=600):
    """Run a session script in CPU mode with this interpreter; (CompletedProcess, summary.json). The
    scripts' limits are sized for a GPU: tripled here (CMT_GPU_LIMIT_SCALE), for a CPU that other tests
    load too; limits a test sets by name (CMT_GPU_LIMITS) are not scaled."""
    env = {**os.environ, "PYTHON": sys.executable, "CMT_GPU_SCRIPTS_DEVICE": "cpu", "CMT_GPU_LIMIT_SCALE": "3", **env}
    result = subprocess.run(["bash", str(script), str(out), *args], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=timeout)
    summary = json.loads((out / "summary.json").read_text())
    return result, summary


def steps_of(summary):
    return {s["name"]: s for s in summary["steps"]}


# --- bench/gpu_summary.py: the first error line, and what a Snakemake log says ---------------------------

# Snakemake 9's log of a run whose job `a` raised and whose job `b` was stopped by a signal
SNAKEMAKE_LOG = """Building DAG of jobs...
[Sun Dec  6 14:14:22 2026]
localrule a:
    output: a.txt
    log: logs/a.log
    jobid: 1
    resources: tmpdir=/tmp
[Sun Dec  6 14:14:22 2026]
localrule b:
    output: b.txt
    log: logs/b.log
    jobid: 2
    resources: tmpdir=/tmp
[Sun Dec  6 14:14:22 2026]
localrule c:
    output: c.txt
    jobid: 3
[Sun Dec  6 14:14:22 2026]
Finished jobid: 3 (Rule: c)
1 of 4 steps (25%) done
RuleException:
CalledProcessError in file "/tmp/sm3/Snakefile", line 6:
Command 'set -euo pipefail;  python stage_a.py > logs/a.log 2>&1' returned non-zero exit status 1.
[Sun Dec  6 14:14:23 2026]
Error in rule a:
    message: None
    jobid: 1
    output: a.txt
    log: logs/a.log (check log file(s) for error details)
    shell:
        python stage_a.py > logs/a.log 2>&1
        (command exited with non-zero exit code)
Will exit after finishing currently running jobs (scheduler).
RuleException:
CalledProcessError in file "/tmp/sm3/Snakefile", line 10:
Command 'set -euo pipefail;  sleep 30; touch b.txt' died with <Signals.SIGTERM: 15>.
[Sun Dec  6 14:14:24 2026]
Error in rule b:
    message: None
    jobid: 2
    output: b.txt
    log: logs/b.log (check log file(s) for error details)
    shell:
        sleep 30; touch b.txt
        (command exited with non-zero exit code)
Shutting down, this might take some time.
"""
JOB_A_LOG = """[launch] 1 process(es)
Traceback (most recent call last):

  File "stage_a.py", line 3, in <module>
    main()

ValueError: posttrain.batch: 3 is not a multiple of 2 GPUs
"""


def test_first_error_is_the_traceback_exception_else_the_first_error_word():
    assert gpu_summary.first_error(JOB_A_LOG) == "ValueError: posttrain.batch: 3 is not a multiple of 2 GPUs"
    assert gpu_summary.first_error("loading\nwarning: slow\nERROR: Could not find a version\nError 2") == \
        "ERROR: Could not find a version"
    assert gpu_summary.first_error("step 1\nstep 2\n") is None
    # Snakemake's hints name no error of their own
    assert gpu_summary.first_error("    log: x.log (check log file(s) for error details)\n") is None


def test_snakemake_log_failed_jobs_signals_and_progress():
    parsed = gpu_summary.parse_snakemake(SNAKEMAKE_LOG)
    assert parsed["jobs"] == {"1": ("a", ["logs/a.log"]), "2": ("b", ["logs/b.log"]), "3": ("c", [])}
    assert parsed["finished"] == {"3"} and parsed["progress"] == (1, 4)
    assert parsed["failed"] == [{"rule": "a", "jobid": "1", "logs": ["logs/a.log"], "signal": None},
                                {"rule": "b", "jobid": "2", "logs": ["logs/b.log"], "signal": "SIGTERM"}]


def fake_workdir(tmp_path):
    work = tmp_path / "work" / "row"
    (work / ".snakemake" / "log").mkdir(parents=True)
    (work / ".snakemake" / "log" / "2026-12-06T141422.1.snakemake.log").write_text(SNAKEMAKE_LOG)
    (work / "logs").mkdir()
    (work / "logs" / "a.log").write_text(JOB_A_LOG)
    (work / "logs" / "b.log").write_text("[launch] 1 process(es)\n")
    (work / "results" / "tiny").mkdir(parents=True)
    (work / "results" / "tiny" / "report.md").write_text("# tiny\n")
    (tmp_path / "row.log").write_text("== row\nWorkflowError:\nAt least one job did not complete successfully.\n")
    return work


def record(tmp_path, *args):
    gpu_summary.main([str(tmp_path), "--script", "test", "--log", str(tmp_path / "row.log"), *args])
    return json.loads((tmp_path / "summary.json").read_text())


def test_a_failed_snakemake_step_names_its_failed_job_and_keeps_its_log(tmp_path):
    work = fake_workdir(tmp_path)
    summary = record(tmp_path, "--name", "row", "--rc", "1", "--seconds", "5", "--limit", "60", "--workdir", str(work))
    (step,) = summary["steps"]
    assert step["status"] == "failed" and summary["counts"] == {"failed": 1}
    assert step["error"] == "ValueError: posttrain.batch: 3 is not a multiple of 2 GPUs (logs/a.log)"
    assert [j["rule"] for j in step["jobs_failed"]] == ["a", "b"]
    assert step["jobs_failed"][1]["error"] == "rule b was killed (SIGTERM)"
    assert (tmp_path / "row" / "logs" / "logs" / "a.log").read_text() == JOB_A_LOG
    assert (tmp_path / "row" / "report-tiny.md").read_text() == "# tiny\n"
    md = (tmp_path / "summary.md").read_text()
    assert "| row | failed | 5 (60) | ValueError: posttrain.batch" in md and "- row: rule a: ValueError" in md


def test_a_step_cut_by_its_limit_is_a_timeout_and_says_what_ran(tmp_path):
    work = fake_workdir(tmp_path)
    summary = record(tmp_path, "--name", "row", "--rc", "124", "--seconds", "60.2", "--limit", "60",
                     "--workdir", str(work))
    (step,) = summary["steps"]
    assert step["status"] == "timeout"
    # job b was stopped by the cut: running, not failed; job a had failed on its own before
    assert step["running_when_cut"] == ["b"] and [j["rule"] for j in step["jobs_failed"]] == ["a"]
    assert step["error"].startswith("cut at its time limit of 60 s after 1 of 4 Snakemake steps done, running b; "
                                    "a job failed before: rule a: ValueError")
    # the same exit status well before the limit is a failure (a kill from elsewhere)
    summary = record(tmp_path, "--name", "again", "--rc", "137", "--seconds", "3", "--limit", "60")
    assert steps_of(summary)["again"]["status"] == "failed"


def test_steps_that_did_not_run_and_the_bundle(tmp_path, monkeypatch):
    bundle = tmp_path / "bundle"
    monkeypatch.setenv("CMT_GPU_BUNDLE", str(bundle))
    out = tmp_path / "out"
    (out / "work" / "row").mkdir(parents=True)
    (out / "work" / "row" / "big.bin").write_bytes(b"0" * 1000)
    (out / "check.log").write_text("== guide_fp16\n   not available: no key yet\n")
    gpu_summary.main([str(out), "--script", "test", "--name", "ddp", "--status", "skipped", "--note", "one GPU"])
    gpu_summary.main([str(out), "--script", "test", "--name", "check", "--rc", "3", "--not-available-rc", "3",
                      "--log", str(out / "check.log")])
    steps = steps_of(json.loads((bundle / "test-summary.json").read_text()))
    assert steps["ddp"]["status"] == "skipped" and steps["ddp"]["note"] == "one GPU"
    assert steps["check"]["status"] == "not available" and steps["check"]["note"] == "not available: no key yet"
    assert "| ddp | skipped |" in (bundle / "test-summary.md").read_text()
    with tarfile.open(bundle / "test.tar.gz") as tar:
        names = tar.getnames()
    assert "test/summary.json" in names and "test/check.log" in names
    assert not any("/work" in n for n in names), names  # the Snakemake workdirs stay behind


# --- bench/gpu_install.sh: from a folder of wheels only ------------------------------------------------------

def write_wheel(folder, name, version, code, requires=()):
    """A pure-Python wheel of one module, written by hand (a zip with its dist-info)."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {f"{module}/__init__.py": code,
             f"{info}/METADATA": "Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n"
                                 + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{module}-{version}-py3-none-any.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)


@pytest.mark.heavy
def test_install_skips_what_imports_installs_the_rest_and_names_what_it_could_not(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels, "cmt-probe-a", "1.0", "VALUE = 42\n", requires=["cmt-probe-b>=2"])
    write_wheel(wheels, "cmt-probe-broken", "1.0", "raise RuntimeError('needs a GPU')\n")
    (wheels / "wheels.txt").write_text(
        "# distribution==version module\n"
        f"pip=={ensurepip.version()} pip\n"
        "cmt-probe-a==1.0 cmt_probe_a\n"
        "cmt-probe-missing==1.0 cmt_probe_missing\n"
        "cmt-probe-broken==1.0 cmt_probe_broken\n")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_install.sh"), str(wheels)], capture_output=True,
                            text=True, env={**os.environ, "PYTHON": str(python)}, cwd=tmp_path)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "skip pip==" in out and "pip is importable already" in out
    assert "could not install cmt-probe-missing==1.0:" in out
    assert "does not import: cmt-probe-broken (cmt_probe_broken): RuntimeError: needs a GPU" in out
    assert "note: cmt-probe-a requires cmt-probe-b>=2, installed: none" in out
    assert out.rstrip().endswith("could not install: cmt-probe-missing==1.0")
    assert subprocess.run([str(python), "-c", "import cmt_probe_a; print(cmt_probe_a.VALUE)"], capture_output=True,
                          text=True).stdout == "42\n"
    # nothing outside the folder: the interpreter running the tests is untouched
    assert subprocess.run([sys.executable, "-c", "import cmt_probe_a"], capture_output=True).returncode != 0


# --- the scripts' dry runs on this CPU ------------------------------------------------------------------------

@pytest.fixture
def present_wheels(tmp_path):
    """A wheel folder whose every package this interpreter already has: the install step skips them all."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    (folder / "wheels.txt").write_text("pyyaml==6 yaml\ntorch==2 torch\n")
    return folder


@pytest.mark.heavy
def test_first_contact_records_a_failing_row_a_cut_row_and_the_steps_it_skips(tmp_path, present_wheels):
    out, bundle = tmp_path / "out", tmp_path / "bundle"
    result, summary = run_script(FIRST_CONTACT, out, {
        "CMT_GPU_WHEELS": str(present_wheels), "CMT_GPU_BUNDLE": str(bundle), "CMT_GPU_CHECKS": "tf32_flags",
        "CMT_GPU_ROWS": "broken:60:config/rows/nope.yaml cut:4:tests/tiny.yaml"})
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    steps = steps_of(summary)
    # the rows run at once: they are recorded as they end
    assert [n for n in steps if n not in ("broken", "cut")] == ["install", "environment", "checks", "guide-fp16", "ddp"]
    assert {n: s["status"] for n, s in steps.items()} == {
        "install": "passed", "environment": "passed", "checks": "passed", "guide-fp16": "passed",
        "broken": "failed", "cut": "timeout", "ddp": "skipped"}
    assert "nope.yaml" in steps["broken"]["error"]
    assert steps["cut"]["error"].startswith("cut at its time limit of 12 s")  # 4 s, scaled
    assert "two GPUs" in steps["ddp"]["note"]
    assert "skip pyyaml==6: yaml is importable already" in (out / "install.log").read_text()
    assert [c["name"] for c in summary["checks"]] == ["guide_fp16", "tf32_flags"]
    assert summary["environment"]["cuda_available"] is False
    md = (out / "summary.md").read_text()
    assert "| broken | failed |" in md and "| cut | timeout |" in md
    assert sorted(p.name for p in bundle.iterdir()) == [
        "first-contact-summary.json", "first-contact-summary.md", "first-contact.tar.gz"]


@pytest.mark.heavy
def test_session_records_each_measurement_cut_by_its_limit(tmp_path):
    out = tmp_path / "out"
    result, summary = run_script(SESSION, out, {
        "CMT_GPU_WHEELS": str(tmp_path / "none"), "CMT_GPU_LIMITS": "row-costs=3 gpu-figures=3 ratios-digits=3"})
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    steps = steps_of(summary)
    assert {n: s["status"] for n, s in steps.items()} == {
        "install": "skipped", "environment": "passed", "row-costs": "timeout", "gpu-figures": "timeout",
        "ratios-digits": "timeout"}
    assert all(steps[n]["error"].startswith("cut at its time limit of 3 s")
               for n in ("row-costs", "gpu-figures", "ratios-digits"))


@pytest.mark.heavy
def test_first_contact_dry_run_on_cpu_reaches_the_tiny_report(tmp_path):
    out = tmp_path / "out"
    result, summary = run_script(FIRST_CONTACT, out, {"CMT_GPU_WHEELS": str(tmp_path / "none")})
    steps = steps_of(summary)
    assert result.returncode == 0, json.dumps(summary, indent=1)[-3000:]
    assert {n: s["status"] for n, s in steps.items()} == {
        "install": "skipped", "environment": "passed", "checks": "passed", "guide-fp16": "passed",
        "tiny": "passed", "ddp": "skipped"}
    checks = {c["name"]: c["status"] for c in summary["checks"]}
    assert checks["cuda_device"] == checks["launch_claim"] == "skipped"
    assert sum(name.startswith("train_step") and status == "passed" for name, status in checks.items()) == 5
    assert steps["tiny"]["reports"] == ["tiny/report-tiny.md"]
    assert "| CMT init (ours) |" in (out / "tiny" / "report-tiny.md").read_text()


@pytest.mark.heavy
def test_session_dry_run_on_cpu_writes_every_measurement(tmp_path):
    out = tmp_path / "out"
    result, summary = run_script(SESSION, out, {"CMT_GPU_WHEELS": str(tmp_path / "none")})
    assert result.returncode == 0, json.dumps(summary, indent=1)[-3000:]
    assert [s["status"] for s in summary["steps"]] == ["skipped", "passed", "passed", "passed", "passed"]
    costs = json.loads((out / "row-costs.json").read_text())
    assert "digits-cmt-ect" in costs["rows"]
    assert json.loads((out / "gpu-figures.json").read_text())["tiny"] is True
    assert (out / "ratios-digits.json").is_file()
