"""Objectives of the average-velocity model u(z, r, t): CMT-MF mid-training (docs/method.md#meanflow)
and MeanFlow post-training (docs/method.md#meanflow). Flow-matching time: z_t = (1 - t) x + t eps, t = 1 noise.

Each loss returns per-sample values [B]; the training loop takes the mean. Class-conditional
models take `labels` [B] int64; unconditional rows pass none, and their losses draw nothing for
labels (no dropout draw, no guidance).
"""

import contextlib
import dataclasses
import functools
import math

import torch

from stages.method import flowmap, losses

# ----------------------------------------------------------------------------------------------
# CMT-MF: for states i > j of a teacher trajectory (t_i > t_j), regress u(z_i, t_j, t_i) onto the
# average velocity (z_i - z_j) / (t_i - t_j) between them. No JVP, no stop-gradient.


def all_pairs(num_points):
    """(a, b) index pairs with a < b, i.e. t[a] > t[b] on a trajectory stored noise first."""
    a, b = torch.triu_indices(num_points, num_points, offset=1)
    return a, b


def cmt_mf_pairs(z, t, pairs_per_trajectory, generator):
    """z [T, K, C, H, W] (noise first), t [K] (decreasing) -> (inputs, r, t_in, targets), with
    `pairs_per_trajectory` pairs drawn uniformly (with replacement) from the K(K-1)/2 per trajectory."""
    T, K = z.shape[:2]
    if not bool((t[:-1] > t[1:]).all()):
        raise ValueError("cmt_mf_pairs: trajectory times must decrease strictly (noise first)")
    a, b = all_pairs(K)
    pick = torch.randint(len(a), (T, pairs_per_trajectory), generator=generator)
    ia, ib = a[pick].to(z.device), b[pick].to(z.device)  # [T, P]
    rows = torch.arange(T, device=z.device)[:, None].expand_as(ia)
    z_i, z_j = z[rows, ia], z[rows, ib]  # [T, P, C, H, W]
    t_i, t_j = t[ia], t[ib]
    target = (z_i - z_j) / (t_i - t_j).reshape(*t_i.shape, 1, 1, 1)
    flat = lambda v: v.reshape(T * pairs_per_trajectory, *v.shape[2:])  # noqa: E731
    return flat(z_i), flat(t_j), flat(t_i), flat(target)


def cmt_mf_loss(u, z, t, pairs_per_trajectory, generator, distance=losses.squared_l2_distance, labels=None):
    """`labels` [T]: each trajectory's class (the teacher's, null where it ran unconditionally),
    given to the student with every pair drawn from that trajectory."""
    inputs, r, t_in, target = cmt_mf_pairs(z, t, pairs_per_trajectory, generator)
    if labels is not None:
        labels = labels.to(z.device).repeat_interleave(pairs_per_trajectory)
    return distance(flowmap.call_u(u, inputs, r, t_in, labels), target)


# ----------------------------------------------------------------------------------------------
# MeanFlow (Geng et al. 2025): u_tgt = v - (t - r) du/dt, du/dt = v d_z u + d_t u from one JVP
# along the tangent (v, 0, 1); adaptive weight w = 1 / (||u - sg(u_tgt)||^2 + c)^p, detached.


def logit_normal(n, generator, mean, std):
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, dtype=torch.float64))


T_DISTRIBUTIONS = ("logit_normal", "uniform")
R_ABOVE_T = ("swap", "clip")
ROW_LAYOUTS = ("independent", "leading")
# the velocity MeanFlow regresses on: eps - x of the data (MeanFlow), or a teacher's (MeanFlow distillation)
TARGETS = ("data", "teacher")


def shift_time(t, shift):
    """t' = s t / (1 + (s - 1) t): the resolution shift of SD3 / the authors' MF-RAE code (s > 1 moves
    the draws towards noise; s = 1 leaves them as they are)."""
    return t if shift == 1 else shift * t / (1 + (shift - 1) * t)


