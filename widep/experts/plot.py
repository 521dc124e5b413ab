"""Heatmaps of an expert-load record: layer x expert share, and layer x EP rank load over the mean."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from widep.experts.analysis import counts_array, rank_loads
from widep.experts.load import ExpertLoad


def heatmaps(load: ExpertLoad, phy2log: np.ndarray | None, ep: int | None, path: Path) -> Path:
    """One PNG: layer x expert (tokens over the layer's mean per expert) and, with a placement, layer x rank
    (tokens over the layer's mean per rank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    c = counts_array(load)
    per_expert = c / np.maximum(c.mean(axis=1, keepdims=True), 1e-12)
    panels = 2 if phy2log is not None and ep else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), squeeze=False)
    im = axes[0][0].imshow(per_expert, aspect="auto", interpolation="nearest", cmap="viridis")
    axes[0][0].set(title="tokens per expert / layer mean", xlabel="logical expert", ylabel="MoE layer")
    fig.colorbar(im, ax=axes[0][0])
    if panels == 2 and ep:
        r = rank_loads(c, np.asarray(phy2log), ep)
        per_rank = r / np.maximum(r.mean(axis=1, keepdims=True), 1e-12)
        im2 = axes[0][1].imshow(per_rank, aspect="auto", interpolation="nearest", cmap="magma")
        axes[0][1].set(title=f"tokens per EP rank / layer mean (EP {ep})", xlabel="EP rank", ylabel="MoE layer")
        fig.colorbar(im2, ax=axes[0][1])
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{load.model or 'expert load'} ({load.source or 'unknown source'})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
