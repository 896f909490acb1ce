"""What each row asks of its stages (stages/config/workload.py): the counts the GPU-hour projection
of bench/row_costs.py multiplies, checked against the paper's budgets, hand-computed numbers and
the workflow's own dry runs."""

import re

import pytest
from workflow_runs import ROWS, planned_jobs, planned_resources, snakemake

from stages.config import resolve, workload

PAPER_ROWS = sorted(p.stem for p in ROWS.glob("*.yaml"))


def row(name, *overlays, **command_line):
    return resolve([ROWS / f"{name}.yaml", *overlays], command_line or None)


def by_job(jobs):
    return {j["job"]: j for j in jobs}


@pytest.mark.parametrize("name", PAPER_ROWS)
def test_each_rows_training_budget_is_the_papers(name):
    """Where a row states the paper's budget (paper.methods.<init>.budget_mimg), its own steps and
    batches come to the same Mimg, route by route."""
    cfg = row(name)
    jobs = workload.workload(cfg)
    methods = cfg.get("paper", {}).get("methods", {})
    stated = {init: m["budget_mimg"] for init, m in methods.items() if "budget_mimg" in m}
    for init, budget in stated.items():
        ours = workload.mimg(jobs, init)
        assert ours.keys() == budget.keys(), (init, ours, budget)
        for stage in budget:
            assert ours[stage] == pytest.approx(budget[stage], rel=1e-9), (init, stage)


def test_rows_with_a_stated_budget_exist():
    # the test above must not pass by finding nothing to compare
    assert sum("budget_mimg" in str(row(n).get("paper", {})) for n in PAPER_ROWS) >= 5


def test_cifar10_row_counts_by_hand():
    jobs = by_job(workload.workload(row("cifar10-cmt-ect")))
    traj = jobs["trajectory_shard"]
    assert (traj["jobs"], traj["count"], traj["forwards"], traj["batch"]) == (480, 2_400_000, 38_400_000, 500)
    assert jobs["midtrain"]["count"] == 300_000 * 128 and jobs["midtrain"]["micro_batch"] == 128
    assert jobs["posttrain/cmt"]["count"] == 100_000 * 128
    assert jobs["posttrain/baseline"]["steps"] == 400_000
    # 5 snapshots x (1 + 2 steps) x 3 seed ranges of 50k: 1.5M samples, 2.25M forwards per init
    assert jobs["sample/cmt"]["jobs"] == 5
    assert (jobs["sample/cmt"]["count"], jobs["sample/cmt"]["forwards"]) == (1_500_000, 2_250_000)
    assert (jobs["sample/midtrain"]["count"], jobs["sample/midtrain"]["forwards"]) == (300_000, 450_000)
    assert jobs["fid/teacher-solver"]["count"] == 150_000
    assert "train_teacher" not in jobs and "encode_dataset" not in jobs  # imported teacher, pixel row
    assert {j["stage"] for j in jobs.values()} == {"midtrain", "posttrain", "evaluation"}


def test_imagenet512_row_counts_by_hand():
    jobs = by_job(workload.workload(row("imagenet512-cmt-ecd")))
    assert jobs["encode_dataset"]["count"] == 257 * 5000 and jobs["encode_dataset"]["jobs"] == 257
    # 100 epochs over the pool less its two held-out shards, at batch 256
    assert jobs["train_latent_vgg"]["steps"] == round(100 * 255 * 5000 / 256) == 498_047
    assert jobs["train_latent_vgg"]["micro_batch"] == 64
    assert jobs["midtrain"]["micro_batch"] == 16 and jobs["midtrain"]["distance"] == "elatentlpips"
    assert jobs["posttrain/cmt"]["method"] == "ecd"
    assert jobs["sample/cmt"]["decoded"] and jobs["fid/teacher-solver"]["decoded"]


