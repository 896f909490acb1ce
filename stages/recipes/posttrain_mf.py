"""Recipe of posttrain_mf: MeanFlow training from data (docs/method.md#meanflow) from one
initialisation: `cmt` (the CMT-MF mid-trained EMA) or `random` (MeanFlow from scratch, the paper's
baseline).

The budget is set by the rule (the config's `steps`): at equal total budget the random init trains
for the mid-training's images on top of the post-training's. Snapshots record `images_seen_total`
(mid-training images included), the axis on which the two inits are compared.

`posttrain_mf.target: teacher` is MeanFlow distillation (MF-RAE's route after CMT-MF): the teacher's
velocity v(z_t, t) (stages/method/teacher_velocity.py: an EDM teacher read in flow-matching time, a
MeanFlow teacher's u(z_t, t, t)) replaces eps - x; the stage gets the teacher's model file (--teacher).

A class-conditional network (the DiT rows, network.num_classes > 0) trains on the dataset's labels
with label dropout to the null class and, with posttrain_mf.guidance, classifier-free guidance in the
target (meanflow.Objective). The random init takes the row's `network` section where the config
passes one (MF-XL/2 against an MF-B/4 teacher), else the teacher's architecture. A latent row trains
on the encoded dataset's posterior draws (stages/data/training_data.py).
"""

import torch

from stages.config.stage_configs import snapshot_name
from stages.core import rng
from stages.data import training_data
from stages.files import checkpoints
from stages.method import meanflow, teacher_velocity
from stages.recipes import averaging, previews
from stages.training.run import Recipe


def model_meta(cfg, init, init_meta):
    """model.json's description of the student of init `init` from the model `init_meta` describes."""
    pc = cfg["posttrain_mf"]
    architecture = {**init_meta["architecture"], "dropout": pc["dropout"], "dual_time": True}
    if init == "random" and cfg.get("network"):
        architecture = {**cfg["network"], **{k: init_meta["architecture"][k] for k in ("in_channels", "resolution")},
                        "dropout": pc["dropout"], "dual_time": True}
    return {"architecture": architecture, "precond": "meanflow", "sigma_data": init_meta["sigma_data"],
            "sigma_min": init_meta["sigma_min"], "sigma_max": init_meta["sigma_max"], "time": "flow_t"}


def student(cfg, init, init_meta):
    """(the average-velocity student with its random initial weights, its model.json description)."""
    meta = model_meta(cfg, init, init_meta)
    torch.manual_seed(rng.fold(cfg["seed"], "random-init"))
    return checkpoints.build(meta), meta


def distillation_teacher(cfg, path, net, device):
    """(the teacher's velocity field, the identity entries of its file) for posttrain_mf.target
    teacher; (None, {}) for MeanFlow from data, which refuses a teacher."""
    if cfg["posttrain_mf"].get("target", "data") != "teacher":
        if path:
            raise ValueError("posttrain_mf: --teacher given but posttrain_mf.target is not teacher "
                             "(MeanFlow from data distils nothing)")
        return None, {}
    if not path:
        raise ValueError("posttrain_mf.target teacher (MeanFlow distillation) needs the teacher: pass --teacher")
    model, meta = checkpoints.load(path, which="ema")
    classes = int(getattr(net, "num_classes", 0) or 0)
    teacher_classes = (int(getattr(model, "num_classes", 0) or 0) if meta["precond"] == "meanflow"
                       else int(getattr(model, "label_dim", 0) or 0))
    if teacher_classes != classes:
        raise ValueError(f"{path}: the teacher has {teacher_classes} classes, the student {classes}; MeanFlow "
                         "distillation gives the teacher the student's labels")
    return teacher_velocity.velocity_field(model.to(device), meta), {"teacher_sha256": meta["sha256"]}


def objective(cfg, net, teacher=None):
    """(loss(model, batch, generator, terms=None) of a batch (images, class indices), the objective);
    `net` is the bare network: the JVP runs without a graph on it and the graph forward goes through
    the (DDP) wrapper (meanflow.meanflow_loss_at), in one process too: a single JVP with a graph
    keeps the tangent's activations and costs 3x the memory of a flow-matching step (bench/RESULTS.md).
    `teacher`: the velocity field of MeanFlow distillation (distillation_teacher), else None."""
    mf = meanflow.Objective.from_config(cfg["posttrain_mf"], net=net, what="posttrain_mf", teacher=teacher)

    def meanflow_loss(model, batch, generator, terms=None):
        x, y = batch
        return mf.loss(model, x, generator, y, terms=terms)

    return meanflow_loss, mf


def build(cfg, args, accelerator):
    pc, seed, init, total = cfg["posttrain_mf"], cfg["seed"], args.init, cfg["steps"]
    data = training_data.open_training_data(args, cfg, accelerator, pc["batch"], "posttrain_mf.batch", seed,
                                            pc.get("batch_per_gpu"))
    init_meta = checkpoints.read_meta(args.init_model)
    if init == "cmt" and init_meta["precond"] != "meanflow":
        raise ValueError(f"{args.init_model}: precond {init_meta['precond']!r}; the cmt init must be a "
                         "CMT-MF mid-trained model (midtrain_mf)")
    data_shape = (init_meta["architecture"]["in_channels"], init_meta["architecture"]["resolution"])
    if tuple(data.shape) != data_shape:
        raise ValueError(f"{data.path}: data of {data.shape[0]} channels at {data.shape[1]}^2, but {args.init_model} "
                         f"was made for {data_shape[0]} at {data_shape[1]}^2 (pixels and latents mixed up?)")
    net, meta = student(cfg, init, init_meta)
    if init == "cmt":
        checkpoints.load_into(net, args.init_model, which="ema")
    prior_images = init_meta["images_seen"] if init == "cmt" else 0
    ema = averaging.ema_of(net, pc["ema"], total)
    teacher, distilled = distillation_teacher(cfg, args.teacher, net, accelerator.device)
    loss_of, mf = objective(cfg, net, teacher)
    if mf.null_class is not None:
        data.expect_classes(mf.null_class)

    def loss(model, step, part):
        g, terms = rng.generator(seed, step, part, "meanflow-batch"), {}
        return loss_of(model, data.batch(step, part, g), g, terms=terms), terms

    return Recipe(
        stage=f"posttrain_mf:{init}", seed=seed, net=net, ema=ema, optimizer=pc["optimizer"], total_steps=total,
        batch=pc["batch"], micro_batches=data.micro_batches, loss=loss, data=data.state,
        snapshots={f: snapshot_name(f) for f in pc["snapshots"]}, images_before=prior_images,
        preview=None if args.latents else previews.average_velocity(
            seed, data.shape, int(getattr(net, "num_classes", 0) or 0)),
        describe=f"MeanFlow {mf.describe()} (after {prior_images:,} mid-training images), ",
        identity={"init": init, "init_sha256": init_meta["sha256"], "dataset_sha256": data.sha256, **distilled},
        meta={**meta, "init": init, "images_seen_before": prior_images, "role": "posttrain",
              "inputs": {"init": {"path": args.init_model, "sha256": init_meta["sha256"]},
                         **({"teacher": {"path": args.teacher, "sha256": distilled["teacher_sha256"]}}
                            if distilled else {})}})
