"""Projected GPU-hours of each row, stage by stage, from seconds per unit measured on this device,
beside the paper's own cost figures.

For each row: stages/config/workload.py counts what the row's configuration asks of every stage
(training images, trajectories, samples, images encoded or scored), and this script times one unit
of each kind on the row's own networks at their real size, with random weights, on this device:
- train_teacher, train_latent_vgg, midtrain (CMT-CM with the row's distance), midtrain_mf (CMT-MF),
  posttrain (ECT, ECD with its teacher and guide, the 512 code's ECT), posttrain_mf (MeanFlow): the
  row's loss, forward and backward, at its per-GPU micro-batch, then the optimizer and EMA update;
  GPU-seconds per image = (micro-batches x micro-batch time + GPUs x update time) / batch;
- trajectory_shard: trajectories.Generator.states, the solve the stage runs, at the row's solver batch
  (the shard writing on top is at most 10 % more: ratio 1 of bench/pipeline_ratios.py);
- encode_dataset: the VAE encoder at the row's latents.batch (an SD-VAE of the hub's architecture with
  random weights where the row names the download);
- sample: one network forward per sampler step at the sampling batch, and the VAE decoder on a latent row;
- fid: Inception features (torchvision's InceptionV3 at 299x299 with random weights: the architecture
  of the FID TorchScript, whose weights are a download); free for pixel features.
A row's projection = (counts x seconds per unit + jobs x GPUs x the start-up of a job: a fresh Python
importing torch and the stage code and initialising the device) / 3600 on devices of this kind: no
overlap between jobs, no multi-GPU communication, queueing, model loading, data reading or
checkpointing, no reference statistics: a floor (the digits default took 1.1-1.5x it per training
job on a CPU, bench/RESULTS.md). `--benchmarks` sets a row's projection beside a run of it.
Routes are the paper's cost table's: pre-training (the teacher, where the row trains it),
mid-training (trajectories and CMT), post-training; `data` (encoding, the latent VGG) and
`evaluation` (sampling and FID) stand apart. The paper gives GPU-hours for the ImageNet-256 row
only, and its budgets in Mimg for others: both are printed beside ours where the row states them.

    python bench/row_costs.py --out bench/row-costs-<card>-<date>.json      # every row, full size (a GPU)
    python bench/row_costs.py --rows cifar10-cmt-ect imagenet512-cmt-ecd --out ...
    python bench/row_costs.py --smoke --out /tmp/row-costs-smoke.json      # CPU proof: smoke overlays

--smoke layers each row's smoke overlay (tiny networks and batches) over it: the script's paths all
run, the numbers are not the rows' costs.
"""

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages import networks  # noqa: E402
from stages.config import (  # noqa: E402
    OVERLAYS,
    REPO,
    resolve,
    stage_configs,
    workload,  # noqa: E402
)
from stages.core import precision  # noqa: E402
from stages.data import labels as class_labels  # noqa: E402
from stages.files import checkpoints  # noqa: E402
from stages.method import flowmap, losses, teacher_velocity, trajectories  # noqa: E402
from stages.recipes import examples  # noqa: E402
from stages.recipes import latent_vgg as latent_vgg_recipe  # noqa: E402
from stages.recipes import midtrain as midtrain_recipe
from stages.recipes import midtrain_mf as midtrain_mf_recipe  # noqa: E402
from stages.recipes import posttrain as posttrain_recipe
from stages.recipes import posttrain_mf as posttrain_mf_recipe  # noqa: E402
from stages.recipes import teacher as teacher_recipe
from stages.reporting import ledger  # noqa: E402
from stages.training import loop  # noqa: E402
from stages.training.ema import EMA, NoEMA  # noqa: E402

ROWS = REPO / "config" / "rows"
# stabilityai/sd-vae-ft-mse's config.json (the AutoencoderKL the latent rows download), for a
# random-weight VAE of the same cost
SD_VAE_ARCH = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
               "block_out_channels": [128, 256, 512, 512], "act_fn": "silu", "sample_size": 256,
               "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--rows", nargs="*", default=None, help="row names under config/rows (default: every row there)")
