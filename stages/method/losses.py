"""Training objectives: EDM denoising (teacher), CMT-CM (mid-training), ECT (post-training).

Each loss returns per-sample values [B]; the training loop takes the mean. Distances are
per-sample too, over all pixels of a sample.
"""

import torch

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
            for i, slice_ in enumerate([trunk.slice1, trunk.slice2, trunk.slice3, trunk.slice4, trunk.slice5]):
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


def make_distance(name, *, pseudo_huber_c=None, lpips_weights=None):
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
    raise ValueError(f"unknown distance {name!r}")


# ----------------------------------------------------------------------------------------------
# EDM teacher training (Karras et al. 2022): sigma ~ logN(P_mean, P_std),
# weight (sigma^2 + sd^2) / (sigma sd)^2 on the squared error of the denoiser.


def edm_loss(denoiser, y, generator, sigma_data, P_mean=-1.2, P_std=1.2):
    sd = sigma_data
    n = torch.randn(y.shape[0], generator=generator, dtype=torch.float32).to(y.device)
    sigma = (P_mean + P_std * n).exp()
    noise = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(y.device)
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    d = denoiser(y + sigma.view(-1, 1, 1, 1) * noise, sigma)
    return weight * (d - y).flatten(1).square().mean(1)


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


def cmt_cm_loss(student, states, sigmas, distance):
    inputs, input_sigmas, targets = cmt_cm_inputs(states, sigmas)
    return distance(student(inputs, input_sigmas), targets)


# ----------------------------------------------------------------------------------------------
# ECT (Geng et al. 2024; docs/method.md#ect).


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
             sigma_min=0.002):
    """||f(x_t, t) - sg f(x_r, r)|| / (t - r) with shared noise; the target is the same network
    under no_grad with the same dropout mask (the RNG state is restored), and y where r = 0.
    c > 0 turns the numerator into the pseudo-Huber distance.
    """
    n = torch.randn(y.shape[0], generator=generator, dtype=torch.float32).to(y.device)
    t = (P_mean + P_std * n).exp()
    r = ect_r(t, stage, q, k, b)
    eps = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(y.device)
    x_t = y + t.view(-1, 1, 1, 1) * eps
    # r = 0 would put c_noise = ln(0) into the network; those rows use y and never see this value.
    r_eval = torch.where(r > 0, r, torch.full_like(r, sigma_min))
    x_r = y + r_eval.view(-1, 1, 1, 1) * eps

    devices = [y.device] if y.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        with torch.no_grad():
            target = student(x_r, r_eval)
    target = torch.where((r > 0).view(-1, 1, 1, 1), target, y)
    pred = student(x_t, t)
    dist = pseudo_huber_distance(pred, target, c) if c > 0 else l2_distance(pred, target)
    return dist / (t - r)
