"""``synthetic-gratings``: a procedurally generated image dataset (SYNTHETIC, no download).

Eight classes = 4 grating orientations (0, 45, 90, 135 degrees) x 2 envelope shapes (a disk or
a square of the same area). Orientation is a local texture, visible to a ViT's first layers
in every patch; the envelope's shape is a global arrangement of patches, which only later
layers can assemble. Nuisances vary per image: spatial frequency, phase, position and size of
the envelope, contrast, a colour tint, background level and pixel noise. Images are generated
from a fixed seed, so the dataset is the same on every machine.
"""
from __future__ import annotations

import math

import numpy as np
import torch

ORIENTATIONS_DEG = (0, 45, 90, 135)
SHAPES = ("disk", "square")
CLASSES = [f"{shape}-{angle}deg" for shape in SHAPES for angle in ORIENTATIONS_DEG]
SEED = 0


def generate(num_per_class: int, size: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 3, size, size) float32 in [0, 1], labels (n,) int64), class-balanced."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if isinstance(num_per_class, bool) or not isinstance(num_per_class, int) or num_per_class < 1:
        raise ValueError(f"num_per_class must be a positive int, got {num_per_class!r}")
    rng = np.random.default_rng(seed)
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size                 # [0, 1]
    grid_y, grid_x = np.meshgrid(coords, coords, indexing="ij")
    labels = np.repeat(np.arange(len(CLASSES)), num_per_class)
    images = np.empty((len(labels), 3, size, size), dtype=np.float32)
    for index, label in enumerate(labels):
        shape, angle = SHAPES[label // len(ORIENTATIONS_DEG)], ORIENTATIONS_DEG[label % len(ORIENTATIONS_DEG)]
        theta = math.radians(angle + rng.uniform(-8, 8))
        cycles = rng.uniform(3.0, 6.0)                                         # per image width
        phase = rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * cycles * (grid_x * math.cos(theta) + grid_y * math.sin(theta)) + phase)
        half = rng.uniform(0.22, 0.32)                                         # square half-side
        centre_y, centre_x = rng.uniform(half + 0.02, 1 - half - 0.02, size=2)
        if shape == "disk":                                                    # same area as the square
            radius = half * 2 / math.sqrt(math.pi)
            mask = (grid_y - centre_y) ** 2 + (grid_x - centre_x) ** 2 <= radius ** 2
        else:
            mask = (np.abs(grid_y - centre_y) <= half) & (np.abs(grid_x - centre_x) <= half)
        background = rng.uniform(0.3, 0.7)
        contrast = rng.uniform(0.25, 0.5)
        grey = np.where(mask, background + contrast * wave, background)
        tint = rng.uniform(0.7, 1.0, size=3)
        pixels = grey[None] * tint[:, None, None] + rng.normal(0.0, 0.05, size=(3, size, size))
        images[index] = np.clip(pixels, 0.0, 1.0)
    return images, labels.astype(np.int64)


class GratingsDataset(torch.utils.data.Dataset):
    """Generated images normalised with the backbone's mean and std."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std):
        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return (self.images[index] - self.mean) / self.std, self.labels[index]


def gratings_splits(img_size: int, mean, std, num_per_class: int = 60) -> tuple[dict, list]:
    """The train/val/test splits (the stratified split that digits uses) and the class names."""
    from ..extract import split_indices

    images, labels = generate(num_per_class, img_size)
    return ({name: GratingsDataset(images[idx], labels[idx], mean, std)
             for name, idx in split_indices(labels).items()}, list(CLASSES))
