"""Networks and data of the embedded default models.

Everything here trains on a CPU in minutes and needs no download:

* ``toy2d``: two moons (scikit-learn ``make_moons``), standardised;
* ``digits``: scikit-learn's bundled ``load_digits`` (1,797 images of 8x8),
  upsampled bilinearly to 16x16 and scaled to [-1, 1];
* ``sharp``: the same digits thresholded to ±1 (binary images, where blur is visible).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

DIGITS_SIZE = 16
DIGITS_NULL_CLASS = 10  # digits-cond: labels 0..9 are digits, 10 is the null (unconditional) label
# Moons are standardised with these fixed constants (measured once on 100k samples) so
# that the data distribution does not depend on the sample drawn.
_MOONS_MEAN = np.array([0.5, 0.25])
_MOONS_STD = np.array([0.87, 0.50])


def toy2d_data(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` samples of the toy 2D data distribution (two moons, noise 0.05)."""
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=n, noise=0.05, random_state=seed)
    x = (x - _MOONS_MEAN) / _MOONS_STD
    # make_moons returns the two moons in order; shuffle so that any prefix is a fair sample
    rng = np.random.default_rng(seed)
    x = x[rng.permutation(n)]
    return torch.from_numpy(x).float()


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as a float tensor [N, 1, 16, 16] in [-1, 1], and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.from_numpy(d.target).long()


def sharp_digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits of :func:`digits_data` thresholded at 0 to exactly ±1, and their labels.

    Binary images have no grey levels, so a sampler that returns the posterior mean
    (a blurred average of digits) is visibly off-distribution: blur costs FID here,
    while on the smooth upsampled digits it hardly does.
    """
    x, y = digits_data()
    return torch.where(x > 0, 1.0, -1.0), y


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of a [B] float tensor, as in DDPM/diffusers."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :].to(t.device)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Toy2DVelocity(nn.Module):
    """MLP velocity field v(x, t) for 2D flow matching.

    Called as ``module(x, t)`` with ``x`` [B, 2] and ``t`` = σ ∈ [0, 1] of shape [B]
    (diffusers FlowMatch convention: σ=1 is noise); returns the velocity ε - x0.
    """

    def __init__(self, hidden: int = 256, depth: int = 3, emb: int = 64):
        super().__init__()
        self.emb = emb
        layers: list[nn.Module] = [nn.Linear(2 + emb, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # the embedding sees t*1000 so that its frequencies resolve the whole unit interval
        e = timestep_embedding(t * 1000.0, self.emb)
        return self.net(torch.cat([x, e], dim=-1))


class DigitsFeatures(nn.Module):
    """Small CNN classifier for 16x16 digits; its 128-d penultimate layer is the
    feature network of FID/KID on the digits models (Inception cannot be fetched here).

    ``forward`` takes images in [-1, 1] of shape [B, 1, 16, 16] and returns features
    [B, 128]; ``classify`` returns logits [B, 10].
    """

    num_features = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(128 * 4 * 4, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, DIGITS_SIZE, DIGITS_SIZE):
            raise ValueError(
                f"digits-features expects images of shape [B, 1, {DIGITS_SIZE}, {DIGITS_SIZE}], "
                f"got {list(x.shape)}"
            )
        return self.body(x.float())

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(x))


def digits_unet_config() -> dict:
    """diffusers ``UNet2DModel`` config shared by digits-flow and digits-ddpm (~700k params)."""
    return dict(
        sample_size=DIGITS_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )
