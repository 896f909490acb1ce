"""Training objectives: EDM denoising (teacher), CMT-CM (mid-training), ECT and ECD (post-training).

Each loss returns per-sample values [B]; the training loop takes the mean. Distances are
per-sample too, over all pixels of a sample. Given a dict `terms`, a loss also puts the parts it is
made of there (per-sample, detached: a distance, a weight), which the metrics log averages
(stages/training/metrics.py); without one it computes nothing more.
"""

import contextlib

import torch

from stages.networks.precond import Precond


def note(terms, **values):
    """Put the per-sample `values` (detached) into `terms`, where the caller passed a dict."""
    if terms is not None:
        terms.update({name: value.detach() for name, value in values.items()})


# ----------------------------------------------------------------------------------------------
# Distances d(a, b) -> [B]


def l2_distance(a, b):
    """Euclidean norm of the difference (the official CMT code calls this 'MAE')."""
    return (a - b).flatten(1).square().sum(1).sqrt()


def squared_l2_distance(a, b):
    """Sum of squared differences (the official CMT code's 'MSE': a sum, not a mean)."""
    return (a - b).flatten(1).square().sum(1)


def pseudo_huber_distance(a, b, c):
    return ((a - b).flatten(1).square().sum(1) + c**2).sqrt() - c


class LPIPSDistance(torch.nn.Module):
    """LPIPS (VGG trunk + learned v0.1 heads, lpips package) at native resolution on [-1, 1].

    `trunk_weights` is a local file of torchvision's VGG16 weights (the assets folder); None keeps a
    random trunk, which only tests should do.
    """

    def __init__(self, trunk_weights=None):
        super().__init__()
        import lpips

        self.net = lpips.LPIPS(net="vgg", lpips=True, pretrained=True, pnet_rand=True, verbose=False)
        if trunk_weights is not None:
            from torchvision.models import vgg16

            vgg = vgg16()
            vgg.load_state_dict(torch.load(trunk_weights, map_location="cpu", weights_only=True))
            features = vgg.features
            trunk = self.net.net
            for slice_ in (trunk.slice1, trunk.slice2, trunk.slice3, trunk.slice4, trunk.slice5):
                for name, layer in slice_.named_children():
                    layer.load_state_dict(features[int(name)].state_dict())
        self.net.eval().requires_grad_(False)

    def train(self, mode=True):  # always eval: LPIPS has dropout layers that must stay off
        return super().train(False)

    def forward(self, a, b):
        if a.shape[1] == 1:  # grey images: VGG expects RGB
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        if min(a.shape[-2:]) < 16:
            raise ValueError(f"LPIPS needs images of at least 16x16, got {tuple(a.shape[-2:])}; "
                             "use distance l2 or pseudo_huber for this dataset")
        return self.net(a, b, normalize=False).flatten()


def make_distance(name, *, pseudo_huber_c=None, lpips_weights=None, latent_vgg=None, elatentlpips_augment="sony_cmt"):
    """The mid-training distance `name`. elatentlpips: E-LatentLPIPS on latents with the latent VGG16
    at `latent_vgg` (train_latent_vgg's model.safetensors, its architecture in model.json beside it),
    its augmentation in the version `elatentlpips_augment` (ada_augment.SOURCES)."""
    if name == "l2":
        return l2_distance
    if name == "squared_l2":
        return squared_l2_distance
    if name == "pseudo_huber":
        # Default c = 0.00054 sqrt(d), the choice of improved consistency training (Song & Dhariwal 2023).
        return lambda a, b: pseudo_huber_distance(
            a, b, pseudo_huber_c if pseudo_huber_c is not None else 0.00054 * a[0].numel() ** 0.5)
    if name == "lpips":
        return LPIPSDistance(lpips_weights)
    if name == "elatentlpips":
        import json
        from pathlib import Path

        from stages.method.elatentlpips import ELatentLPIPS

        if latent_vgg is None:
            raise ValueError("midtrain.distance elatentlpips needs the latent VGG16 "
                             "(the train_latent_vgg rule's model)")
        meta = Path(latent_vgg).with_suffix(".json")
        if not meta.exists():
            raise FileNotFoundError(f"{meta}: the latent VGG16's description is missing beside {latent_vgg}; "
                                    "rerun train_latent_vgg")
        return ELatentLPIPS.from_file(latent_vgg, json.loads(meta.read_text())["architecture"],
                                      source=elatentlpips_augment)
    raise ValueError(f"unknown distance {name!r}")


