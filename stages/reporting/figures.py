"""The row's figures: the FD-against-images curve of each init, the training curves of each stage and
the sample grids, written as PNG."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stages.core.image_grid import tile  # noqa: E402
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


def read_metrics(path):
    """The training lines of a metrics log (stages/training/metrics.py), or None where there is none
    (a teacher from the store trained before logs were kept, an imported one)."""
    if path is None or not Path(path).exists():
        return None
    return [entry for entry in map(json.loads, Path(path).read_text().splitlines()) if entry.get("kind") == "train"]


def training_curves(path, stages, row):
    """One panel per training stage: the loss against the images the stage saw (log scale where all
    losses are positive); `stages`: panel title -> {line label: metrics lines}. A stage without a log
    says so in its panel."""
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.8), squeeze=False)
    for ax, (title, runs) in zip(axes[0], stages.items(), strict=True):
        shown = {label: lines for label, lines in runs.items() if lines}
        for label, lines in shown.items():
            ax.plot([e["images"] / 1e3 for e in lines], [e["loss"] for e in lines], label=label,
                    marker="o" if len(lines) <= 30 else None, markersize=3)
        if not shown:
            ax.text(0.5, 0.5, "no metrics log\n(trained before logs were kept,\nor imported)", ha="center",
                    va="center", transform=ax.transAxes, fontsize=9)
        elif all(e["loss"] > 0 for lines in shown.values() for e in lines):
            ax.set_yscale("log")
        ax.set_xlabel("training kimg (this stage)")
        ax.set_ylabel("loss")
        ax.set_title(f"{row}: {title}", fontsize=10)
        if len(shown) > 1:
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