def sample_r_t(n, generator, *, P_mean=-0.4, P_std=1.0, ratio_r_neq_t=0.25, distribution="logit_normal",
               shift=1.0, P_mean_r=None, P_std_r=None, r_above_t="swap", r_equals_t_rows="independent"):
    """(r, t), float64 [n] each, from two draws a (t's) and b (r's): logit-normal(P_mean, P_std) and
    logit-normal(P_mean_r, P_std_r) (MeanFlow; the r parameters default to t's), or uniform on
    [0, 1) (`distribution` uniform: the MF-RAE configs), each then shifted by `shift` (shift_time;
    MF-RAE: sqrt(latent dimension / 4096)). `r_above_t`: swap (the MeanFlow paper, py-meanflow's v0
    sampler: t = max(a, b), r = min(a, b)) or clip (py-meanflow's v1 recipe: t = a, r = min(a, b),
    so t keeps its own distribution). r is then set to t except on a `ratio_r_neq_t` share:
    `r_equals_t_rows` independent picks each sample with that probability; leading gives r = t to
    the first floor(n (1 - ratio_r_neq_t)) rows, as the MeanFlow JAX code does per device batch
    (drop_labels' leading rows then have r = t)."""
    if distribution not in T_DISTRIBUTIONS:
        raise ValueError(f"sample_r_t: distribution {distribution!r}; known: {list(T_DISTRIBUTIONS)}")
    if r_above_t not in R_ABOVE_T:
        raise ValueError(f"sample_r_t: r_above_t {r_above_t!r}; known: {list(R_ABOVE_T)}")
    if r_equals_t_rows not in ROW_LAYOUTS:
        raise ValueError(f"sample_r_t: r_equals_t_rows {r_equals_t_rows!r}; known: {list(ROW_LAYOUTS)}")
    if distribution == "logit_normal":
        a = logit_normal(n, generator, P_mean, P_std)
        b = logit_normal(n, generator, P_mean if P_mean_r is None else P_mean_r, P_std if P_std_r is None else P_std_r)
    else:
        a = torch.rand(n, generator=generator, dtype=torch.float64)
        b = torch.rand(n, generator=generator, dtype=torch.float64)
    a, b = shift_time(a, shift), shift_time(b, shift)
    t, r = (torch.maximum(a, b), torch.minimum(a, b)) if r_above_t == "swap" else (a, torch.minimum(a, b))
    if r_equals_t_rows == "leading":
        keep = torch.arange(n) >= math.floor(n * (1 - ratio_r_neq_t) + 1e-9)
    else:
        keep = torch.rand(n, generator=generator, dtype=torch.float64) < ratio_r_neq_t
    return torch.where(keep, r, t), t


def linear_path(x, eps, t):
    """z_t = (1 - t) x + t eps and its velocity v = eps - x."""
    tt = t.reshape(-1, *([1] * (x.ndim - 1)))
    return (1 - tt) * x + tt * eps, eps - x


ADAPTIVE_FORMS = ("meanflow", "mf_rae")


def adaptive_weighted(delta, p=1.0, c=1e-3, form="meanflow", terms=None):
    """w L with w = 1 / (L + c)^p detached, on L = ||delta||^2 (form meanflow: the MeanFlow paper's,
    ~||delta||^(2 - 2p) in scale) or on L = ||delta||^4 (form mf_rae: the authors' MF-RAE code squares
    the summed squared error before weighting it, so c sets the scale of ||delta||^4). `terms`
    (losses.note): the raw squared error ||delta||^2 and the adaptive weight w."""
    if form not in ADAPTIVE_FORMS:
        raise ValueError(f"adaptive weighting form {form!r}; known: {list(ADAPTIVE_FORMS)}")
    sq = delta.flatten(1).square().sum(1)
    raw = sq
    if form == "mf_rae":
        sq = sq.square()
    if terms is not None:
        losses.note(terms, error=raw, adaptive_weight=1 / (sq.detach() + c) ** p)
    return sq / (sq.detach() + c) ** p