# ----------------------------------------------------------------------------------------------
# EDM teacher training (Karras et al. 2022): sigma ~ logN(P_mean, P_std),
# weight (sigma^2 + sd^2) / (sigma sd)^2 on the squared error of the denoiser.


def edm_loss(denoiser, y, generator, sigma_data, P_mean=-1.2, P_std=1.2, labels=None, terms=None):
    """`terms`: the unweighted squared error (`error`) and the weight."""
    sd = sigma_data
    n = torch.randn(y.shape[0], generator=generator, dtype=torch.float32).to(y.device)
    sigma = (P_mean + P_std * n).exp()
    noise = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(y.device)
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    d = call(denoiser, y + sigma.view(-1, 1, 1, 1) * noise, sigma, labels)
    error = (d - y).flatten(1).square().mean(1)
    note(terms, error=error, weight=weight)
    return weight * error


# ----------------------------------------------------------------------------------------------
# CMT-CM (docs/method.md#cmt-cm): every pre-final trajectory state, at its sigma, regresses onto the
# trajectory's final state. Uniform over time points, no stop-gradient, no weighting.


def cmt_cm_inputs(states, sigmas):
    """states [T, K+1, C, H, W], sigmas [K+1] -> (inputs [T*K, ...], input sigmas [T*K], targets)."""
    T, K1 = states.shape[:2]
    K = K1 - 1
    inputs = states[:, :K].reshape(T * K, *states.shape[2:])
    input_sigmas = sigmas[:K].repeat(T)
    targets = states[:, K:].expand(T, K, *states.shape[2:]).reshape(T * K, *states.shape[2:])
    return inputs, input_sigmas, targets


def cmt_cm_loss(student, states, sigmas, distance, labels=None, terms=None):
    """`labels`: one-hot [T, label_dim], one class per trajectory (a conditional student), tiled
    over the trajectory's K points as cmt_cm_inputs orders them (trajectory-major). `terms`: the
    distance to the trajectory's end at the first (noisiest) point and at the last pre-final one."""
    inputs, input_sigmas, targets = cmt_cm_inputs(states, sigmas)
    if labels is not None:
        labels = labels.repeat_interleave(states.shape[1] - 1, dim=0)
    d = distance(call(student, inputs, input_sigmas, labels), targets)
    if terms is not None:
        per_point = d.view(states.shape[0], -1)
        note(terms, distance_first=per_point[:, 0], distance_last=per_point[:, -1])
    return d


# ----------------------------------------------------------------------------------------------
# ECT (Geng et al. 2024; docs/method.md#ect).


def prediction_then_target(student, x_t, t, x_r, r, labels=None, target_context=None):
    """(f(x_t, t) with gradient, f(x_r, r) under no_grad) in the official ECT/ECD order: the
    prediction first, then the target with the same dropout mask (the RNG state the prediction
    started from is replayed for the target and the state after the prediction restored, so the
    caller's stream advances by one pass).

    The order matters for EDM2 students: in training mode their forced weight normalisation
    rescales the stored weights in place at the start of a pass. The prediction's pass does that,
    and the target pass then runs inside `target_context` (a factory of a context manager, e.g.
    networks.target_context(net): forced normalisation off), on the weights the prediction left, so
    both passes see the same weights, as in the official losses (sony/cmt ImageNet-512 `ECMLoss`,
    `ECDGuidLoss`). A target pass first would see the weights before normalisation, which differ
    wherever the stored weights are not yet unit-norm (a step from imported or EMA weights).
    For networks without forced normalisation the two orders give the same numbers."""
    devices = [x_t.device] if x_t.device.type == "cuda" else []
    before = _rng_states(devices)
    pred = call(student, x_t, t, labels)
    with torch.random.fork_rng(devices=devices):
        _set_rng_states(before, devices)
        with torch.no_grad(), (target_context or contextlib.nullcontext)():
            target = call(student, x_r, r, labels)
    return pred, target


def _rng_states(devices):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_states(states, devices):
    cpu, cuda = states
    torch.set_rng_state(cpu)
    for d, state in zip(devices, cuda, strict=True):
        torch.cuda.set_rng_state(state, d)


def ect_r(t, stage, q, k=8.0, b=1.0):
    """r(t) = max(0, t - t (1 + k sigmoid(-b t)) / q^(stage+1)): the 'sigmoid' mapping."""
    dt = t * (1 + k * torch.sigmoid(-b * t)) / q ** (stage + 1)
    return (t - dt).clamp(min=0)


