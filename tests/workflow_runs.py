"""Running the workflow from tests: Snakemake in a subprocess on a workdir, and what its dry run plans.

Shared by the end-to-end tests (test_pipeline, test_rows, test_pipeline_mf, test_team, ...)."""

import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
ROWS = REPO / "config" / "rows"
TINY = REPO / "tests" / "tiny.yaml"
TINY_MF = REPO / "tests" / "tiny-mf.yaml"


def command(workdir, *args, configs=(), cores=2):
    """The snakemake command line for `workdir` with the config files `configs` (in order). They come
    last: --configfile takes every word up to the next option, a target among them included."""
    configfile = ["--configfile", *map(str, configs)] if configs else []
    return [sys.executable, "-m", "snakemake", *map(str, args), "--snakefile", str(SNAKEFILE), "-d", str(workdir),
            f"-c{cores}", *configfile]


def snakemake(workdir, *args, configs=(), cores=2):
    """Run snakemake to the end; the CompletedProcess with its text output."""
    return subprocess.run(command(workdir, *args, configs=configs, cores=cores), capture_output=True, text=True,
                          cwd=workdir)


def finished_run(workdir, row, configs):
    """Run snakemake over `configs` to the end, which must succeed; the results folder of `row`."""
    result = snakemake(workdir, configs=configs)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return workdir / "results" / row


def planned_jobs(result):
    """{rule: count} from the 'Job stats' table of a dry run."""
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    table = result.stdout.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def planned_resources(result, rule=None):
    """[(rule, resources dict, shell command)] of the dry run's jobs (of `rule`, or all)."""
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    found = []
    # (the jobs of a group job, e.g. the trajectory shards, are printed indented)
    for block in re.split(r"\n(?=\s*\[[^\]]+\]\n)", result.stdout):
        name = re.search(r"^\s*(?:local)?rule (\w+):$", block, re.M)
        if name and rule in (None, name.group(1)):
            line = re.search(r"^\s+resources: (.*)$", block, re.M).group(1)
            shell = re.search(r"^Shell command: (.*)$", block, re.M)
            found.append((name.group(1), dict(kv.split("=", 1) for kv in line.split(", ")),
                          shell.group(1) if shell else ""))
    return found


def job_output(rule, output):
    """A job's name in the golden file: its rule and output, shard numbers folded."""
    return f"{rule} -> " + re.sub(r"(shards|latents|trajectory_shard|encode_dataset)/\d{6}", r"\1/{shard}", output)


def planned_configs(stack):
    """{job name: {config, key or spec}} of a dry run (`-n -p --forceall`, an empty workdir) of the config
    files `stack` (paths relative to the repository): what every job passes its stage."""
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, "-m", "snakemake", "-n", "-p", "--forceall", "--snakefile", str(REPO / "Snakefile"),
               "-d", workdir, "-c2"] + (["--configfile", *[str(REPO / s) for s in stack]] if stack else [])
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if result.returncode:
        raise RuntimeError(f"{stack}: the dry run failed:\n{result.stderr[-3000:]}")
    jobs = {}
    for block in re.split(r"\n(?=\s*\[[^\]]+\]\n)", result.stdout):
        rule = re.search(r"^\s*(?:local)?rule (\w+):$", block, re.M)
        output = re.search(r"^\s+output: (.*)$", block, re.M)
        shell = re.search(r"^\s*(?:Shell command: )?(python -m .*)$", block, re.M)
        if not (rule and output and shell):
            continue
        words = shlex.split(shell.group(1).split(" > ")[0])
        entry = {flag.strip("-"): words[words.index(flag) + 1] for flag in ("--config", "--key", "--spec")
                 if flag in words}
        if not entry.get("spec", "{").startswith("{"):  # a receipt's path (trajectory_manifest), not a spec
            del entry["spec"]
        name = job_output(rule.group(1), output.group(1))
        if name in jobs and jobs[name] != entry:
            raise RuntimeError(f"{stack}: {name} differs between its shards")
        jobs[name] = entry
    return jobs
