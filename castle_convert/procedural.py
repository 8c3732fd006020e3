"""Procedural images with natural-image statistics (numpy only, seeded).

Used beside wallpaper crops by the ``natural`` data source (:mod:`castle_convert.natural`):

* ``dead_leaves``: occluding discs with power-law radii (density ∝ r⁻³, the scale-invariant dead-leaves
  model): edges, occlusion and a 1/f² power spectrum, as natural scenes have.
* ``pink_noise``: noise with a 1/f^α amplitude spectrum (α ~ U[0.8, 1.6]): a luminance field plus two
  weaker chroma fields (random colour directions), plus a smooth illumination gradient.
* ``shapes``: polygons and ellipses filled with textures (gratings at random orientation and frequency,
  1/f noise) over a noise background, slightly blurred.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

KINDS = ("dead_leaves", "pink_noise", "shapes")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random colour with natural-looking saturation (a grey level pulled toward a random hue)."""
    grey = rng.uniform(0, 255)
    hue = rng.uniform(0, 255, 3)
    mix = rng.beta(1.5, 3.0)
    return tuple(int(v) for v in np.clip((1 - mix) * grey + mix * hue, 0, 255))


def dead_leaves(rng: np.random.Generator, size: int) -> np.ndarray:
    image = Image.new("RGB", (size, size), _colour(rng))
    draw = ImageDraw.Draw(image)
    r_min, r_max = size / 100, size / 3
    # inverse-CDF sampling of p(r) ∝ r^-3 on [r_min, r_max]
    u = rng.uniform(0, 1, 600)
    radii = (r_min ** -2 - u * (r_min ** -2 - r_max ** -2)) ** -0.5
    for r in radii:
        x, y = rng.uniform(-r, size + r, 2)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_colour(rng))
    return np.asarray(image)


def _noise_field(rng: np.random.Generator, size: int, alpha: float) -> np.ndarray:
    """One (size, size) field with a 1/f^alpha amplitude spectrum, zero mean, unit std."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** alpha
    spectrum[0, 0] = 0
    field = np.fft.irfft2(spectrum, s=(size, size))
    return (field - field.mean()) / (field.std() + 1e-8)


def pink_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    alpha = rng.uniform(0.8, 1.6)
    fields = np.stack([_noise_field(rng, size, alpha) for _ in range(3)], -1)     # (size, size, 3)
    # luminance dominates, chroma is weaker and random (channels of natural images are correlated)
    mix = np.concatenate([np.ones((3, 1)), rng.normal(size=(3, 2)) * rng.uniform(0.1, 0.5)], 1)  # (3, 3)
    image = fields @ mix.T
    yy, xx = np.mgrid[0:size, 0:size] / size
    light = rng.normal() * (xx - 0.5) + rng.normal() * (yy - 0.5)                 # illumination gradient
    image = image / (image.std() + 1e-8) * rng.uniform(30, 70) + rng.uniform(60, 190, 3) + 60 * light[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    if rng.random() < 0.5:                                                         # a grating
        theta, freq = rng.uniform(0, np.pi), rng.uniform(2, 30) / size
        yy, xx = np.mgrid[0:size, 0:size]
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 6.3))
        base = np.array(_colour(rng), dtype=np.float32)
        return np.clip(base + wave[..., None] * rng.uniform(20, 80), 0, 255).astype(np.uint8)
    return pink_noise(rng, size)


def shapes(rng: np.random.Generator, size: int) -> np.ndarray:
    image = Image.fromarray(pink_noise(rng, size))
    for _ in range(int(rng.integers(3, 12))):
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        cx, cy = rng.uniform(0, size, 2)
        r = size * rng.uniform(0.05, 0.35)
        if rng.random() < 0.5:
            draw.ellipse((cx - r, cy - r * rng.uniform(0.4, 1), cx + r, cy + r * rng.uniform(0.4, 1)), fill=255)
        else:
            n = int(rng.integers(3, 8))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radius = r * rng.uniform(0.5, 1.0, n)
            draw.polygon([(cx + a * np.cos(t), cy + a * np.sin(t)) for a, t in zip(radius, angles)], fill=255)
        image.paste(Image.fromarray(_texture(rng, size)), (0, 0), mask)
    return np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.2))))


def generate(rng: np.random.Generator, size: int, kind: int) -> np.ndarray:
    """One (size, size, 3) uint8 image of ``KINDS[kind]``."""
    return {"dead_leaves": dead_leaves, "pink_noise": pink_noise, "shapes": shapes}[KINDS[kind]](rng, size)