def ect_stage(step, double_every):
    """The q-doubling stage of 0-based iteration `step`, or 0 when doubling is off.

    As the official loops (locuslab/ect, sony/cmt ct_training_loop) count it: their first tick is
    one iteration long, each later tick `double_every / double_ticks` iterations, and after tick
    k they set the stage to k // double_ticks; so iteration s >= 1 runs at (s - 1) // double_every,
    and the first doubled iteration is s = double_every + 1, not double_every
    (docs/method.md#ect)."""
    return 0 if not double_every else max(step - 1, 0) // double_every


def ect_loss(student, y, generator, *, stage, q, k=8.0, b=1.0, P_mean=-1.1, P_std=2.0, c=0.0,
             sigma_min=0.002, labels=None, target_context=None, terms=None):
    """||f(x_t, t) - sg f(x_r, r)|| / (t - r) with shared noise; the target is the same network
    under no_grad with the same dropout mask (prediction_then_target), and y where r = 0.
    c > 0 turns the numerator into the pseudo-Huber distance. `target_context`: as in
    prediction_then_target (EDM2 students). `terms`: the distance and the weight 1 / (t - r).
    """
    n = torch.randn(y.shape[0], generator=generator, dtype=torch.float32).to(y.device)
    t = (P_mean + P_std * n).exp()
    r = ect_r(t, stage, q, k, b)
    eps = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(y.device)
    x_t = y + t.view(-1, 1, 1, 1) * eps
    # r = 0 would put c_noise = ln(0) into the network; those rows use y and never see this value.
    r_eval = torch.where(r > 0, r, torch.full_like(r, sigma_min))
    x_r = y + r_eval.view(-1, 1, 1, 1) * eps

    pred, target = prediction_then_target(student, x_t, t, x_r, r_eval, labels, target_context)
    target = torch.where((r > 0).view(-1, 1, 1, 1), target, y)
    dist = pseudo_huber_distance(pred, target, c) if c > 0 else l2_distance(pred, target)
    if terms is not None:
        note(terms, distance=dist, weight=1 / (t - r))
    return dist / (t - r)


# ----------------------------------------------------------------------------------------------
# ECD (easy consistency distillation) and the ECT of the ImageNet-512 code (docs/method.md, ECD):
# the target point x_r comes from one Heun step of the (autoguided) teacher from t to r instead of
# the shared noise, the distance is pseudo-Huber with c = 0.06 weighted by the "snrpk" weight
# 1/t^2 + 1/sigma_data^2 = (t^2 + sd^2) / (t sd)^2, and there is no 1 / (t - r).


GUIDE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def guide_execution_dtype(guide, guide_dtype="float16"):
    """The dtype the guide's raw network runs in: `guide_dtype` (posttrain.guidance.guide_dtype) for
    a preconditioned network on CUDA, float32 elsewhere. The official ImageNet-512 loop runs the
    guide as its pickle's own module, which EDM2 records with use_fp16, and EDM2's Precond runs
    that in float16 on CUDA only (coefficients and output in float32); the teacher it builds from
    its own network options, in float32."""
    if guide_dtype not in GUIDE_DTYPES:
        raise ValueError(f"posttrain.guidance.guide_dtype {guide_dtype!r}: use one of {sorted(GUIDE_DTYPES)}")
    on_cuda = isinstance(guide, Precond) and any(p.is_cuda for p in guide.parameters())
    return GUIDE_DTYPES[guide_dtype] if on_cuda else torch.float32


def guided_denoiser(teacher, guide=None, weight=1.0, guide_dtype="float16"):
    """D_g(x; s) = g + w (D_ref - g) with g the guide (autoguidance: a smaller, less trained model
    of the same task; w = 2.05 for the paper's ImageNet-512 ECD), run in guide_execution_dtype.
    w = 1 or no guide: D_ref alone."""
    if guide is None or weight == 1.0:
        if guide is not None:
            raise ValueError("guided_denoiser: a guide network with weight 1 would be evaluated for nothing")
        return lambda x, sigma, labels=None: call(teacher, x, sigma, labels)
    dtype = guide_execution_dtype(guide, guide_dtype)

    def denoise(x, sigma, labels=None):
        g = call(guide, x, sigma, labels) if dtype == torch.float32 else guide(x, sigma, labels, dtype=dtype)
        return g + weight * (call(teacher, x, sigma, labels) - g)

    return denoise


