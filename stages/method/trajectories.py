"""Teacher trajectories as pure functions of (teacher, solver spec, base seed, index): what the
trajectory_shard stage writes and what the mid-training stages' spot check regenerates.

A class-conditional teacher (label_dim > 0) solves each trajectory for one class: the dataset
image's label where x_T starts from data, a uniform random class folded from (seed, index)
otherwise (stages/data/labels.py). The class is stored in the sample's meta.json as `label`, only
for such teachers: an unconditional teacher's shards are byte for byte what they were.

Two solver kinds (solvers.py): `dpm_solver_pp` in sigma for an EDM teacher (the grid is stored as
`sigmas`), and `meanflow` in flow time for a MeanFlow teacher u(z, r, t) (precond "meanflow"): z_1 =
eps ~ N(0, I), then z_r = z_t - (t - r) u(z_t, r, t) on the uniform grid t_k = 1 - k / nfe, stored as
`times` (float64, noise first). A flow-time trajectory of a class-conditional teacher carries its
class index; with the spec's `label_dropout` (the official CMT-MF loss drops 10 % of the labels
before the teacher solves), the class of a trajectory is the null class with that probability,
folded from (seed, index), and the teacher then solves the unconditional flow."""

import numpy as np
import torch

from stages.core import rng
from stages.data import datasets, shards
from stages.data import labels as class_labels
from stages.files import checkpoints
from stages.method import solvers

STORE_DTYPES = {"float16": np.float16, "float32": np.float32}