def mean_velocity_derivative(u, z, r, t, v, labels=None):
    """(u(z, r, t), du/dt) with du/dt = v d_z u + 0 d_r u + 1 d_t u, by one forward-mode JVP."""
    if labels is not None:
        u = functools.partial(u, labels=labels)
    return torch.func.jvp(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))


def meanflow_loss_at(u, z, r, t, v, *, p=1.0, c=1e-3, jvp_u=None, labels=None, form="meanflow", terms=None):
    """The MeanFlow loss at given (z, r, t, v); with guidance, v is the guided field (cfg_velocity),
    which then is both the JVP's tangent and the target's velocity: the model learns the average
    velocity of the guided flow, whose states move with dz/dt = v_tilde.

    With `jvp_u` (the pipeline's route): torch.func.jvp cannot pass through a DistributedDataParallel
    wrapper, so the JVP runs without a graph on `jvp_u` (the bare module), then `u` (the wrapper, or
    the module itself) runs a plain forward with the same dropout mask (the RNG state is restored
    between the two), and DDP all-reduces the gradient of that forward as usual. Its memory is that
    of a flow-matching step. Without `jvp_u`: one JVP with a graph on `u`, the gradient through its
    primal output; the same gradient, but it keeps the tangent's activations (3x the memory of a
    flow-matching step, bench/RESULTS.md). The target is stop-gradient either way.
    """
    if jvp_u is None:
        out, dudt = mean_velocity_derivative(u, z, r, t, v, labels)
    else:
        devices = [z.device] if z.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            with torch.no_grad():
                _, dudt = mean_velocity_derivative(jvp_u, z, r, t, v, labels)
        out = flowmap.call_u(u, z, r, t, labels)
    target = (v - (t - r).reshape(-1, 1, 1, 1) * dudt).detach()
    return adaptive_weighted(out - target, p, c, form, terms)