p.add_argument("--smoke", action="store_true", help="each row under its smoke overlay: a CPU proof run")
p.add_argument("--config", type=yaml.safe_load, default=None,
               help="a YAML mapping layered on top, as snakemake's --config, e.g. '{features: {kind: inception}}'")
p.add_argument("--repeats", type=int, default=None, help="timed repetitions per figure (median; default 3, smoke 1)")
p.add_argument("--threads", type=int, default=None,
               help="torch threads on a CPU (default: each rule's, from the row's `threads` as the workflow sets them)")
p.add_argument("--benchmarks", type=Path, default=None,
               help="one row: its run's benchmarks folder (results/<row>/benchmarks), to set each job's "
                    "projection beside the seconds it took")
p.add_argument("--out", required=True)
args = p.parse_args()
if args.benchmarks and len(args.rows or []) != 1:
    p.error("--benchmarks compares one row's run: name that row with --rows")

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if args.threads:
    torch.set_num_threads(args.threads)
repeats = args.repeats or (1 if args.smoke else 3)
smoke_of = {Path(row).stem: overlay for overlay, rows in OVERLAYS.items() if overlay.startswith("smoke/")
            for row in rows}
names = args.rows or sorted(p.stem for p in ROWS.glob("*.yaml"))


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gb():
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's peak RSS so far


