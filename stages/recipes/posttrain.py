"""Recipe of posttrain: consistency post-training from one initialisation: `cmt` (the mid-trained EMA),
`teacher` (the diffusion model), `random`, or `baseline` (vanilla ECT from the teacher with the row's
`baseline` settings). The weights of the init go into both the trained network and its EMA.
`posttrain.method` picks the objective:
- `ect`: ECT consistency training from data (docs/method.md#ect);
- `ecd`: ECD, consistency distillation with the target point from one Heun step of the teacher,
  autoguided by a guide network with weight guidance.weight (docs/method.md#ecd);
- `ect_snr`: the ImageNet-512 code's ECT: ECD's distance and weight with the shared noise.
EMA snapshots at fixed fractions of the budget (step 0 included: the initialisation itself) are
what the FD curve is drawn from. A class-conditional student gets the batch's classes.
"""

import torch

from stages import networks
from stages.config.stage_configs import snapshot_name
from stages.core import rng
from stages.data import labels as class_labels
from stages.data import training_data
from stages.files import checkpoints
from stages.method import losses
from stages.recipes import averaging, previews
from stages.training.run import Recipe


def student(cfg, init_meta):
    """(the consistency student of a model described by `init_meta`, with random weights, its
    preconditioning kind). The boundary of the consistency function is the config's, whatever the
    init: a teacher's model.json carries its solver grid's end (docs/method.md#preconditioning)."""
    torch.manual_seed(rng.fold(cfg["seed"], "random-init"))
    kind = networks.student_kind(init_meta["architecture"])  # EDM2: plain EDM, no boundary
    net = checkpoints.build(init_meta, kind=kind, dropout=cfg["posttrain"]["dropout"],
                            sigma_boundary=cfg["sigma_boundary"])
    return networks.freeze_unused_heads(net), kind


def objective(cfg, net, denoise=None):
    """loss(model, batch, generator, step, terms=None) of a batch (images, class indices): the method's
    loss at the ECT stage of `step`. `denoise`: ECD's (guided) teacher denoiser. `terms`: a dict for the
    loss's parts (stages/method/losses.py)."""
    pc = cfg["posttrain"]
    method = pc.get("method", "ect")
    target_context = networks.target_context(net)
    label_dim = class_labels.label_dim_of(net)
    sigma_data = net.sigma_data

    def loss(model, batch, generator, step, terms=None):
        y, classes = batch
        common = dict(stage=losses.ect_stage(step, pc["double_every"]), q=pc["q"], k=pc["k"], b=pc["b"],
                      P_mean=pc["P_mean"], P_std=pc["P_std"], c=pc["c"],
                      labels=class_labels.dataset_one_hot(classes, label_dim), target_context=target_context,
                      terms=terms)
        if method == "ecd":
            return losses.ecd_loss(model, y, generator, denoise, sigma_data=sigma_data, **common)
        if method == "ect_snr":
            return losses.ect_snr_loss(model, y, generator, sigma_data=sigma_data, **common)
        return losses.ect_loss(model, y, generator, sigma_min=cfg["sigma_min"], **common)

    return loss


def distillation(cfg, label_dim, teacher, guide, device):
    """ECD's denoiser D_g from the teacher and guide networks (frozen, eval mode; the guide in
    guidance.guide_dtype on CUDA), and the identity entries of their files; (None, {}) for the
    methods that distil nothing."""
    pc = cfg["posttrain"]
    method = pc.get("method", "ect")
    if method != "ecd":
        if teacher or guide:
            raise ValueError(f"posttrain.method {method} uses no teacher or guide network")
        return None, {}
    if teacher is None:
        raise ValueError("posttrain.method ecd distils the teacher: pass --teacher")
    guidance = pc.get("guidance") or {}
    weight = guidance.get("weight", 1.0)
    if (guide is None) != (weight == 1.0):
        raise ValueError(f"posttrain.guidance: weight {weight} with {'no' if guide is None else 'a'} guide "
                         "network; autoguidance needs both (w = 1 and no guide: plain distillation)")
    identity = {}

    def frozen(path, what):
        model, model_meta = checkpoints.load(path, which="ema")
        if model_meta["precond"] != "edm" or class_labels.label_dim_of(model) != label_dim:
            raise ValueError(f"{path}: the {what} must be a diffusion model (precond edm) with the student's "
                             f"{label_dim} classes; it has precond {model_meta['precond']!r}, "
                             f"{class_labels.label_dim_of(model)} classes")
        identity[f"{what}_sha256"] = model_meta["sha256"]
        return model.to(device).eval().requires_grad_(False)

    denoise = losses.guided_denoiser(frozen(teacher, "teacher"), frozen(guide, "guide") if guide else None, weight,
                                     guide_dtype=guidance.get("guide_dtype", "float16"))
    return denoise, identity


def build(cfg, args, accelerator):
    pc, seed, init = cfg["posttrain"], cfg["seed"], args.init
    stage = f"posttrain:{init}"
    data = training_data.open_training_data(args, cfg, accelerator, pc["batch"], "posttrain.batch", seed,
                                            pc.get("batch_per_gpu"))
    init_meta = checkpoints.read_meta(args.init_model)
    net, kind = student(cfg, init_meta)
    if init != "random":
        checkpoints.load_into(net, args.init_model, which="ema")
    label_dim = class_labels.label_dim_of(net)
    data.expect_classes(label_dim)
    ema = averaging.ema_of(net, pc["ema"], pc["steps"])
    denoise, distilled = distillation(cfg, label_dim, args.teacher, args.guide, accelerator.device)
    loss_of = objective(cfg, net, denoise)

    def loss(model, step, part):
        g, terms = rng.generator(seed, step, part, "ect-batch"), {}
        return loss_of(model, data.batch(step, part, g), g, step, terms=terms), terms

    method = pc.get("method", "ect")
    return Recipe(
        stage=stage, seed=seed, net=net, ema=ema, optimizer=pc["optimizer"], total_steps=pc["steps"],
        batch=pc["batch"], micro_batches=data.micro_batches, loss=loss, data=data.state,
        snapshots={f: snapshot_name(f) for f in pc["snapshots"]},
        preview=None if args.latents else previews.consistency(
            seed, data.shape, init_meta["sigma_max"], label_dim),
        describe=f"{method.upper()} q={pc['q']} k={pc['k']} b={pc['b']}, ",
        identity={"init": init, "init_sha256": init_meta["sha256"], "dataset_sha256": data.sha256, **distilled},
        meta={**{k: init_meta[k] for k in ("sigma_data", "sigma_max", "time")}, "sigma_min": cfg["sigma_min"],
              "sigma_boundary": cfg["sigma_boundary"],
              "architecture": {**init_meta["architecture"], "dropout": pc["dropout"]}, "precond": kind, "init": init,
              "role": "posttrain", "inputs": {"init": {"path": args.init_model, "sha256": init_meta["sha256"]}}})
