"""The record of a GPU session script (bench/gpu_first_contact.sh, bench/gpu_session.sh), kept so that
a run cut short anywhere still says what it did.

After every step the script calls this with the step's outcome: it appends the step to
OUTDIR/steps.jsonl, copies what the step leaves that a reader needs into OUTDIR/NAME/ (a Snakemake
run's report.md, the logs of its failed and unfinished jobs, its Snakemake log), and rewrites
OUTDIR/summary.json and OUTDIR/summary.md from all steps so far: what passed, what failed, what ran
out of time, and the first error line of each failure. With CMT_GPU_BUNDLE=DIR (the device tool's
$OUT), DIR then gets SCRIPT-summary.json, SCRIPT-summary.md and SCRIPT.tar.gz (OUTDIR without the
Snakemake workdirs), three files per script: the tool brings back at most eight.

    python bench/gpu_summary.py OUTDIR --script first-contact --name tiny --rc 1 --seconds 12.3 \
        --limit 60 --log OUTDIR/tiny.log [--workdir OUTDIR/work/tiny] [--status skipped --note '...']
"""

import argparse
import fcntl
import json
import os
import re
import shutil
import sys
import tarfile
import time
from pathlib import Path

# rc of `timeout LIMIT cmd`: 124 when the command ended on the TERM signal, 137 when it needed the KILL
TIMEOUT_RCS = (124, 137)
TRACEBACK = "Traceback (most recent call last):"
ERROR_WORDS = re.compile(r"error|exception|could not|cannot|failed|not found|no such|denied|killed|out of memory",
                         re.IGNORECASE)
# lines that carry an error word and say nothing: Snakemake's hints and summaries
BENIGN = re.compile(r"check log file\(s\) for error details|^\s*(message: None|show-failed-logs)|"
                    r"Will exit after finishing|Exiting because a job execution failed|0 failed", re.IGNORECASE)