def timed(fn, min_seconds=1.0):
    """Median seconds of `fn` after one warm-up call, over `repeats` calls and at least `min_seconds`
    of them (a 50 ms step timed 3 times is noise on a shared machine); one call where the warm-up took
    over 10 s (an XXL solve: the device time is better spent on the other rows)."""
    t0 = time.perf_counter()
    fn()
    sync()
    if time.perf_counter() - t0 > 10:
        budget, min_seconds = 1, 0.0
    else:
        budget = repeats
    times = []
    while len(times) < budget or (sum(times) < min_seconds and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(key, fn):
    """Run one measurement; its figures, or the error that stopped it (out of memory at the row's
    batch is an answer too), with the peak memory it reached."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        out = fn()
    except Exception as err:  # recorded, and the run goes on: one device run measures every row
        out = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
    out["peak_gb"] = peak_gb()
    print(f"  [{key}] " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()),
          flush=True)
    return out


def startup_seconds():
    """What a job spends before its first unit: a fresh Python importing torch and the stage code and
    initialising the device (median of 3); every Snakemake job pays it once per GPU process."""
    code = ("import torch, stages.networks, stages.method.losses, stages.data.shards; "
            f"torch.zeros(1, device={device.type!r}).sum().item()")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def on_device(make):
    """make() with its parameters created on the device (the random init of a 1.5B-parameter XXL then
    runs there, not on the host), then moved there whole."""
    torch.manual_seed(0)
    with device:
        net = make()
    return net.to(device)


class Row:
    """A row's configuration and what its stages build, with random weights on the device: the
    recipes' own networks and losses (stages/recipes/), given the stage configs the workflow passes."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.family = cfg.get("family", "cm")
        self.codec = None
        self.shape = examples.data_shape(cfg)
        if "latents" in cfg:
            from stages.networks import latent_codec

            lat = cfg["latents"]
            spec = lat["vae"] if isinstance(lat["vae"], dict) else {"config": SD_VAE_ARCH, "seed": 0}
            self.codec = latent_codec.from_config({**lat, "vae": spec}, batch_size=8).to(device)

    def stage(self, rule, init=None):
        return stage_configs.stage_config(rule, self.cfg, init)

    def teacher_meta(self):
        """model.json of the row's teacher (an imported one has the row's network section too)."""
        return teacher_recipe.model_meta(self.stage("train_teacher"), self.shape)

    def teacher(self):
        """The teacher in eval mode, frozen: EDM denoiser or the MeanFlow teacher's u."""
        meta = self.teacher_meta()
        net = on_device(lambda: networks.freeze_unused_heads(checkpoints.build(meta)))
        return net.eval().requires_grad_(False), meta

    def images(self, net, n, classes=None):
        """A batch of the recipes' image sources: (images, class indices of the network's classes)."""
        count = classes if classes is not None else class_labels.label_dim_of(net)
        return examples.images(n, self.shape, count, device, self.cfg["sigma_data"])


def training_rate(net, section, job, loss_fn):
    """Seconds per image of a training stage: micro-batches of forward + backward, then the update."""
    ema = EMA(net, section["ema"]["beta"], section["ema"].get("rampup")) if section.get("ema") else NoEMA()
    opt = loop.build_optimizer([q for q in net.parameters() if q.requires_grad], section["optimizer"])
    micro, batch = job["micro_batch"], job["batch"]
    if batch % micro:
        raise ValueError(f"{job['job']}: batch {batch} is not a whole number of micro-batches of {micro}")

    def backward():  # gradients accumulate over calls, as over a step's micro-batches
        loss_fn(micro).mean().backward()

    def step():  # one micro-batch and the update (which needs the gradients: timed with them)
        backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(net, 1)

    micro_s = timed(backward)
    update_s = max(timed(step) - micro_s, 0.0)
    # GPU-seconds of one step over the job's processes: every micro-batch once, one update per process
    gpu_s = micro_s * batch / micro + update_s * job["gpus"]
    return {"seconds_per_unit": gpu_s / batch, "micro_batch": micro, "micro_batch_s": micro_s, "update_s": update_s,
            "step_gpu_s": gpu_s, "images_per_gpu_s": batch / gpu_s,
            "parameters": sum(q.numel() for q in net.parameters())}


def random_latent_vgg(scfg, channels, folder):
    """A latent VGG16 model file with random weights, for E-LatentLPIPS's cost (the row trains its own)."""
    net, architecture = latent_vgg_recipe.network(scfg, channels)
    path = Path(folder) / "latent_vgg.safetensors"
    checkpoints.save(path, net=net, meta={"role": "latent_vgg", "architecture": architecture})
    return str(path)


def rate(row, job):
    """The figures of one job of the workload: the recipe of its stage, timed on random batches."""
    cfg, rule = row.cfg, job["rule"]
    g = torch.Generator().manual_seed(0)
    if rule == "train_teacher":
        scfg = row.stage("train_teacher")
        net, _ = teacher_recipe.network(scfg, row.shape)
        net = net.to(device).train()
        loss_of, _ = teacher_recipe.objective(scfg, net)
        classes = teacher_recipe.classes_of(scfg, net)
        return training_rate(net, scfg["teacher"], job, lambda n: loss_of(net, row.images(net, n, classes), g))

    if rule == "train_latent_vgg":
        scfg = row.stage("train_latent_vgg")
        net, _ = latent_vgg_recipe.network(scfg, row.shape[0])
        net = net.to(device).train()
        loss_of = latent_vgg_recipe.objective(scfg)
        section = {"ema": None, "optimizer": latent_vgg_recipe.optimizer_section(scfg, job["count"] // job["steps"])}
        return training_rate(net, section, job, lambda n: loss_of(
            net, row.images(net, n, scfg["latent_vgg"]["num_classes"]), g))

    if rule == "trajectory_shard":
        teacher, meta = row.teacher()
        spec = {**row.stage("trajectory_shard"), "seed": 0}
        start = None
        if spec.get("x_T") == "data_plus_noise":
            start = row.images(teacher, 64)[0].cpu()
        labels = torch.zeros(64, dtype=torch.int64) if start is not None else None
        gen = trajectories.Generator(teacher, meta, spec, device, start, labels)
        batch = job["batch"]
        sec = timed(lambda: gen.states(range(batch)))
        return {"seconds_per_unit": sec / batch, "batch": batch, "nfe": job["nfe"], "trajectories_per_s": batch / sec,
                "forwards_per_s": batch * job["nfe"] / sec}

    if rule == "midtrain":
        scfg = row.stage("midtrain")
        teacher_meta = row.teacher_meta()
        net = on_device(lambda: midtrain_recipe.student(scfg, teacher_meta)[0]).train()
        with tempfile.TemporaryDirectory() as folder:
            latent_vgg = None
            if scfg["midtrain"]["distance"] == "elatentlpips":
                latent_vgg = random_latent_vgg(row.stage("train_latent_vgg"), row.shape[0], folder)
            # LPIPS with a random VGG trunk: the cost of the real one, whose weights are a download
            distance = midtrain_recipe.distance_of(
                {**scfg, "midtrain": {**scfg["midtrain"], "lpips_weights": None}}, latent_vgg)
        if isinstance(distance, torch.nn.Module):
            distance = distance.to(device)
        loss_of = midtrain_recipe.objective(distance)
        out = training_rate(net, scfg["midtrain"], job, lambda n: loss_of(
            net, midtrain_recipe.example_batch(cfg, teacher_meta, net, n, device)))
        if scfg["midtrain"].get("trajectories") == "online":
            out["note"] = "the step only: online mid-training also solves its trajectories (see trajectory_shard)"
        return out

    if rule == "midtrain_mf":
        scfg = row.stage("midtrain_mf")
        net, meta = midtrain_mf_recipe.student(scfg, row.teacher_meta())
        net = net.to(device).train()
        loss_of = midtrain_mf_recipe.objective(scfg)
        return training_rate(net, scfg["midtrain_mf"], job, lambda n: loss_of(
            net, midtrain_mf_recipe.example_batch(cfg, meta, net, n, device), g))

    if rule == "posttrain":
        scfg = row.stage("posttrain", job["init"])
        net = on_device(lambda: posttrain_recipe.student(scfg, row.teacher_meta())[0]).train()
        denoise = None
        if job["method"] == "ecd":
            teacher = row.teacher()[0]
            guidance = scfg["posttrain"].get("guidance") or {}
            guide = None
            if guidance.get("guide") == "teacher":
                guide = teacher
            elif guidance.get("guide"):
                arch = networks.architecture(guidance["network"], *row.shape, 0.0)
                guide = on_device(lambda: networks.build_precond(arch, "edm", cfg["sigma_data"]))
                guide = guide.eval().requires_grad_(False)
            denoise = losses.guided_denoiser(teacher, guide, guidance.get("weight", 1.0),
                                             guide_dtype=guidance.get("guide_dtype", "float16"))
        loss_of = posttrain_recipe.objective(scfg, net, denoise)
        return training_rate(net, scfg["posttrain"], job, lambda n: loss_of(net, row.images(net, n), g, 0))

    if rule == "posttrain_mf":
        scfg = row.stage("posttrain_mf", job["init"])
        net, _ = posttrain_mf_recipe.student(scfg, "random", row.teacher_meta())
        net = net.to(device).train()
        teacher = (teacher_velocity.velocity_field(*row.teacher())
                   if scfg["posttrain_mf"].get("target") == "teacher" else None)
        loss_of, _ = posttrain_mf_recipe.objective(scfg, net, teacher)
        classes = int(getattr(net, "num_classes", 0) or 0)
        return training_rate(net, scfg["posttrain_mf"], job, lambda n: loss_of(
            net, row.images(net, n, classes), g))

    if rule == "encode_dataset":
        batch = job["batch"]
        codec = row.codec
        codec.batch_size = batch
        size = cfg["dataset"]["resolution"]
        pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        sec = timed(lambda: codec.encode_pixels(pixels))
        return {"seconds_per_unit": sec / batch, "batch": batch, "images_per_s": batch / sec}

    if rule == "sample":
        if row.family == "mf":
            net, _ = posttrain_mf_recipe.student(row.stage("posttrain_mf", "random"), "random", row.teacher_meta())
            classes = int(getattr(net, "num_classes", 0) or 0)
        else:
            net = posttrain_recipe.student(row.stage("posttrain", "cmt"), row.teacher_meta())[0]
            classes = class_labels.label_dim_of(net)
        net = net.to(device).eval()
        batch = job["batch"]
        x, y = row.images(net, batch, classes)
        labels = y if row.family == "mf" and classes else examples.one_hot(batch, classes, device)
        sigma = torch.full((batch,), cfg["sigma_max"], device=device)

        def forward():  # one sampler step: u(z, 0, 1), or f(x, sigma_max)
            if row.family == "mf":
                return flowmap.call_u(net, x, 0.0, 1.0, labels)
            return losses.call(net, x, sigma, labels)

        with torch.no_grad():
            forward_s = timed(forward) / batch
            decode_s = 0.0
            if job["decoded"]:
                row.codec.batch_size = 8  # as the sample stage decodes
                decode_s = timed(lambda: row.codec.decode(x)) / batch
        seconds = (job["forwards"] * forward_s + job["count"] * decode_s) / job["count"]
        return {"seconds_per_unit": seconds, "batch": batch, "forward_s_per_image": forward_s,
                "decode_s_per_image": decode_s}

    if rule in ("fid", "fid_teacher"):
        decode_s = 0.0
        if job.get("decoded"):  # fid_teacher decodes the pool's final latents on a latent row
            with torch.no_grad():
                decode_s = timed(lambda: row.codec.decode(torch.randn(8, *row.shape, row.shape[1], device=device))) / 8
        if job["features"] != "inception":
            return {"seconds_per_unit": decode_s, "note": f"features {job['features']}: no network"}
        import torchvision

        batch = job["batch"]
        torch.manual_seed(0)
        inception = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        inception = inception.to(device).eval()
        images = torch.randn(batch, 3, 299, 299, device=device)
        with torch.no_grad():
            sec = timed(lambda: inception(images))
        return {"seconds_per_unit": sec / batch + decode_s, "batch": batch, "images_per_s": batch / sec,
                "decode_s_per_image": decode_s}
    raise ValueError(f"no measurement for rule {rule}")


# the config sections a rule's unit cost depends on (besides the job's own batch sizes): rows that
# agree on them share one measurement (the two ImageNet-512 rows differ in post-training alone)
COST_SECTIONS = {
    "train_teacher": ("teacher", "network"), "train_latent_vgg": ("latent_vgg",),
    "trajectory_shard": ("teacher", "network", "trajectories", "sigma_max", "sigma_min"),
    "midtrain": ("network", "midtrain", "trajectories", "latent_vgg", "sigma_boundary"),
    "midtrain_mf": ("network", "midtrain_mf", "trajectories"),
    "posttrain": ("network", "sigma_boundary"), "posttrain_mf": ("network", "posttrain_mf"),
    "encode_dataset": ("latents",), "sample": ("network", "sampling", "latents"),
    "fid": ("features", "latents"), "fid_teacher": ("features", "latents")}


def cache_key(cfg, shape, job):
    """Jobs whose unit costs the same, in this row or another, share one measurement."""
    keep = ("rule", "method", "micro_batch", "batch", "gpus", "objective", "features")
    key = {k: job.get(k) for k in keep}
    key["decoded"] = bool(job.get("decoded"))
    key.update(shape=list(shape), tf32=cfg["tf32"], threads=cfg["threads"], sigma_data=cfg["sigma_data"],
               resolution=cfg["dataset"]["resolution"])
    key.update({name: cfg.get(name) for name in COST_SECTIONS[job["rule"]]})
    if job["rule"] == "posttrain":  # the init's own section: the baseline's differs from the others'
        key["section"] = workload.posttrain_section(cfg, job["init"])
    return json.dumps(key, sort_keys=True, default=str)


# the row's `threads` entry each rule runs with (workflow/rules/*.smk); the others run on one thread
THREADS_OF = {"train_teacher": "teacher", "trajectory_shard": "light", "sample": "light", "encode_dataset": "light",
              "midtrain": "train", "midtrain_mf": "train", "posttrain": "train", "posttrain_mf": "train",
              "train_latent_vgg": "train"}
def runtime_checks(cfg, jobs):
    """Each job's projected wall minutes (one Snakemake job on its GPUs; one slice of a sliced
    training run, checkpoint.slice_kimg) against the runtime the row's `resources` ask for it."""
    slice_images = 1000 * cfg["checkpoint"]["slice_kimg"] if cfg["checkpoint"].get("slice_kimg") else None
    out = []
    for job in jobs:
        asked = cfg.get("resources", {}).get(job["rule"], {}).get("runtime")
        if job["hours"] is None or asked is None:
            continue
        gpus = job.get("gpus") or int(cfg["resources"][job["rule"]].get("gpu") or 1)
        share = 1.0 if slice_images is None or job["unit"] != "images" or "steps" not in job else \
            min(1.0, slice_images / job["count"])
        projected = job["hours"] * 60 / job["jobs"] / gpus * share
        out.append({"job": job["job"], "rule": job["rule"], "gpus": gpus, "projected_min": projected,
                    "asked_min": asked})
    return out


# a workload job -> the benchmark files (globs, relative to the benchmarks folder) of its Snakemake jobs
BENCHMARK_FILES = {"encode_dataset": "encode_dataset/*", "trajectory_shard": "trajectory_shard/*",
                   "midtrain_mf": "midtrain"}  # family mf writes the consistency family's paths


def measured(jobs, folder):
    """Each job's projection beside what its run took (wall seconds x the job's GPUs; CPU seconds),
    from Snakemake's benchmark files; a job without them is left out. The wall seconds are the cost
    ledger's (stages/reporting/ledger.py): a sliced or resumed mid- or post-training counts every job
    its model file records; the CPU seconds are the benchmarks' (a sliced run's last job)."""
    out = []
    for job in jobs:
        pattern = BENCHMARK_FILES.get(job["job"], f"{job['job']}/*" if job["rule"] == "sample" else job["job"])
        files = sorted(folder.glob(f"{pattern}.tsv"))
        if not files or job["hours"] is None:
            continue
        model = folder.parent / pattern / "model.safetensors"  # midtrain, posttrain/<init> in the results
        wall = cpu = 0.0
        for path in files:
            wall += ledger.job_seconds(path, model if model.exists() else None)[0]
            with open(path) as f:
                cpu += sum(float(r["cpu_time"]) for r in csv.DictReader(f, delimiter="\t"))
        gpus = job.get("gpus", 1)
        projected = job["hours"] * 3600
        out.append({"job": job["job"], "files": len(files), "projected_s": projected, "measured_wall_s": wall * gpus,
                    "measured_cpu_s": cpu, "measured_over_projected": wall * gpus / projected if projected else None})
        print(f"  {job['job']:<22} projected {projected:9.1f} s | measured {wall * gpus:9.1f} s wall x GPUs, "
              f"{cpu:9.1f} s CPU, {len(files)} benchmark file(s) | measured / projected "
              f"{wall * gpus / projected if projected else float('nan'):.2f}", flush=True)
    return out


def project(name):
    configs = [ROWS / f"{name}.yaml"]
    if args.smoke:
        if name in smoke_of:
            configs.append(ROWS / smoke_of[name])
        elif not name.startswith("digits"):
            raise SystemExit(f"--smoke: no smoke overlay for row {name} (stages/config OVERLAYS)")
    cfg = resolve(configs, args.config)
    os.environ[precision.ENV] = str(int(cfg["tf32"]))
    precision.apply()
    print(f"[{name}] {' + '.join(str(c.relative_to(ROWS)) for c in configs)}", flush=True)
    row = Row(cfg)
    jobs = workload.workload(cfg)
    hours = {}
    for job in jobs:
        key = cache_key(cfg, row.shape, job)
        if key not in rates:
            if device.type == "cpu" and not args.threads:
                torch.set_num_threads(cfg["threads"][THREADS_OF[job["rule"]]] if job["rule"] in THREADS_OF else 1)
            rates[key] = measure(job["job"], lambda job=job: rate(row, job))
            rates[key]["threads"] = torch.get_num_threads()
        r = rates[key]
        job["rate"] = r
        job["startup_hours"] = job["jobs"] * job.get("gpus", 1) * startup / 3600
        job["hours"] = (None if "seconds_per_unit" not in r
                        else job["count"] * r["seconds_per_unit"] / 3600 + job["startup_hours"])
        hours[job["job"]] = job["hours"]
        if device.type == "cuda":
            torch.cuda.empty_cache()

    family_post = cfg["posttrain_mf" if row.family == "mf" else "posttrain"]
    paper = cfg.get("paper", {}).get("methods", {})
    comparable = cfg.get("paper", {}).get("comparable", True)
    routes = {}
    for init in family_post["inits"]:
        route = {}
        for job in jobs:
            stage = job["stage"]
            if stage in ("data", "evaluation") or job["hours"] is None:
                continue
            if stage in ("pretrain", "midtrain") and init != "cmt":
                continue
            if stage == "posttrain" and job["init"] != init:
                continue
            route[stage] = route.get(stage, 0.0) + job["hours"]
        route["total"] = sum(route.values())
        routes[init] = {"ours_gpu_hours": route, "ours_mimg": workload.mimg(jobs, init),
                        "paper_gpu_hours": paper.get(init, {}).get("gpu_hours"),
                        "paper_mimg": paper.get(init, {}).get("budget_mimg"), "paper_comparable": comparable}
    apart = {stage: sum(j["hours"] for j in jobs if j["stage"] == stage and j["hours"] is not None)
             for stage in ("data", "evaluation")}
    missing = [j["job"] for j in jobs if j["hours"] is None]
    for init, route in routes.items():
        ours = ", ".join(f"{k} {v:.4g}" for k, v in route["ours_gpu_hours"].items())
        theirs = route["paper_gpu_hours"] or route["paper_mimg"] or "-"
        print(f"[{name}] route {init}: {ours} h (ours, projected) | paper: {theirs} "
              f"{'GPU-h' if route['paper_gpu_hours'] else 'Mimg' if route['paper_mimg'] else ''}"
              f"{'' if comparable else ' (another data set and model: for orientation)'}", flush=True)
    print(f"[{name}] apart from the routes: data {apart['data']:.4g} h, evaluation {apart['evaluation']:.4g} h"
          + (f"; NOT MEASURED: {missing}" if missing else ""), flush=True)
    checks = runtime_checks(cfg, jobs)
    for c in checks:
        print(f"[{name}] runtime of a {c['rule']} job ({c['job']}): projected {c['projected_min']:.3g} min on "
              f"{c['gpus']} GPU(s), the row asks {c['asked_min']} min"
              + (" ** TOO SHORT: raise resources.{0}.runtime or slice the run **".format(c["rule"])
                 if c["asked_min"] < c["projected_min"] else f" ({c['asked_min'] / c['projected_min']:.3g}x)"),
              flush=True)
    out = {"configs": [str(c.relative_to(REPO)) for c in configs], "shape": list(row.shape), "jobs": jobs,
           "routes": routes, "apart": apart, "not_measured": missing, "runtime_checks": checks}
    if args.benchmarks:
        print(f"[{name}] projection against the run in {args.benchmarks}:", flush=True)
        out["measured"] = measured(jobs, args.benchmarks)
    return out


results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "threads": args.threads or "each rule's (the row's threads)",
           "smoke": args.smoke,
           "repeats": repeats,
           "rows": {}}
t_start = time.perf_counter()
rates = {}  # cache_key -> figures, over all rows
startup = results["startup_s"] = startup_seconds()
print(f"start-up of a job: {startup:.2f} s (python, torch, the stage code, the device)", flush=True)
for name in names:
    results["rows"][name] = project(name)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")  # what is done survives a later failure
results["seconds"] = time.perf_counter() - t_start
if args.smoke:
    results["note"] = ("smoke overlays: tiny networks and batches; the figures prove the script runs, "
                       "not the rows' costs")
Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
print(f"wrote {args.out} ({results['seconds']:.0f} s)")