def guide_precision_check(guide, x, sigma, labels=None, guide_dtype="float16"):
    """For a GPU check of the guide as guided_denoiser runs it: the dtype its raw network receives,
    and the largest difference of its output from the float32 one relative to that output's RMS.
    On a CPU: float32 and 0."""
    seen = []
    hook = guide.network.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    try:
        with torch.no_grad():
            out = guide(x, sigma, labels, dtype=guide_execution_dtype(guide, guide_dtype))
            ref = guide(x, sigma, labels)
    finally:
        hook.remove()
    return {"dtype": str(seen[0]).removeprefix("torch."),
            "max_rel_diff": ((out - ref).abs().max() / ref.square().mean().sqrt()).item()}


def call(net, x, sigma, labels=None):
    """net(x, sigma), or net(x, sigma, labels) for a class-conditional network (one-hot labels)."""
    return net(x, sigma) if labels is None else net(x, sigma, labels)


def heun_step(denoise, x_t, t, r, labels=None):
    """One Heun step of the PF-ODE dx/ds = (x - D(x; s)) / s from t to r > 0 (per-sample [B] times):
    d = (x_t - D(x_t; t)) / t, x' = x_t + (r - t) d, d' = (x' - D(x'; r)) / r,
    x_r = x_t + (r - t) (d + d') / 2: two evaluations of the denoiser."""
    if not bool((r > 0).all()):
        raise ValueError("heun_step: r must be > 0 (the second slope divides by r)")
    tt, rr = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    d = (x_t - denoise(x_t, t, labels)) / tt
    x_euler = x_t + (rr - tt) * d
    d2 = (x_euler - denoise(x_euler, r, labels)) / rr
    return x_t + (rr - tt) * 0.5 * (d + d2)


def snr_plus_one_weight(t, sigma_data):
    """The 512 code's "snrpk" weight (t^2 + sd^2) / (t sd)^2 = 1/t^2 + 1/sd^2 (EDM's loss weight)."""
    return (t**2 + sigma_data**2) / (t * sigma_data) ** 2


def consistency_pair_loss(student, x_t, t, x_r, r, *, c, sigma_data, labels=None, target_context=None, terms=None):
    """pseudo-Huber(f(x_t, t) - sg f(x_r, r)) x (1/t^2 + 1/sd^2), the two passes as in
    prediction_then_target. `terms`: the distance and the weight."""
    pred, target = prediction_then_target(student, x_t, t, x_r, r, labels, target_context)
    distance, weight = pseudo_huber_distance(pred, target, c), snr_plus_one_weight(t, sigma_data)
    note(terms, distance=distance, weight=weight)
    return distance * weight


def _times(y, generator, stage, q, k, b, P_mean, P_std):
    n = torch.randn(y.shape[0], generator=generator, dtype=torch.float32).to(y.device)
    t = (P_mean + P_std * n).exp()
    eps = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(y.device)
    r = ect_r(t, stage, q, k, b)
    return t.to(y.dtype), r.to(y.dtype), eps.to(y.dtype)  # drawn in float32 whatever y's precision


def ecd_loss(student, y, generator, denoise, *, stage=0, q=1024, k=8.0, b=1.0, P_mean=-0.8, P_std=1.6,
             c=0.06, sigma_data=0.5, labels=None, target_context=None, terms=None):
    """ECD: t ~ logN(P_mean, P_std), r from the sigmoid map, x_t = y + t eps, x_r from one Heun step
    of the teacher's denoiser `denoise` (guided_denoiser) from t to r, then consistency_pair_loss."""
    t, r, eps = _times(y, generator, stage, q, k, b, P_mean, P_std)
    x_t = y + t.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        x_r = heun_step(denoise, x_t, t, r, labels)
    return consistency_pair_loss(student, x_t, t, x_r, r, c=c, sigma_data=sigma_data, labels=labels,
                                 target_context=target_context, terms=terms)


def ect_snr_loss(student, y, generator, *, stage=0, q=1024, k=8.0, b=1.0, P_mean=-0.8, P_std=1.6, c=0.06,
                 sigma_data=0.5, labels=None, target_context=None, terms=None):
    """The ImageNet-512 code's ECT: x_r = y + r eps with the shared noise (no teacher), the same
    distance and weight as ecd_loss."""
    t, r, eps = _times(y, generator, stage, q, k, b, P_mean, P_std)
    if not bool((r > 0).all()):
        raise ValueError(f"ect_snr_loss: r = 0 for some t (q = {q}); use q > {1 + k}")
    x_t, x_r = y + t.view(-1, 1, 1, 1) * eps, y + r.view(-1, 1, 1, 1) * eps
    return consistency_pair_loss(student, x_t, t, x_r, r, c=c, sigma_data=sigma_data, labels=labels,
                                 target_context=target_context, terms=terms)