def first_error(text):
    """The first line of `text` that says what went wrong: the exception line ending the first Python
    traceback, else the first line with an error word; None if there is neither."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == TRACEBACK:
            for later in lines[i + 1:]:
                if later.strip() and not later[:1].isspace():
                    return later.strip()
            break
    for line in lines:
        if ERROR_WORDS.search(line) and not BENIGN.search(line):
            return line.strip()
    return None


NOT_AVAILABLE = re.compile(r"not available", re.IGNORECASE)


def first_line(text, pattern):
    return next((line.strip() for line in text.splitlines() if pattern.search(line)), None)


def read(path):
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def snakemake_log(workdir):
    """The newest Snakemake log of a workdir (Snakemake writes one per invocation), or None."""
    logs = sorted(Path(workdir, ".snakemake", "log").glob("*.snakemake.log"))
    return logs[-1] if logs else None


def parse_snakemake(text):
    """{'jobs': {jobid: (rule, [logs])} started, 'finished': {jobid}, 'failed': [{rule, jobid, logs, signal}],
    'progress': (done, total) or None} from a Snakemake log or its console output. A failed job's
    `signal` (SIGTERM, SIGKILL, ...) says it was stopped from outside: a time limit, a kill."""
    jobs = {}
    # (the jobs of a group job, e.g. the trajectory shards on a cluster, are printed indented)
    for block in re.split(r"\n(?=\s*\[[^\]]+\]\n)", text):
        rule = re.search(r"^\s*(?:local)?rule (\w+):$", block, re.M)
        jobid = re.search(r"^\s+jobid: (\d+)$", block, re.M)
        if rule and jobid:
            jobs[jobid.group(1)] = (rule.group(1), log_paths(block))
    failed, previous = [], 0
    for error in re.finditer(r"^Error in rule (\w+):\n((?:[ \t]+.*\n?)*)", text, re.M):
        body = error.group(2)
        jobid = re.search(r"^\s+jobid: (\d+)$", body, re.M)
        # Snakemake says how the command ended just before the block: "... died with <Signals.SIGTERM: 15>."
        died = re.findall(r"died with <Signals\.(SIG\w+)", text[previous:error.start()])
        failed.append({"rule": error.group(1), "jobid": jobid.group(1) if jobid else None, "logs": log_paths(body),
                       "signal": died[-1] if died else None})
        previous = error.end()
    finished = set(re.findall(r"^Finished jobid: (\d+)", text, re.M))
    progress = re.findall(r"^(\d+) of (\d+) steps \(.*?\) done", text, re.M)
    return {"jobs": jobs, "finished": finished, "failed": failed,
            "progress": tuple(map(int, progress[-1])) if progress else None}


def log_paths(block):
    found = re.search(r"^\s+log: (.*?)(?: \(check log file\(s\) for error details\))?$", block, re.M)
    return found.group(1).split(", ") if found else []


def job_error(workdir, logs, fallback):
    """The first error line of a job, from its log files."""
    for log in logs:
        found = first_error(read(Path(workdir, log)))
        if found:
            return f"{found} ({log})"
    return fallback


def keep(src, dest):
    if Path(src).is_file():
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        return True
    return False


def workflow_outcome(outdir, name, workdir, timed_out):
    """What a Snakemake step left: its report(s) and the logs of failed and unfinished jobs copied into
    OUTDIR/NAME/, the failed jobs with their first error lines, the progress, the jobs a cut left running."""
    workdir, folder = Path(workdir), Path(outdir, name)
    reports = []
    for report in sorted(workdir.glob("results/*/report.md")):
        dest = folder / f"report-{report.parent.name}.md"
        keep(report, dest)
        reports.append(str(dest.relative_to(outdir)))
    log = snakemake_log(workdir)
    if log is None:
        return {"reports": reports}
    keep(log, folder / "snakemake.log")
    parsed = parse_snakemake(read(log))
    failed, cut = [], []
    for job in parsed["failed"]:
        for path in job["logs"]:
            keep(workdir / path, folder / "logs" / path)
        if timed_out and job["signal"]:
            cut.append(job["rule"])  # stopped by the step's time limit, not failed by itself
            continue
        fallback = (f"rule {job['rule']} was killed ({job['signal']})" if job["signal"] else
                    f"rule {job['rule']} failed; its log holds no error line")
        failed.append({**job, "error": job_error(workdir, job["logs"], fallback)})
    ended = {j["jobid"] for j in parsed["failed"]} | parsed["finished"]
    running = [(rule, logs) for jobid, (rule, logs) in parsed["jobs"].items() if jobid not in ended]
    for _, logs in running:
        for path in logs:
            keep(workdir / path, folder / "logs" / path)
    out = {"reports": reports, "jobs_failed": failed,
           "snakemake_log": str((folder / "snakemake.log").relative_to(outdir))}
    if parsed["progress"]:
        out["progress"] = "{} of {} Snakemake steps done".format(*parsed["progress"])
    if timed_out and (running or cut):
        out["running_when_cut"] = sorted({rule for rule, _ in running} | set(cut))
    return out


def outcome(args):
    """The step's record from its exit status, its log and (a Snakemake step) its workdir."""
    step = {"name": args.name, "seconds": round(args.seconds, 1), "limit": args.limit, "rc": args.rc,
            "log": os.path.relpath(args.log, args.outdir) if args.log else None}
    if args.status:
        step["status"] = args.status
    elif args.not_available_rc is not None and args.rc == args.not_available_rc:
        step["status"] = "not available"
        step["note"] = first_line(read(args.log), NOT_AVAILABLE)
    elif args.rc == 0:
        step["status"] = "passed"
    elif args.rc in TIMEOUT_RCS and args.limit is not None and args.seconds >= args.limit - 1:
        step["status"] = "timeout"
    else:
        step["status"] = "failed"
    if args.note:
        step["note"] = args.note
    if args.workdir and Path(args.workdir).is_dir():
        step.update(workflow_outcome(args.outdir, args.name, args.workdir, step["status"] == "timeout"))
    if step["status"] in ("failed", "timeout"):
        jobs = step.get("jobs_failed") or []
        if step["status"] == "failed":
            error = jobs[0]["error"] if jobs else first_error(read(args.log)) if args.log else None
        else:  # what the cut itself makes Snakemake and the jobs print is no error of theirs
            error = f"cut at its time limit of {args.limit:g} s"
            if step.get("progress"):
                error += f" after {step['progress']}"
            if step.get("running_when_cut"):
                error += f", running {', '.join(step['running_when_cut'])}"
            if jobs:
                error += f"; a job failed before: rule {jobs[0]['rule']}: {jobs[0]['error']}"
            elif not args.workdir and args.log:
                said = [line.strip() for line in read(args.log).splitlines()
                        if line.strip() and not line.startswith("== ")]
                if said:
                    error += f"; its last output: {said[-1][:200]}"
        step["error"] = error or f"exit {args.rc}, no error line in {step['log']}"
    return step


