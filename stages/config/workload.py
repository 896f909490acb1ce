"""What a row's configuration asks of each stage, counted in the units its cost grows with: images
through a training step (the paper's Mimg convention: a CMT step of 8 trajectories x 16 points is 128
images), trajectories solved, samples drawn and the network forwards they take, images encoded or
scored. bench/row_costs.py multiplies these counts by seconds per unit measured on a device to
project a row's GPU-hours; tests check the counts against the paper's budgets (a row's
paper.methods.<init>.budget_mimg).

The counts follow the workflow's own rules (workflow/rules/*.smk), of which this module holds the
ones the Snakefile imports: the MeanFlow random init's steps (`meanflow_steps`), the baseline
init's post-training section (`posttrain_section`) and the latent VGG's steps (`latent_vgg_steps`).
Only stdlib: the Snakefile imports this before any job starts.
"""

import math

# Where each job's cost goes in the paper's cost table (stages/reporting/ledger.py has the same stages):
# pre-training the teacher, mid-training (its trajectories and CMT), post-training; the data
# preparation a latent row needs first, and the evaluation outside the table as in the paper.
PAPER_STAGE = {"encode_dataset": "data", "train_latent_vgg": "data", "train_teacher": "pretrain",
               "trajectory_shard": "midtrain", "midtrain": "midtrain", "midtrain_mf": "midtrain",
               "posttrain": "posttrain", "posttrain_mf": "posttrain", "sample": "evaluation", "fid": "evaluation",
               "fid_teacher": "evaluation"}


def meanflow_steps(cfg, init):
    """Post-training steps of a family-mf init: `random` runs posttrain_mf.random_steps where set,
    else at equal total budget also the mid-training's images, rounded to whole post-training batches."""
    post, mid = cfg["posttrain_mf"], cfg["midtrain_mf"]
    if init == "random" and post.get("random_steps"):
        return post["random_steps"]
    steps = post["steps"]
    if init == "random" and post["equal_total_budget"]:
        steps += round(mid["steps"] * mid["batch"] / post["batch"])
    return steps


def posttrain_section(cfg, init):
    """The post-training settings of a family-cm init: the `baseline` init (vanilla ECT from the
    teacher at the row's total budget) runs the assembled `baseline` section, the others posttrain's;
    the snapshots are the row's. Without the list of inits: adding an init must not change (and so
    rerun) the others."""
    if init == "baseline":
        return {**cfg["baseline"], "snapshots": cfg["posttrain"]["snapshots"]}
    return {k: v for k, v in cfg["posttrain"].items() if k != "inits"}


def _training(cfg, job, rule, steps, batch, section, **detail):
    """A training job; `gpus` is the job's GPUs, the rule's GPU resource on each of its `nodes` (one
    process each), `micro_batch` what one process passes forward at once, as loop.split_batch cuts the
    batch: batch_per_gpu, at most the process's share batch / gpus."""
    resources = cfg.get("resources", {}).get(rule, {})
    gpus = int(resources.get("gpu") or 1) * int(resources.get("nodes") or 1)
    share = batch // gpus
    micro = min(section.get("batch_per_gpu") or share, share)
    return {"job": job, "rule": rule, "jobs": 1, "unit": "images", "count": steps * batch, "steps": steps,
            "batch": batch, "gpus": gpus, "micro_batch": micro, **detail}


def latent_vgg_steps(cfg):
    """train_latent_vgg's optimizer steps: `steps`, or `epochs` over the pool less its held-out shards."""
    vgg, lat = cfg["latent_vgg"], cfg["latents"]
    return vgg["steps"] or max(1, round(vgg["epochs"] * (lat["num_shards"] - vgg["holdout_shards"])
                                        * lat["per_shard"] / vgg["batch"]))