class Generator:
    """Solves the teacher's PF-ODE for given trajectory indices of one spec."""

    def __init__(self, teacher, meta, spec, device, data=None, labels=None):
        self.teacher = teacher.to(device).eval().to(torch.float32)
        self.spec, self.device, self.data, self.labels = spec, device, data, labels
        arch = meta["architecture"]
        self.shape = (arch["in_channels"], arch["resolution"], arch["resolution"])
        self.flow_time = spec["solver"] in solvers.FLOW_SOLVERS
        self.dtype = STORE_DTYPES[spec["dtype"]]
        if self.flow_time:
            self._init_flow_time(meta)
            return
        if meta.get("precond") == "meanflow":
            raise ValueError(f"trajectories.solver {spec['solver']!r} solves an EDM denoiser in sigma; this teacher is "
                             f"a MeanFlow model: use solver {sorted(solvers.FLOW_SOLVERS)}")
        self.label_dim = class_labels.label_dim_of(self.teacher)
        self.sigmas = solvers.logsnr_grid(spec["nfe"], spec["sigma_max"], spec["sigma_min"])
        self.grid, self.grid_name = self.sigmas, "sigmas"
        self.solve = solvers.SOLVERS[spec["solver"]]
        if spec["x_T"] == "data_plus_noise" and data is None:
            raise ValueError("x_T = data_plus_noise needs the prepared dataset")
        if self.label_dim and data is not None:
            if labels is None:
                raise ValueError("a class-conditional teacher starting from data needs the dataset's labels")
            class_labels.check_dataset(labels, self.label_dim, "the prepared dataset")

    def _init_flow_time(self, meta):
        spec = self.spec
        if meta.get("precond") != "meanflow":
            raise ValueError(f"trajectories.solver {spec['solver']!r} runs a MeanFlow teacher u(z, r, t) in flow "
                             f"time; this teacher has precond {meta.get('precond')!r}: use solver dpm_solver_pp, or "
                             "train the teacher with teacher.objective: meanflow")
        if spec["x_T"] != "noise":
            raise ValueError(f"trajectories.x_T {spec['x_T']!r}: a flow-time trajectory starts from z_1 = eps "
                             "(x_T: noise); data plays no part at t = 1")
        self.num_classes = int(getattr(self.teacher, "num_classes", 0) or 0)
        self.label_dim = self.num_classes
        self.null_class = getattr(self.teacher, "null_class", None)
        self.label_dropout = float(self.spec.get("label_dropout", 0.0) or 0.0)
        if self.label_dropout and not self.num_classes:
            raise ValueError("trajectories.label_dropout needs a class-conditional teacher; this one is unconditional")
        self.grid, self.grid_name = solvers.flow_time_grid(spec["nfe"]), "times"
        self.solve = solvers.FLOW_SOLVERS[spec["solver"]]

    @torch.no_grad()
    def denoise(self, x, sigma, onehot=None):
        sigma = torch.full((x.shape[0],), sigma, device=self.device)
        return self.teacher(x, sigma) if onehot is None else self.teacher(x, sigma, onehot)

    def start_point(self, i):
        g = rng.generator(self.spec["seed"], i, "x_T")
        if self.flow_time:
            return self._flow_start_point(i, g)
        x = self.spec["sigma_max"] * torch.randn(self.shape, generator=g)
        meta = {"index": i, "seed": self.spec["seed"]}
        if self.data is not None:  # the official code's start: a real image plus 80 z (docs/method.md#paper-and-code)
            j = int(torch.randint(len(self.data), (1,), generator=g))
            x = self.data[j] + x
            meta["data_index"] = j
        if self.label_dim:
            meta["label"] = (int(self.labels[j]) if self.data is not None
                             else class_labels.random_label(self.spec["seed"], i, self.label_dim))
        return x, meta

    def _flow_start_point(self, i, g):
        meta = {"index": i, "seed": self.spec["seed"]}
        z = torch.randn(self.shape, generator=g)
        if self.num_classes:
            label = class_labels.random_label(self.spec["seed"], i, self.num_classes)
            if self.label_dropout:
                drop = rng.generator(self.spec["seed"], i, "label-dropout")
                if float(torch.rand(1, generator=drop, dtype=torch.float64)) < self.label_dropout:
                    label = self.null_class
            meta["label"] = label
        return z, meta

    def states(self, indices):
        """(float32 states [n, K+1, C, H, W] on the device, metas) of trajectories `indices`, solved together."""
        starts = [self.start_point(i) for i in indices]
        x = torch.stack([s[0] for s in starts]).to(self.device)
        if self.flow_time:
            labels = (torch.tensor([s[1]["label"] for s in starts], dtype=torch.int64, device=self.device)
                      if self.num_classes else None)
            with torch.no_grad():
                states, _ = self.solve(self.teacher, x, self.grid, labels)
            return states, [s[1] for s in starts]
        onehot = class_labels.one_hot([s[1].get("label") for s in starts], self.label_dim, self.device)
        denoise = self.denoise if onehot is None else lambda x, sigma: self.denoise(x, sigma, onehot)
        states = self.solve(denoise, x, self.sigmas, order=self.spec["order"],
                            lower_order_final=self.spec["lower_order_final"])
        return states, [s[1] for s in starts]

    def batch(self, indices):
        """[(index, states in the store dtype [K+1, C, H, W], grid float64 [K+1], meta)] for `indices`:
        the grid is the sigmas or (flow time) the times, as `grid_name` says."""
        states, metas = self.states(indices)
        states = states.cpu().numpy()
        out = []
        for meta, i, traj in zip(metas, indices, states, strict=True):
            stored = traj.astype(self.dtype)
            if not np.isfinite(stored).all():
                raise FloatingPointError(f"trajectory {i} overflows {self.spec['dtype']}; store float32")
            out.append((i, stored, self.grid.numpy(), meta))
        return out


