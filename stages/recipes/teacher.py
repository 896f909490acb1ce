"""Recipe of train_teacher: the teacher trained from scratch.

teacher.objective edm (the default): EDM diffusion training (EDM preconditioning, log-normal sigma,
EDM loss weighting). teacher.objective meanflow: MeanFlow (docs/method.md#meanflow), the teacher of
the CMT-MF rows (the paper's MF-B/4), an average-velocity model u(z, r, t) in flow time whose
multi-step sampler makes the trajectories (trajectories.solver meanflow), with class labels, label
dropout and guidance in the target as teacher.meanflow says. Its network is teacher.network where
given (MF-B/4 beside an MF-XL/2 student), else the row's; on a latent row it trains on the encoded
dataset's posterior draws (stages/data/training_data.py).
"""

import torch

from stages import networks
from stages.core import rng
from stages.data import labels as class_labels
from stages.data import training_data
from stages.files import checkpoints
from stages.method import losses, meanflow
from stages.recipes import averaging
from stages.training.run import Recipe


def is_meanflow(cfg):
    return cfg["teacher"].get("objective", "edm") == "meanflow"


def model_meta(cfg, shape):
    """model.json's description of the teacher for data of `shape` = (channels, resolution)."""
    tc = cfg["teacher"]
    sigmas = {k: cfg[k] for k in ("sigma_data", "sigma_min", "sigma_max")}
    if is_meanflow(cfg):
        arch = {**networks.architecture(tc.get("network") or cfg["network"], *shape, tc["dropout"]), "dual_time": True}
        return {"architecture": arch, "precond": "meanflow", **sigmas, "time": "flow_t"}
    arch = networks.architecture(cfg["network"], *shape, tc["dropout"])
    return {"architecture": arch, "precond": "edm", **sigmas, "time": "sigma"}


def network(cfg, shape):
    """(the teacher with its random initial weights, its model.json description)."""
    torch.manual_seed(rng.fold(cfg["seed"], "teacher-init"))
    meta = model_meta(cfg, shape)
    return networks.freeze_unused_heads(checkpoints.build(meta)), meta


def classes_of(cfg, net):
    """The classes the teacher takes: a MeanFlow model's class indices, an EDM denoiser's one-hot width."""
    return int(getattr(net, "num_classes", 0) or 0) if is_meanflow(cfg) else class_labels.label_dim_of(net)


def objective(cfg, net):
    """(loss(model, batch, generator, terms=None) -> per-sample losses of a batch (images, class
    indices), what it says in the log); `net` is the bare network (MeanFlow's JVP and guidance run on
    it). `terms`: a dict for the loss's parts (stages/method/losses.py)."""
    tc = cfg["teacher"]
    num_classes = classes_of(cfg, net)
    if is_meanflow(cfg):
        mf = meanflow.Objective.from_config(tc["meanflow"], net=net, what="teacher.meanflow")

        def meanflow_loss(model, batch, generator, terms=None):
            x, y = batch
            return mf.loss(model, x, generator, y if num_classes else None, terms=terms)

        return meanflow_loss, f"MeanFlow {mf.describe()}"

    def edm_loss(model, batch, generator, terms=None):
        y, classes = batch
        return losses.edm_loss(model, y, generator, cfg["sigma_data"], tc["P_mean"], tc["P_std"],
                               labels=class_labels.dataset_one_hot(classes, num_classes), terms=terms)

    return edm_loss, "EDM"


def build(cfg, args, accelerator):
    tc, seed = cfg["teacher"], cfg["seed"]
    if not (args.dataset or args.latents):
        raise ValueError("train_teacher: pass the prepared dataset (--dataset) or an encoded one (--latents)")
    data = training_data.open_training_data(args, cfg, accelerator, tc["batch"], "teacher.batch", seed,
                                            tc.get("batch_per_gpu"))
    net, meta = network(cfg, data.shape)
    print(f"[train_teacher] objective {tc.get('objective', 'edm')}: {sum(p.numel() for p in net.parameters()):,} "
          f"parameters, data {data.path}", flush=True)
    data.expect_classes(classes_of(cfg, net))
    ema = averaging.ema_of(net, tc["ema"], tc["steps"])
    loss_of, describe = objective(cfg, net)

    def loss(model, step, part):
        g, terms = rng.generator(seed, step, part, "teacher-batch"), {}
        return loss_of(model, data.batch(step, part, g), g, terms=terms), terms

    objective_name = tc.get("objective", "edm")
    return Recipe(
        stage="train_teacher", seed=seed, net=net, ema=ema, optimizer=tc["optimizer"], total_steps=tc["steps"],
        batch=tc["batch"], micro_batches=data.micro_batches, loss=loss, data=data.state, describe=f"{describe}, ",
        identity={"key": args.key, "dataset_sha256": data.sha256},
        meta={"role": "teacher", "key": args.key, **meta,
              **({"objective": objective_name} if objective_name != "edm" else {}),
              "inputs": {"latents" if args.latents else "dataset": {"path": data.path, "sha256": data.sha256}}})