def flow_matching_loss_at(u, z, t, v, *, p=1.0, c=1e-3, labels=None):
    """Plain flow matching on the instantaneous velocity u(z, t, t) = v, same weighting."""
    return adaptive_weighted(flowmap.call_u(u, z, t, t, labels) - v, p, c)


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance in the target (MeanFlow, Geng et al. 2025, sec. 4.2 and its appendix on
# improved CFG; the official JAX code `guidance_fn`, `cond_drop`). The network learns the guided
# field itself, so one step samples with guidance at no extra cost:
#
#     v_tilde = omega v + kappa u(z_t, t, t | c) + (1 - omega - kappa) u(z_t, t, t | null)
#
# for t_min <= t <= t_max, and v_tilde = v outside (omega -> 1, kappa -> 0). Both u's are the
# current network's instantaneous velocities, without gradient. The guided field is the CFG field
# at the effective scale omega / (1 - kappa); kappa = 0 is plain CFG, omega v + (1 - omega) u_uncond.
# Label dropout: a fraction of the labels becomes the null class, and those rows keep v (they learn
# the unconditional field the guidance evaluates).


@dataclasses.dataclass(frozen=True)
class Guidance:
    omega: float
    kappa: float = 0.0
    t_min: float = 0.0
    t_max: float = 1.0

    def __post_init__(self):
        if not 0 <= self.kappa < 1:
            raise ValueError(f"guidance kappa must be in [0, 1), got {self.kappa}")
        if not self.omega > 0:
            raise ValueError(f"guidance omega must be > 0, got {self.omega}")
        if not 0 <= self.t_min <= self.t_max <= 1:
            raise ValueError(f"guidance interval needs 0 <= t_min <= t_max <= 1, got [{self.t_min}, {self.t_max}]")

    @property
    def effective_scale(self):
        return self.omega / (1 - self.kappa)


def drop_labels(labels, null_class, p, generator, rows="independent"):
    """(labels with a share p replaced by `null_class`, the boolean mask of those). `rows`:
    independent drops each label with probability p; leading drops as many (each of the n draws
    below p counts one) but the first ones of the batch, as the MeanFlow JAX code does per device
    batch, where those rows are the ones with r = t (sample_r_t's r_equals_t_rows leading)."""
    if not 0 <= p < 1:
        raise ValueError(f"label dropout must be in [0, 1), got {p}")
    if rows not in ROW_LAYOUTS:
        raise ValueError(f"drop_labels: rows {rows!r}; known: {list(ROW_LAYOUTS)}")
    if labels.dtype != torch.int64 or labels.ndim != 1:
        raise ValueError(f"labels must be an int64 vector, got {labels.dtype} of shape {tuple(labels.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > null_class):
        raise ValueError(f"labels must lie in 0..{null_class} ({null_class} = null class), "
                         f"got {int(labels.min())}..{int(labels.max())}")
    dropped = torch.rand(len(labels), generator=generator, dtype=torch.float64) < p
    if rows == "leading":
        dropped = torch.arange(len(labels)) < int(dropped.sum())
    dropped = dropped.to(labels.device)
    return torch.where(dropped, torch.full_like(labels, null_class), labels), dropped


def guided_velocity(v, u_cond, u_uncond, omega, kappa):
    """omega v + kappa u_cond + (1 - omega - kappa) u_uncond (u_cond unused when kappa = 0)."""
    if kappa == 0:
        return omega * v + (1 - omega) * u_uncond
    return omega * v + kappa * u_cond + (1 - omega - kappa) * u_uncond


@contextlib.contextmanager
def _eval_mode(module):
    # the official code evaluates the guidance with train=False; restore every submodule's own flag
    flags = [(m, m.training) for m in module.modules()] if isinstance(module, torch.nn.Module) else []
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def cfg_velocity(u, z, t, v, labels, dropped, null_class, guidance):
    """v_tilde per sample: guided where guidance.t_min <= t <= t_max and the label was kept, else v.
    `u` is evaluated (no gradient, eval mode) only on those rows: at r = t, conditional and
    unconditional in one batch when kappa > 0."""
    inside = (t >= guidance.t_min) & (t <= guidance.t_max) & ~dropped
    if not bool(inside.any()):
        return v
    zi, ti, yi = z[inside], t[inside], labels[inside]
    null = torch.full_like(yi, null_class)
    with torch.no_grad(), _eval_mode(u):
        if guidance.kappa == 0:
            u_cond, u_uncond = None, u(zi, ti, ti, null)
        else:
            both = u(torch.cat([zi, zi]), torch.cat([ti, ti]), torch.cat([ti, ti]), torch.cat([yi, null]))
            u_cond, u_uncond = both.chunk(2)
    guided = v.clone()
    guided[inside] = guided_velocity(v[inside], u_cond, u_uncond, guidance.omega, guidance.kappa)
    return guided


def meanflow_loss(u, x, generator, *, P_mean=-0.4, P_std=1.0, ratio_r_neq_t=0.25, p=1.0, c=1e-3,
                  jvp_u=None, labels=None, null_class=None, label_dropout=0.0, guidance=None,
                  t_distribution="logit_normal", t_shift=1.0, form="meanflow", P_mean_r=None, P_std_r=None,
                  r_above_t="swap", label_dropout_rows="independent", teacher=None, terms=None):
    """MeanFlow from data x (one micro-batch). With `labels` [B] (a class-conditional model): label
    dropout to `null_class` at rate `label_dropout`, then, with `guidance` (a Guidance), CFG in the
    target. The guidance runs on `jvp_u` where given (the bare module), else on `u`.
    `t_distribution`, `t_shift`, `P_mean_r`, `P_std_r`, `r_above_t` (sample_r_t) and `form`
    (adaptive_weighted) select the MF-RAE code's and py-meanflow's variants; `label_dropout_rows`
    leading puts the dropped labels on the leading rows, which have r = t (drop_labels). `terms`:
    adaptive_weighted's.

    `teacher` (MeanFlow distillation, MF-RAE's `training_losses_mfd`): a velocity field
    teacher(z, t, labels) (stages/method/teacher_velocity.py) replaces eps - x at the same z_t, as the
    JVP's tangent and in the target, with the labels the student gets (the null class where dropped);
    guidance then mixes the teacher's velocity with the student's own as it mixes eps - x. It draws
    nothing from `generator`: the data route's draws are the same with or without it."""
    r, t = sample_r_t(x.shape[0], generator, P_mean=P_mean, P_std=P_std, ratio_r_neq_t=ratio_r_neq_t,
                      distribution=t_distribution, shift=t_shift, P_mean_r=P_mean_r, P_std_r=P_std_r,
                      r_above_t=r_above_t, r_equals_t_rows=label_dropout_rows)
    r, t = r.to(x.dtype).to(x.device), t.to(x.dtype).to(x.device)
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.dtype).to(x.device)
    z, v = linear_path(x, eps, t)
    if labels is None:
        if guidance is not None or label_dropout:
            raise ValueError("meanflow_loss: guidance and label dropout need class labels (labels=None given)")
        if teacher is not None:
            v = teacher(z, t)
        return meanflow_loss_at(u, z, r, t, v, p=p, c=c, jvp_u=jvp_u, form=form, terms=terms)
    if null_class is None:
        raise ValueError("meanflow_loss: class labels need the model's null_class")
    labels = labels.to(x.device)
    labels_in, dropped = drop_labels(labels, null_class, label_dropout, generator, rows=label_dropout_rows)
    if teacher is not None:
        v = teacher(z, t, labels_in)
    if guidance is not None:
        v = cfg_velocity(jvp_u if jvp_u is not None else u, z, t, v, labels, dropped, null_class, guidance)
    return meanflow_loss_at(u, z, r, t, v, p=p, c=c, jvp_u=jvp_u, labels=labels_in, form=form, terms=terms)


# ----------------------------------------------------------------------------------------------
# One config section -> the MeanFlow objective of a training stage (the MeanFlow teacher, MeanFlow
# post-training): the (r, t) sampler, the adaptive weight, and for a class-conditional network the
# label dropout and the guidance in the target.


@dataclasses.dataclass(frozen=True)
class Objective:
    P_mean: float = -0.4
    P_std: float = 1.0
    ratio_r_neq_t: float = 0.25
    p: float = 1.0
    c: float = 1e-3
    label_dropout: float = 0.0
    guidance: Guidance | None = None
    null_class: int | None = None
    jvp_u: torch.nn.Module | None = None
    t_distribution: str = "logit_normal"
    t_shift: float = 1.0
    form: str = "meanflow"
    P_mean_r: float | None = None
    P_std_r: float | None = None
    r_above_t: str = "swap"
    label_dropout_rows: str = "independent"
    teacher: object = None

    @classmethod
    def from_config(cls, section, net, what, teacher=None):
        """`section`: P_mean, P_std, ratio_r_neq_t, adaptive_p, adaptive_c, the optional variants
        (t_distribution, t_shift, adaptive_form, P_mean_r, P_std_r, r_above_t) and, for a
        class-conditional `net` (the bare module: the JVP and the guidance run on it), label_dropout,
        label_dropout_rows and guidance {omega, kappa, t_min, t_max}. An unconditional net refuses
        label dropout and guidance. `target` teacher (MeanFlow distillation) needs `teacher`, the
        teacher's velocity field (stages/method/teacher_velocity.py); unset, or data, takes none."""
        target = section.get("target", "data")
        if target not in TARGETS:
            raise ValueError(f"{what}.target {target!r}; known: {list(TARGETS)}")
        if (target == "teacher") != (teacher is not None):
            raise ValueError(f"{what}.target {target}: " + ("MeanFlow distillation needs the teacher's velocity "
                                                            "(pass the teacher model)" if teacher is None else
                                                            "MeanFlow from data takes no teacher"))
        num_classes = int(getattr(net, "num_classes", 0) or 0)
        dropout, guidance = float(section.get("label_dropout") or 0.0), section.get("guidance")
        if not num_classes and (dropout or guidance):
            raise ValueError(f"{what}: label_dropout and guidance need a class-conditional network "
                             "(network.num_classes > 0); this one is unconditional")
        if guidance and not dropout:
            raise ValueError(f"{what}.guidance needs label_dropout > 0: the unconditional field it mixes in "
                             "is learnt only from the dropped labels")
        return cls(P_mean=section["P_mean"], P_std=section["P_std"], ratio_r_neq_t=section["ratio_r_neq_t"],
                   p=section["adaptive_p"], c=section["adaptive_c"], label_dropout=dropout,
                   guidance=Guidance(**guidance) if guidance else None,
                   null_class=getattr(net, "null_class", None) if num_classes else None, jvp_u=net,
                   t_distribution=section.get("t_distribution", "logit_normal"),
                   t_shift=float(section.get("t_shift", 1.0)), form=section.get("adaptive_form", "meanflow"),
                   P_mean_r=section.get("P_mean_r"), P_std_r=section.get("P_std_r"),
                   r_above_t=section.get("r_above_t", "swap"),
                   label_dropout_rows=section.get("label_dropout_rows", "independent"), teacher=teacher)

    def describe(self):
        r_params = (self.P_mean if self.P_mean_r is None else self.P_mean_r,
                    self.P_std if self.P_std_r is None else self.P_std_r)
        times = (f"logit-normal({self.P_mean}, {self.P_std})" if self.t_distribution == "logit_normal"
                 else "uniform") + (f" shifted by {self.t_shift:g}" if self.t_shift != 1 else "")
        if self.t_distribution == "logit_normal" and r_params != (self.P_mean, self.P_std):
            times += f", r's logit-normal{r_params}"
        if self.r_above_t != "swap":
            times += f", r above t {self.r_above_t}"
        out = f"r!=t ratio {self.ratio_r_neq_t} {times} p={self.p} c={self.c}"
        if self.teacher is not None:
            out += ", distilled: the teacher's velocity in place of eps - x"
        if self.form != "meanflow":
            out += f" (adaptive weight on ||delta||^4, form {self.form})"
        if self.null_class is not None:
            out += f", label dropout {self.label_dropout}"
            if self.label_dropout_rows != "independent":
                out += f" on the {self.label_dropout_rows} rows (r = t there)"
        if self.guidance is not None:
            g = self.guidance
            out += (f", guidance in the target omega {g.omega} kappa {g.kappa} on t in [{g.t_min}, {g.t_max}] "
                    f"(effective scale {g.effective_scale:.3g})")
        return out

    def loss(self, u, x, generator, labels=None, terms=None):
        """Per-sample MeanFlow loss of data x (labels [B] int64 for a class-conditional network);
        `terms`: adaptive_weighted's."""
        if self.null_class is None:
            labels = None
        elif labels is None:
            raise ValueError("this network is class-conditional: the MeanFlow loss needs the data's labels")
        return meanflow_loss(u, x, generator, P_mean=self.P_mean, P_std=self.P_std,
                             ratio_r_neq_t=self.ratio_r_neq_t, p=self.p, c=self.c, jvp_u=self.jvp_u,
                             labels=labels, null_class=self.null_class, label_dropout=self.label_dropout,
                             guidance=self.guidance, t_distribution=self.t_distribution, t_shift=self.t_shift,
                             form=self.form, P_mean_r=self.P_mean_r, P_std_r=self.P_std_r, r_above_t=self.r_above_t,
                             label_dropout_rows=self.label_dropout_rows, teacher=self.teacher, terms=terms)