def load_steps(outdir):
    path = Path(outdir, "steps.jsonl")
    return [json.loads(line) for line in read(path).splitlines() if line.strip()]


def checks_table(outdir):
    """The rows of bench/gpu_checks.py's JSON files, if the script wrote any."""
    rows = []
    for path in sorted(Path(outdir).glob("checks*.json")):
        try:
            results = json.loads(read(path)).get("checks", [])
        except json.JSONDecodeError:
            continue
        rows += [(path.name, r["name"], r["status"], r.get("error") or r.get("note") or "") for r in results]
    return rows


def write_summary(outdir, script):
    steps = load_steps(outdir)
    counts = {}
    for s in steps:
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    summary = {"script": script, "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "counts": counts, "steps": steps}
    env = Path(outdir, "environment.json")
    if env.is_file():
        summary["environment"] = json.loads(read(env) or "{}")
    checks = checks_table(outdir)
    if checks:
        summary["checks"] = [{"file": f, "name": n, "status": s, "detail": d} for f, n, s, d in checks]
    tmp = Path(outdir, "summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(Path(outdir, "summary.json"))

    lines = [f"# {script}: {', '.join(f'{n} {k}' for k, n in counts.items())}", "",
             f"Updated {summary['updated']}." + (f" {summary['environment'].get('device', '')}"
                                                   if "environment" in summary else ""), "",
             "| step | status | seconds (limit) | first error, or note |", "|---|---|---|---|"]
    for s in steps:
        limit = f" ({s['limit']:g})" if s.get("limit") is not None else ""
        detail = s.get("error") or s.get("note") or ""
        if s.get("reports"):
            detail = (detail + " " if detail else "") + "report: " + ", ".join(s["reports"])
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:g}{limit} | {detail.replace('|', '/')} |")
    if checks:
        lines += ["", "| check | status | error, or note |", "|---|---|---|"]
        lines += [f"| {n} | {s} | {d.replace('|', '/')} |" for _, n, s, d in checks]
    failed_jobs = [(s["name"], j) for s in steps for j in s.get("jobs_failed", [])]
    if failed_jobs:
        lines += ["", "Failed jobs (their logs under STEP/logs/):", ""]
        lines += [f"- {name}: rule {j['rule']}: {j['error']}" for name, j in failed_jobs]
    tmp = Path(outdir, "summary.md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(Path(outdir, "summary.md"))


# the Snakemake workdirs (stores, datasets, samples), the interpreter shim, the summary's lock
LEFT_OUT = (["work"], ["bin"], [".summary.lock"])


def bundle(outdir, script, dest):
    """SCRIPT-summary.json, SCRIPT-summary.md and SCRIPT.tar.gz (OUTDIR less the workdirs) into `dest`."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for ext in ("json", "md"):
        shutil.copyfile(Path(outdir, f"summary.{ext}"), dest / f"{script}-summary.{ext}")
    tmp = dest / f".{script}.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(outdir, arcname=script, filter=lambda t: None if t.name.split("/")[1:2] in LEFT_OUT else t)
    tmp.replace(dest / f"{script}.tar.gz")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir")
    p.add_argument("--script", required=True, help="the script's name: the summary's title and the bundle's files")
    p.add_argument("--name", help="the step (none: rewrite the summary only)")
    p.add_argument("--rc", type=int, default=0)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--log", default=None)
    p.add_argument("--workdir", default=None, help="a Snakemake step's workdir")
    p.add_argument("--status", choices=["passed", "failed", "timeout", "skipped", "not available"], default=None,
                   help="for a step not run, or one whose exit status means something else")
    p.add_argument("--note", default=None)
    p.add_argument("--exit-status", action="store_true", help="exit 1 if a step failed or ran out of time")
    p.add_argument("--not-available-rc", type=int, default=None,
                   help="the exit status by which the step's command says that what it checks does not exist yet")
    args = p.parse_args(argv)
    step = outcome(args) if args.name else None
    # rows run at once record themselves at once: one writer at a time
    with open(Path(args.outdir, ".summary.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if step:
            with open(Path(args.outdir, "steps.jsonl"), "a") as f:
                f.write(json.dumps(step) + "\n")
        write_summary(args.outdir, args.script)
        if os.environ.get("CMT_GPU_BUNDLE"):
            bundle(args.outdir, args.script, os.environ["CMT_GPU_BUNDLE"])
    if args.exit_status and any(s["status"] in ("failed", "timeout") for s in load_steps(args.outdir)):
        sys.exit(1)


if __name__ == "__main__":
    main()
