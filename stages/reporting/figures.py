"""The row's figures: the FD-against-images curve of each init and the sample grids, written as PNG."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stages.files import atomic  # noqa: E402


def fd_curve(path, fids, inits, steps, labels, ceiling, row, images_key, x_label):
    """One panel per sampler: each init's FD at its snapshots against the images seen (`images_key`),
    log scale, with the teacher's own solver as a line."""
    fig, axes = plt.subplots(1, len(steps), figsize=(5.5 * len(steps), 4), squeeze=False)
    for ax, s in zip(axes[0], steps, strict=True):
        for init in inits:
            snaps = fids[init]["snapshots"]
            names = sorted(snaps)
            x = [snaps[n].get(images_key, snaps[n]["images_seen"]) / 1e3 for n in names]
            y = [snaps[n][f"{s}step"]["mean"] for n in names]
            ax.plot(x, y, marker="o", label=labels[init])
        ax.axhline(ceiling["mean"], color="grey", ls="--", label=f"teacher {ceiling['nfe']}-NFE solver")
        ax.set_yscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{s}-step FD")
        ax.set_title(f"{row}: {s}-step")
        ax.legend(fontsize=8)
    save(fig, path)


def fd_sigma_rel(path, posthoc, own, steps, labels, row):
    """One panel per sampler: each run's post-hoc EMA FD against its width sigma_rel, relative to the FD
    of the run's own per-step EMA (`own`: init -> its final FD entry; a cross at 1 at its equivalent
    width), so runs of very different FD share a scale; the best width starred."""
    fig, axes = plt.subplots(1, len(steps), figsize=(5.5 * len(steps), 4), squeeze=False)
    for ax, s in zip(axes[0], steps, strict=True):
        for init, fid in posthoc.items():
            snaps = sorted(fid["snapshots"].values(), key=lambda e: e["posthoc_ema"]["sigma_rel"])
            mine = own[init][f"{s}step"]["mean"]
            x = [e["posthoc_ema"]["sigma_rel"] for e in snaps]
            y = [e[f"{s}step"]["mean"] / mine for e in snaps]
            line = ax.plot(x, y, marker="o", label=f"{labels[init]} (own EMA: FD {mine:.3g})")[0]
            best = int(np.argmin(y))
            ax.plot([x[best]], [y[best]], marker="*", ms=14, color=line.get_color(), ls="none")
            ax.plot([snaps[0]["posthoc_ema"]["per_step_sigma_rel"]], [1.0], marker="x", ms=10, mew=2,
                    color=line.get_color(), ls="none")
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        ax.set_xlabel("EMA width sigma_rel (x: the run's own per-step EMA, *: best)")
        ax.set_ylabel(f"{s}-step FD / FD of the run's own EMA")
        ax.set_title(f"{row}: post-hoc EMA, {s}-step")
        ax.legend(fontsize=8)
    save(fig, path)


def tile(images, pad=1):
    """[n, C, H, W] uint8 -> one [rows * (H + pad), cols * (W + pad), C] image with grey separators."""
    n, c, h, w = images.shape
    side = int(np.ceil(np.sqrt(n)))
    grid = np.full((side * (h + pad) + pad, side * (w + pad) + pad, c), 128, np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, side)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = \
            img.transpose(1, 2, 0)
    return grid


def sample_grids(path, samples, steps, labels):
    """One block of up to 64 images per init (rows) and sampler (columns); `samples`: init -> .npz path
    of its final snapshot's samples."""
    inits = list(samples)
    fig, axes = plt.subplots(len(inits), len(steps), figsize=(3.2 * len(steps), 3.2 * len(inits)), squeeze=False)
    for row, init in enumerate(inits):
        with np.load(samples[init]) as data:
            for col, s in enumerate(steps):
                grid = tile(data[f"images_{s}step_r0"][:64])
                ax = axes[row][col]
                ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
                          interpolation="nearest")
                ax.set_title(f"{labels[init]}, {s}-step", fontsize=8)
                ax.axis("off")
    save(fig, path)


def save(fig, path):
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