def workload(cfg):
    """The row's work as a list of {job, rule, jobs, unit, count, ...}: `job` names the benchmark (as
    the ledger does: posttrain/cmt ...; sample/<init> stands for all its snapshots' jobs), `jobs` how
    many Snakemake jobs of `rule` it is, `count` the units they process. Training jobs also give steps,
    batch, gpus and micro_batch (see _training); trajectory jobs the solver batch and forwards
    (count x NFE); sample jobs the network forwards (1 per step of the sampler) and whether the
    samples are decoded from latents. `stage` is the job's place in the paper's cost table."""
    family = cfg.get("family", "cm")
    latent = "latents" in cfg
    jobs = []
    if latent:
        lat = cfg["latents"]
        jobs.append({"job": "encode_dataset", "rule": "encode_dataset", "jobs": lat["num_shards"], "unit": "images",
                     "count": lat["num_shards"] * lat["per_shard"], "batch": lat["batch"],
                     "note": "the pool's capacity (num_shards x per_shard), at most one shard more than the data set"})
    if family == "cm" and cfg["midtrain"]["distance"] == "elatentlpips":
        steps = latent_vgg_steps(cfg)
        jobs.append(_training(cfg, "train_latent_vgg", "train_latent_vgg", steps, cfg["latent_vgg"]["batch"],
                              cfg["latent_vgg"]))
    teacher = cfg["teacher"]
    if teacher.get("source", "train") == "train":
        jobs.append(_training(cfg, "train_teacher", "train_teacher", teacher["steps"], teacher["batch"], teacher,
                              objective=teacher.get("objective", "edm")))

    traj = cfg["trajectories"]
    online = online_midtrain(cfg)
    shards = len(trajectory_shard_ids(cfg))
    count = shards * traj["per_shard"]
    jobs.append({"job": "trajectory_shard", "rule": "trajectory_shard", "jobs": shards, "unit": "trajectories",
                 "count": count, "batch": traj["batch"], "nfe": traj["nfe"], "forwards": count * traj["nfe"],
                 "solver": traj.get("solver", "dpm_solver_pp")})

    if family == "mf":
        mid, post = cfg["midtrain_mf"], cfg["posttrain_mf"]
        jobs.append(_training(cfg, "midtrain_mf", "midtrain_mf", mid["steps"], mid["batch"], mid))
        inits = post["inits"]
        for init in inits:
            jobs.append(_training(cfg, f"posttrain/{init}", "posttrain_mf", meanflow_steps(cfg, init), post["batch"],
                                  post, init=init, method="meanflow"))
        sampled = [(init, len(post["snapshots"])) for init in inits]
    else:
        mid = cfg["midtrain"]
        jobs.append(_training(cfg, "midtrain", "midtrain", mid["steps"], mid["batch"], mid,
                              trajectories="online" if online else "offline", distance=mid["distance"]))
        inits = cfg["posttrain"]["inits"]
        for init in inits:
            section = posttrain_section(cfg, init)
            jobs.append(_training(cfg, f"posttrain/{init}", "posttrain", section["steps"], section["batch"], section,
                                  init=init, method=section.get("method", "ect")))
        # every init's snapshots, and the mid-trained model alone (its final weights)
        sampled = [(init, len(cfg["posttrain"]["snapshots"])) for init in inits] + [("midtrain", 1)]

    sc = cfg["sampling"]
    per_model = sc["num_ranges"] * sc["per_range"]
    for init, models in sampled:
        samples = models * len(sc["steps"]) * per_model
        jobs.append({"job": f"sample/{init}", "rule": "sample", "jobs": models, "unit": "samples", "count": samples,
                     "batch": sc["batch"], "forwards": models * sum(sc["steps"]) * per_model, "decoded": latent})
        jobs.append({"job": f"fid/{init}", "rule": "fid", "jobs": 1, "unit": "images", "count": samples,
                     "batch": cfg["features"].get("batch", 250), "features": cfg["features"]["kind"]})
    # the teacher-solver ceiling scores the pool's first trajectories' final states (decoded on a latent row)
    jobs.append({"job": "fid/teacher-solver", "rule": "fid_teacher", "jobs": 1, "unit": "images", "count": per_model,
                 "batch": cfg["features"].get("batch", 250), "features": cfg["features"]["kind"], "decoded": latent})
    for job in jobs:
        job["stage"] = PAPER_STAGE[job["rule"]]
    return jobs


def mimg(jobs, init):
    """{paper stage: Mimg} of an init's route, in the paper's convention (training images only):
    the CMT route's mid-training and post-training, another init's post-training alone."""
    out = {}
    for job in jobs:
        if job["unit"] != "images" or job["rule"] not in ("midtrain", "midtrain_mf", "posttrain", "posttrain_mf"):
            continue
        if job["stage"] == "midtrain" and init != "cmt":
            continue
        if job["stage"] == "posttrain" and job["init"] != init:
            continue
        out[job["stage"]] = out.get(job["stage"], 0) + job["count"] / 1e6
    return out


def online_midtrain(config):
    """midtrain.trajectories online: the teacher solves the trajectories inside the mid-training steps."""
    return config.get("family", "cm") == "cm" and config["midtrain"]["trajectories"] == "online"


def trajectory_shard_ids(config):
    """The pool's shards. Online, the pool shrinks to what the fid_teacher ceiling scores (its seed
    ranges): these are the first shards of the offline pool of the same spec, which an offline run of
    the row then reuses."""
    traj = config["trajectories"]
    count = traj["num_shards"]
    if online_midtrain(config):
        ceiling = config["sampling"]["num_ranges"] * config["sampling"]["per_range"]
        count = min(count, math.ceil(ceiling / traj["per_shard"]))
    return [f"{k:06d}" for k in range(count)]
