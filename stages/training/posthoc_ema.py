"""Post-hoc EMA files (EDM2; the formulas in stages/method/power_ema.py): the snapshots of its
power-function profiles a run keeps while it trains, and the EMA of another width synthesised from
them afterwards.

Each snapshot is a model file (`checkpoints.save`: the profile under `ema.`, its description in the
.json beside) that says in `power_ema` which profile it holds (sigma_rel, gamma) and in `steps` after
which step; the run's per-step EMA is described in `per_step_ema`. The files live in the run's kept
folder (kept.py: rolled back with its state, published beside the model file when it finishes) and
only the main process writes them.
"""

from pathlib import Path, PurePath

import torch
from safetensors import safe_open

from stages.files import checkpoints
from stages.method import power_ema

ROLE = "power-ema-snapshot"


class ProfileSnapshots:
    """The snapshots of a PowerEMA's profiles at the steps its `snapshots` name; `save(steps_done)`
    after each step (run.py calls it beside the FD-curve snapshots). `meta` is the run's model
    description, which every snapshot repeats so that it loads and samples as a model."""

    def __init__(self, job, ema, batch, meta):
        self.job, self.ema, self.batch, self.meta = job, ema, batch, meta
        top = PurePath(next(iter(ema.snapshots.values()))[0]).parts[0]
        self.folder = job.kept.keep(top, Path(job.args.out).parent / top, folder=True).parent

    def save(self, steps_done):
        names = self.ema.snapshots.get(steps_done)
        if names is None or not self.job.accelerator.is_main_process:
            return
        for index, (name, profile) in enumerate(zip(names, self.ema.profiles, strict=True)):
            checkpoints.save(self.folder / name, ema=profile, meta={
                **self.meta, "config": self.job.cfg, "role": ROLE, **self.job.images(steps_done, self.batch),
                "power_ema": {"index": index, "sigma_rel": self.ema.sigma_rels[index],
                              "gamma": self.ema.gammas[index]},
                "per_step_ema": {"beta": self.ema.beta, "rampup": self.ema.rampup}})


def read_snapshots(folder):
    """[(path, meta)] of the profile snapshots in `folder`, by step then width."""
    found = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        meta = checkpoints.read_meta(path)
        if meta.get("role") != ROLE:
            raise ValueError(f"{path}: role {meta.get('role')!r}, not a power-EMA snapshot ({ROLE}); "
                             f"{folder} holds only the snapshots a run with ema.kind power keeps")
        found.append((path, meta))
    if not found:
        raise FileNotFoundError(f"{folder}: no power-EMA snapshots; rerun the training rule with ema.kind power")
    return sorted(found, key=lambda item: (item[1]["steps"], item[1]["power_ema"]["sigma_rel"]))


def plan(snapshots, sigma_rels, step):
    """For each width in `sigma_rels`, the least-squares coefficients over the `snapshots` (read_snapshots')
    taken at or before `step`, and the fit: {sigma_rel: (coefficients, info)}. The EMA to synthesise is
    the profile of that width read at `step`."""
    used = [(path, meta) for path, meta in snapshots if meta["steps"] <= step]
    if not any(meta["steps"] == step for _, meta in used):
        steps = sorted({meta["steps"] for _, meta in snapshots})
        raise ValueError(f"no power-EMA snapshot at step {step} (the run kept steps {steps}); "
                         "synthesise at one of them (posthoc_ema.at)")
    stored = [(meta["steps"], meta["power_ema"]["gamma"]) for _, meta in used]
    out = {}
    for sigma_rel in sigma_rels:
        gamma = power_ema.gamma_of(sigma_rel)
        x, error, mass = power_ema.coefficients(stored, (step, gamma))
        out[sigma_rel] = (x, {"sigma_rel": sigma_rel, "gamma": gamma, "step": step, "snapshots": len(used),
                              "profiles": sorted({meta["power_ema"]["sigma_rel"] for _, meta in used}),
                              "fit_error": error, "mass": mass})
    return [path for path, _ in used], out


def synthesise(paths, coefficients, buffers):
    """{sigma_rel: state dict}: sum_j x_j (snapshot j), tensor by tensor in float64, for the coefficients
    of each width ({sigma_rel: x}, x over `paths`). Buffers (`buffers`: their names) are not averaged:
    they are the last snapshot's, as every profile copies the network's."""
    files = [safe_open(str(p), framework="pt") for p in paths]
    names = [k for k in files[-1].keys() if k.startswith("ema.")]
    out = {s: {} for s in coefficients}
    for key in names:
        name = key[len("ema."):]
        if name in buffers:
            last = files[-1].get_tensor(key)
            for s in out:
                out[s][name] = last.clone()
            continue
        tensors = [f.get_tensor(key) for f in files]
        for s, x in coefficients.items():
            total = torch.zeros(tensors[0].shape, dtype=torch.float64)
            for weight, tensor in zip(x, tensors, strict=True):
                total += float(weight) * tensor.to(torch.float64)
            out[s][name] = total.to(tensors[-1].dtype)
    return out