def spot_check(count, shard_paths, spec, teacher_path, dataset_path=None, remake=None):
    """Regenerate `count` stored trajectories (spread over the pool) from their seeds with the
    teacher and compare: a shard from another teacher, solver or code version, or one edited in
    place with its manifest rewritten, stops the run here, naming the shard and (`remake`: shard
    path -> command) the command that makes it again. `spec` is the manifest's. Tolerance: another
    GPU model or batch size changes the last bits, a different trajectory changes everything.
    Returns the number of trajectories checked."""
    if count == 0:
        return 0
    teacher, meta = checkpoints.load(teacher_path, which="ema")
    data = labels = None
    if spec["x_T"] == "data_plus_noise":
        images, labels = datasets.load(dataset_path)
        data = torch.from_numpy(datasets.to_model_range(images))
    generator = Generator(teacher, meta, spec, torch.device("cpu"), data, labels)
    picks = np.linspace(0, len(shard_paths) - 1, min(count, len(shard_paths))).round().astype(int)
    picks = list(picks) + [picks[-1]] * (count - len(picks))
    per_shard = {}
    for k, p in enumerate(picks):
        per_shard.setdefault(int(p), []).append(k)
    for p, ks in per_shard.items():
        stored = shards.read_shard(shard_paths[p])
        for k in ks:
            s = stored[(k * 7919) % len(stored)]
            (_, states, grid, regenerated), = generator.batch([s["index"]])
            if generator.grid_name not in s:
                raise ValueError(f"{shard_paths[p]}: trajectory {s['index']} stores no {generator.grid_name} but its "
                                 f"spec's solver {spec['solver']!r} makes them: "
                                 + (remake or {}).get(str(shard_paths[p]), "rerun its trajectory_shard job"))
            if regenerated.get("label") != s["meta"].get("label"):
                raise ValueError(
                    f"{shard_paths[p]}: trajectory {s['index']} is stored with class {s['meta'].get('label')} "
                    f"but its seed gives class {regenerated.get('label')} with {teacher_path}: "
                    + (remake or {}).get(str(shard_paths[p]), "rerun its trajectory_shard job"))
            err = np.abs(states.astype(np.float32) - s["states"].astype(np.float32))
            scale = np.abs(s["states"].astype(np.float32)) + 1.0
            if not np.allclose(grid, s[generator.grid_name]) or float((err / scale).max()) > 1e-2:
                raise ValueError(
                    f"{shard_paths[p]}: trajectory {s['index']} differs from the one its seed gives with "
                    f"{teacher_path} (max relative error {float((err / scale).max()):.3g}); the shard is "
                    "not this teacher's and solver's: "
                    + (remake or {}).get(str(shard_paths[p]), "rerun its trajectory_shard job"))
    return count


class OnlineTrajectories:
    """The official design's data: the teacher solves each step's trajectories inside the step, and
    nothing is stored. Step s of a run with T trajectories per step uses trajectory indices
    s T ... (s + 1) T - 1 of the spec (this rank: its contiguous share), so the start points are
    folded from (spec seed, step, rank) through the index: a resumed or re-split run solves the same
    trajectories, and they are the ones an offline pool of the same spec stores under those indices
    (the offline route reads them in its shuffle order, this one in index order, each once).
    The states stay float32 on the device: the store dtype is the offline route's storage, not the
    method's."""

    def __init__(self, generator, traj_per_step, rank=0, world=1):
        if traj_per_step % world:
            raise ValueError(f"{traj_per_step} trajectories per step cannot be split over {world} processes")
        self.generator, self.per_step = generator, traj_per_step
        self.local = traj_per_step // world
        self.first = rank * self.local

    def indices(self, step):
        lo = step * self.per_step + self.first
        return list(range(lo, lo + self.local))

    def batch(self, step, part=0, count=None):
        """(states [n, K+1, C, H, W] float32, sigmas [K+1] float32 on the device, metas) of `step`:
        this rank's share, or part `part` of `count` trajectories of the step's global batch, as
        loop.fit numbers the parts (part = rank x micro-batches + micro: global, not this rank's)."""
        if count is None:
            indices = self.indices(step)
        else:
            lo = step * self.per_step + part * count
            indices = list(range(lo, lo + count))
            if indices[-1] >= (step + 1) * self.per_step:
                raise ValueError(f"part {part} of {count} trajectories is beyond the step's {self.per_step}")
        states, metas = self.generator.states(indices)
        sigmas = self.generator.sigmas.to(device=states.device, dtype=torch.float32)
        return states.to(torch.float32), sigmas, metas
