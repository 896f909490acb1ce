"""Stage report: the row's table (init x {1-step, 2-step} FD, mean and min over seed ranges), the
teacher's own solver endpoints as the ceiling, the mid-trained model alone, ours beside the paper's,
the cost per stage and the GPU-hours ledger, an FD-vs-images curve per init, the training curves of
every stage from their metrics logs, sample grids, and where runs keep power-EMA snapshots the FD of
their post-hoc EMAs against the width (stages/reporting/).

Family cm (consistency models) compares inits at the same post-training budget; family mf
(MeanFlow) at the same total budget (mid + post for the CMT init, docs/method.md#meanflow), so its
curves and table use images_seen_total."""

import argparse
import csv
import json
import time
from pathlib import Path

from stages.files import atomic, checkpoints
from stages.reporting import figures, tables

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--config", type=json.loads, required=True)
p.add_argument("--fid", nargs="+", required=True, help="fid/<init>.json, in the order of config inits")
p.add_argument("--ceiling", required=True, help="fid/teacher-solver.json")
p.add_argument("--samples", nargs="+", required=True, help="final-snapshot samples per init")
p.add_argument("--models", nargs="+", required=True, help="teacher, midtrain, then posttrain per init")
p.add_argument("--benchmarks", required=True, help="the row's benchmarks folder")
p.add_argument("--receipts", default=None, help="the row's receipts folder: the devices the trajectory shards used")
p.add_argument("--out", required=True)
p.add_argument("--curve", required=True)
p.add_argument("--grids", required=True)
p.add_argument("--table", required=True, help="results.csv: ours and the paper's per method")
p.add_argument("--training-curves", required=True, help="training_curves.png: the loss of each stage against images")
p.add_argument("--metrics", nargs="+", required=True,
               help="the metrics logs of midtrain, then of posttrain per init (config inits' order)")
p.add_argument("--teacher-metrics", default=None, help="the teacher's metrics log, beside its model (may be absent)")
p.add_argument("--midtrain-fid", default=None, help="fid/midtrain.json: the mid-trained model alone")
p.add_argument("--latent-vgg-accuracy", default=None,
               help="latent rows: latent_vgg/accuracy.json, the E-LatentLPIPS backbone's held-out accuracy")
p.add_argument("--posthoc-fid", nargs="+", default=None,
               help="fid/posthoc-<init>.json per init of the config's posthoc_inits, in order: the post-hoc EMAs")
p.add_argument("--posthoc-curve", default=None, help="fd_sigma_rel.png: FD against the post-hoc EMA's width")
args = p.parse_args()
cfg = args.config
inits, steps, final, family = cfg["inits"], cfg["sampling"]["steps"], cfg["final_snapshot"], cfg.get("family", "cm")
paper, online = cfg.get("paper") or {}, bool(cfg.get("midtrain_online"))
fids = {init: json.loads(Path(path).read_text()) for init, path in zip(inits, args.fid, strict=True)}
ceiling = json.loads(Path(args.ceiling).read_text())["teacher"]
models = dict(zip(["train_teacher", "midtrain"] + [f"posttrain/{i}" for i in inits], args.models, strict=True))
metas = {name: checkpoints.read_meta(model) for name, model in models.items()}
labels = tables.LABELS[family]
features = fids[inits[0]]["features"]
if family == "mf":
    title, two_step = "CMT-MF mid-training, then MeanFlow", f"t_mid = {cfg['sampling']['t_mid']}"
    images_key, x_label = "images_seen_total", "total training kimg (mid + post)"
else:
    title = f"CMT mid-training, then {tables.METHODS[cfg.get('method', 'ect')]}"
    two_step, images_key, x_label = f"sigma_mid = {cfg['sampling']['sigma_mid']}", "images_seen", "post-training kimg"

lines = [f"# {cfg['row']}: {title}", "",
         f"Fréchet distance ({features} features) against the real data, mean / min over "
         f"{cfg['sampling']['num_ranges']} seed ranges of {cfg['sampling']['per_range']} samples; 2-step sampling "
         f"uses {two_step}. Lower is better.", ""]
lines += tables.results(fids, inits, steps, final, labels, ceiling, family) + [""]
lines += tables.starting_points(fids, inits, steps, labels) + [""]
if family == "mf":
    teacher = "a MeanFlow model" if metas["train_teacher"]["precond"] == "meanflow" else "an EDM model in flow time"
    lines += [f"Budget: equal total training images for both inits; the teacher is {teacher} "
              "(docs/method.md#meanflow).", ""]
lines += tables.ordering(fids, inits, steps, final) + [""]
if args.midtrain_fid:
    mid = json.loads(Path(args.midtrain_fid).read_text())["snapshots"]["final"]
    lines += tables.midtrained_alone(mid, steps, cfg["sampling"]["sigma_mid_midtrain"]) + [""]
if args.latent_vgg_accuracy:
    lines += tables.latent_vgg(json.loads(Path(args.latent_vgg_accuracy).read_text())) + [""]
if args.posthoc_fid:
    posthoc = {init: json.loads(Path(path).read_text())
               for init, path in zip(cfg["posthoc_inits"], args.posthoc_fid, strict=True)}
    # each run's own per-step EMA: an init's final snapshot, or the mid-trained model alone
    own = {init: fids[init]["snapshots"][final] for init in posthoc if init in fids}
    if "midtrain" in posthoc:
        own["midtrain"] = json.loads(Path(args.midtrain_fid).read_text())["snapshots"]["final"]
    run_labels = {**labels, "midtrain": "mid-trained model alone"}
    lines += tables.posthoc_ema(posthoc, own, steps, run_labels) + [""]
    figures.fd_sigma_rel(args.posthoc_curve, posthoc, own, steps, run_labels, cfg["row"])

cost, images, seconds = tables.cost(models, metas, args.benchmarks, online)
table = tables.against_paper(fids, inits, steps, final, labels, paper, images, seconds, online)
with atomic.atomic_path(args.table) as tmp:
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(table)
lines += tables.against_paper_lines(table, paper, features, labels)
lines += cost
if cfg.get("gpus") is not None:
    lines += tables.gpu_hours(args.benchmarks, inits, cfg["gpus"], models, paper, labels, args.receipts)

figures.fd_curve(args.curve, fids, inits, steps, labels, ceiling, cfg["row"], images_key, x_label)
figures.sample_grids(args.grids, dict(zip(inits, args.samples, strict=True)), steps, labels)
logs = dict(zip(["midtrain"] + inits, map(figures.read_metrics, args.metrics), strict=True))
teacher_log = figures.read_metrics(args.teacher_metrics)
figures.training_curves(args.training_curves, {"teacher": {"teacher": teacher_log}, "mid-training": {
    "CMT-MF" if family == "mf" else "CMT": logs["midtrain"]}, "post-training": {labels[i]: logs[i] for i in inits}},
    cfg["row"])

if cfg.get("notes"):
    lines += ["## Notes on this row", "", cfg["notes"].strip(), ""]
lines += ["## Figures", "", f"![FD against training images]({Path(args.curve).name})", "",
          f"![Training loss of each stage against its images]({Path(args.training_curves).name})"
          + ("" if teacher_log else " (the teacher's panel is empty: the store holds no metrics log of it, as for "
             "a teacher trained before logs were kept or an imported one)"), ""]
if args.posthoc_curve:
    lines += [f"![FD against the post-hoc EMA's width]({Path(args.posthoc_curve).name})", ""]
lines += [f"![Samples from each init after post-training]({Path(args.grids).name})", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}."]
atomic.write_text(args.out, "\n".join(lines) + "\n")
print(f"[report] wrote {args.out}", flush=True)
