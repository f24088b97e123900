"""PNG figures of a FlopsReport (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from manidp_cli.analysis.report import FlopsReport
from manidp_cli.files import atomic_write

FIGSIZE = (10, 4.5)
DPI = 100


def write_plots(report: FlopsReport, folder: Path) -> list[Path]:
    """Write keep_ratio.png, flops_histogram.png, loss_vs_flops.png and channel_keep_heatmap.png
    (1000 x 450 px each); return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig, name):
        path = atomic_write(folder / name, lambda handle: fig.savefig(handle, dpi=DPI, format="png"))
        plt.close(fig)
        paths.append(path)

    gated = [r for r in report.rows if r.gated]
    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    x = np.arange(len(gated))
    ax.bar(x - 0.2, [r.keep_ratio_out for r in gated], 0.4, label="output channels kept")
    ax.bar(x + 0.2, [r.keep_ratio_in for r in gated], 0.4, label="input channels active")
    ax.set_xticks(x, [r.name for r in gated], rotation=90, fontsize=6)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean fraction of channels per image")
    ax.set_xlabel("gated convolution")
    ax.set_title(f"{report.model}: keep ratio per layer ({report.measured_on})", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "keep_ratio.png")

    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    ax.hist(report.per_image_ratio, bins=40, color="tab:blue")
    ax.axvline(report.ratio, color="tab:red", linestyle="--", label=f"mean {report.ratio:.3f}")
    ax.set_xlabel("per-image FLOPs / dense FLOPs (1 FLOP = 1 multiply-add)")
    ax.set_ylabel("images")
    ax.set_title(f"{report.model}: per-image FLOPs ratio over {report.images} images", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "flops_histogram.png")

    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    ax.scatter(report.per_image_loss, report.per_image_ratio, s=6, alpha=0.5)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("per-image cross-entropy loss (recognition complexity)")
    ax.set_ylabel("per-image FLOPs / dense FLOPs")
    ax.set_title(f"{report.model}: harder images vs sub-network size", fontsize=9)
    save(fig, "loss_vs_flops.png")

    frequency = report.channel_keep_frequency
    names = [r.name for r in gated if r.name in frequency]
    width = max((len(frequency[n]) for n in names), default=1)
    grid = np.full((max(len(names), 1), width), np.nan)
    for i, name in enumerate(names):
        values = np.sort(np.asarray(frequency[name]))[::-1]  # most kept first
        grid[i, : len(values)] = values
    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xlabel("output channel, sorted by keep frequency (blank: layer has fewer channels)")
    ax.set_ylabel("gated convolution")
    ax.set_title(f"{report.model}: fraction of images that keep each channel", fontsize=9)
    fig.colorbar(image, ax=ax, label="keep frequency")
    save(fig, "channel_keep_heatmap.png")
    return paths
