"""Torch views of a stored task split: images decoded once to uint8 tensors, normalised on access."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from dynadapter.data.store import DataError, read_task

INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def decode_image(data: bytes, img_size: int | None = None, interpolation: str = "bicubic") -> np.ndarray:
    """Encoded bytes -> RGB uint8 array [H, W, 3], resized to img_size x img_size when it differs."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if img_size is not None and im.size != (img_size, img_size):
            im = im.resize((img_size, img_size), INTERPOLATION[interpolation])
        return np.asarray(im, dtype=np.uint8)


def decode_images(images: Sequence[bytes], img_size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """All images -> uint8 tensor [N, 3, img_size, img_size] (kept compact; normalise per batch)."""
    if interpolation not in INTERPOLATION:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATION)}, got {interpolation!r}")
    out = np.empty((len(images), img_size, img_size, 3), dtype=np.uint8)
    for i, data in enumerate(images):
        try:
            out[i] = decode_image(data, img_size, interpolation)
        except (OSError, ValueError) as err:
            raise DataError(f"image {i}: cannot decode ({err})") from None
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def normalize(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 (x/255 - mean) / std, computed on x's device (the same float ops
    everywhere: a batch normalised on a GPU equals the CPU's result element for element)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x_uint8.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x_uint8.device).view(3, 1, 1)
    return (x_uint8.float().div_(255.0) - m) / s


class TaskDataset(Dataset):
    """A stored task split as (float32 [3, H, W] normalised image, int64 label) pairs.

    `split` is any split name the store knows ('train', 'val', 'test', 'trainval', 'train800', ...). mean/std
    come from the backbone's timm pretrained_cfg; the default is ImageNet's.
    """

    def __init__(
        self,
        root: str | Path,
        task: str,
        split: str,
        img_size: int,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        interpolation: str = "bicubic",
    ) -> None:
        data = read_task(root, task, split)
        if len(data) == 0:
            raise DataError(f"{Path(root) / task}: split {split!r} is empty")
        self.task = task
        self.split = split
        self.num_classes = data.num_classes
        self.class_names = data.class_names
        self.images = decode_images(data.images, img_size, interpolation)  # uint8 [N, 3, H, W]
        self.labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
        self.difficulty = None if data.difficulty is None else torch.from_numpy(data.difficulty)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(self.images[index], self.mean, self.std), self.labels[index]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split at once: (X float32 [N, 3, H, W], y int64 [N])."""
        return normalize(self.images, self.mean, self.std), self.labels.clone()

    def raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split at once, not normalised: (X uint8 [N, 3, H, W], y int64 [N]); 4x smaller than
        `tensors()`, for data that travels (Ray's object store) and is normalised per batch where it is used."""
        return self.images, self.labels.clone()


def load_split_tensors(
    root: str | Path,
    task: str,
    split: str,
    img_size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    interpolation: str = "bicubic",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as (X float32 [N, 3, img_size, img_size] normalised, y int64 [N])."""
    return TaskDataset(root, task, split, img_size, mean, std, interpolation).tensors()


def load_split_images(
    root: str | Path,
    task: str,
    split: str,
    img_size: int,
    interpolation: str = "bicubic",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as (X uint8 [N, 3, img_size, img_size], y int64 [N]): decoded and resized as
    `load_split_tensors` does, not normalised (`normalize` per batch gives its values exactly)."""
    return TaskDataset(root, task, split, img_size, interpolation=interpolation).raw()
