"""Pictures of samples: image grids (PIL) and 2D scatter plots (matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from schedules.io import atomic_path


def image_grid(x: torch.Tensor, nrow: int | None = None, scale: int = 4, pad: int = 1):
    """[N, C, H, W] in [-1, 1] → a PIL image grid (nearest-neighbour upscaled by ``scale``)."""
    from PIL import Image

    x = x.detach().float().cpu().clamp(-1, 1)
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.ones((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad))
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    arr = ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_samples(x: torch.Tensor, path: str | Path, title: str | None = None,
                 reference: torch.Tensor | None = None) -> Path:
    """Save samples as a PNG: an image grid for [N, C, H, W], a scatter plot for [N, 2]."""
    path = Path(path)
    if x.ndim == 4:
        img = image_grid(x)
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG")
    elif x.ndim == 2 and x.shape[1] == 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        if reference is not None:
            r = reference.detach().cpu()
            ax.scatter(r[:, 0], r[:, 1], s=2, c="0.8", label="data")
        p = x.detach().cpu()
        ax.scatter(p[:, 0], p[:, 1], s=2, c="tab:blue", label="samples")
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
    else:
        raise ValueError(f"cannot draw samples of shape {list(x.shape)}: expected [N, C, H, W] or [N, 2]")
    return path
