"""Which term of MeanFlow post-training moves a model: for a model file (the CMT-MF mid-trained model,
a post-training snapshot) and a row's posttrain_mf section (MeanFlow from data, or distilled from the
teacher with --teacher), the loss on the two kinds of samples the recipe mixes, each on batches of
its own with the same data, noise and times:

- flow matching, r = t (1 - ratio_r_neq_t of the samples, 75 % in MeanFlow's recipe): u(z, t, t)
  against the velocity v (eps - x, or the teacher's);
- average velocity, r != t: u(z, r, t) against v - (t - r) du/dt.

For each: the mean squared error ||u - u_tgt||^2 (per sample, summed over pixels), the mean of the
adaptively weighted loss, and the norm of the gradient of its share of the batch loss (share x mean
weighted loss); and the cosine between the two gradients. A term whose error is large on this model
but small on a converged one is the one post-training spends its first steps on.

    python bench/meanflow_terms.py --configfile config/rows/variants/digits-cmt-mf-mfd.yaml \
        --model results/digits-cmt-mf-mfd/midtrain/model.safetensors \
        --dataset store/datasets/digits-<key>/dataset.npz --teacher store/teachers/<key>/model.safetensors
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.config import resolve, stage_configs  # noqa: E402
from stages.data import datasets  # noqa: E402
from stages.files import checkpoints  # noqa: E402
from stages.method import meanflow, teacher_velocity  # noqa: E402


def terms(model, images, labels, section, teacher, batches, batch, seed):
    """{flow_matching, average_velocity: {mse, weighted, grad_norm}, cosine} over `batches` batches:
    the row's own objective (meanflow.Objective.from_config) with every sample of one kind."""
    objective = meanflow.Objective.from_config(section, net=model, what="posttrain_mf", teacher=teacher)
    share = objective.ratio_r_neq_t
    params = [p for p in model.parameters() if p.requires_grad]
    out = {name: {"mse": 0.0, "weighted": 0.0, "grad_norm": 0.0} for name in ("flow_matching", "average_velocity")}
    cosine = 0.0
    pick = torch.Generator().manual_seed(seed)
    for b in range(batches):
        rows = torch.randint(len(images), (batch,), generator=pick)
        x = images[rows]
        y = labels[rows] if objective.null_class is not None else None
        grads = {}
        for name, ratio, weight in (("flow_matching", 0.0, 1 - share), ("average_velocity", 1.0, share)):
            kind = dataclasses.replace(objective, ratio_r_neq_t=ratio)
            # p = 0: the adaptive weight is 1, the loss the squared error itself
            mse = dataclasses.replace(kind, p=0.0).loss(model, x, torch.Generator().manual_seed(seed + b), y).detach()
            loss = kind.loss(model, x, torch.Generator().manual_seed(seed + b), y)
            grad = torch.autograd.grad(weight * loss.mean(), params)
            grads[name] = torch.cat([v.flatten() for v in grad])
            out[name]["mse"] += float(mse.mean()) / batches
            out[name]["weighted"] += float(loss.detach().mean()) / batches
            out[name]["grad_norm"] += float(grads[name].norm()) / batches
        cosine += float(torch.nn.functional.cosine_similarity(grads["flow_matching"], grads["average_velocity"],
                                                              dim=0)) / batches
    return {**out, "cosine": cosine, "ratio_r_neq_t": share}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configfile", nargs="+", required=True, help="the row's config files, as --configfile takes them")
    p.add_argument("--model", required=True, help="the model.safetensors to measure (its EMA weights)")
    p.add_argument("--dataset", required=True, help="the prepared dataset.npz")
    p.add_argument("--teacher", default=None, help="the teacher's model.safetensors (posttrain_mf.target teacher)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the numbers as JSON here too")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = stage_configs.stage_config("posttrain_mf", resolve(args.configfile), "cmt")
    section = cfg["posttrain_mf"]
    model, _ = checkpoints.load(args.model, which="ema")
    model.train()
    teacher = None
    if section.get("target", "data") == "teacher":
        if not args.teacher:
            p.error("the row distils (posttrain_mf.target teacher): pass --teacher")
        teacher = teacher_velocity.velocity_field(*checkpoints.load(args.teacher, which="ema"))
    images, classes = datasets.load(args.dataset)
    images = torch.as_tensor(datasets.to_model_range(images), dtype=torch.float32)
    labels = torch.as_tensor(classes, dtype=torch.int64)
    result = {"model": args.model, "target": section.get("target", "data"),
              **terms(model, images, labels, section, teacher, args.batches, section["batch"], args.seed)}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