def test_meanflow_baseline_gets_the_cmt_routes_images():
    cfg = row("imagenet256-cmt-mf")
    jobs = by_job(workload.workload(cfg))
    # 464k post-training steps + 305k mid-training steps of the same batch (the row's comment: 769k)
    assert jobs["posttrain/random"]["steps"] == 464_000 + 305_000 == workload.meanflow_steps(cfg, "random")
    assert jobs["posttrain/random"]["count"] == jobs["posttrain/cmt"]["count"] + jobs["midtrain_mf"]["count"]
    assert jobs["train_teacher"]["objective"] == "meanflow" and jobs["train_teacher"]["stage"] == "pretrain"
    # batch 256 over the rule's 8 GPUs: 32 images through each process's forward
    assert (jobs["posttrain/cmt"]["gpus"], jobs["posttrain/cmt"]["micro_batch"]) == (8, 32)
    assert (jobs["train_teacher"]["gpus"], jobs["train_teacher"]["micro_batch"]) == (4, 64)
    # on 4 nodes of 8 GPUs: 32 processes of 8 images each
    spread = by_job(workload.workload(row("imagenet256-cmt-mf", resources={"posttrain_mf": {"nodes": 4}})))
    assert (spread["posttrain/cmt"]["gpus"], spread["posttrain/cmt"]["micro_batch"]) == (32, 8)
    assert jobs["trajectory_shard"]["forwards"] == 256 * 5000 * 8
    assert "sample/midtrain" not in jobs  # family mf scores the post-trained snapshots only
    paper = by_job(workload.workload(row("imagenet256-cmt-mf", posttrain_mf={"equal_total_budget": False})))
    assert paper["posttrain/random"]["steps"] == 464_000


def test_online_midtraining_solves_no_pool_but_the_ceiling():
    jobs = by_job(workload.workload(resolve([], {"midtrain": {"trajectories": "online"}})))
    # digits: 3 seed ranges of 2,048 samples -> 3 shards of 2,048 for the teacher-solver ceiling
    assert jobs["trajectory_shard"]["count"] == 3 * 2048 and jobs["trajectory_shard"]["jobs"] == 3
    assert jobs["midtrain"]["trajectories"] == "online"


@pytest.mark.parametrize("configs", [["cifar10-cmt-ect"], ["imagenet512-cmt-ecd"], ["imagenet256-cmt-mf"], []],
                         ids=["cifar10", "imagenet512", "imagenet256", "digits"])
def test_workload_has_the_dry_runs_jobs(configs, tmp_path):
    """Every rule the workload counts has as many jobs in the workflow's dry run: the projection
    leaves no job out and counts none twice."""
    files = [ROWS / f"{c}.yaml" for c in configs]
    planned = planned_jobs(snakemake(tmp_path, "-n", configs=files))
    counted = {}
    for job in workload.workload(resolve(files)):
        counted[job["rule"]] = counted.get(job["rule"], 0) + job["jobs"]
    assert counted == {rule: planned[rule] for rule in counted}
    # and the rules it leaves out are the light ones (bookkeeping, imports, downloads, reference statistics)
    light = {"prepare_dataset", "fid_reference", "import_teacher", "import_ecd_teacher", "import_guide",
             "fetch_assets", "trajectory_spec", "trajectory_manifest", "latent_manifest", "report", "all"}
    assert set(planned) - set(counted) <= light, set(planned) - set(counted)



@pytest.mark.heavy
def test_random_init_budget_of_its_own(tmp_path):
    """posttrain_mf.random_steps budgets MeanFlow from scratch alone (the paper's 240 epochs): the
    cmt init's job is unchanged, so only the random init would rerun."""
    override = {"posttrain_mf": {"random_steps": 1_201_094}}
    jobs = by_job(workload.workload(row("imagenet256-cmt-mf", **override)))
    assert jobs["posttrain/random"]["steps"] == 1_201_094  # 240 x 1,281,167 / 256
    assert jobs["posttrain/cmt"]["steps"] == 464_000

    def commands(*configs):
        result = snakemake(tmp_path, "-n", "-p", configs=[ROWS / "imagenet256-cmt-mf.yaml", *configs])
        planned = planned_resources(result, "posttrain_mf")
        return {re.search(r"posttrain/(\w+)\.log", shell).group(1): shell for _, _, shell in planned}

    before = commands()
    extra = tmp_path / "random-steps.yaml"
    extra.write_text("posttrain_mf: {random_steps: 1201094}\n")
    after = commands(extra)
    assert after["cmt"] == before["cmt"]
    assert '"steps": 769000' in before["random"] and '"steps": 1201094' in after["random"]
