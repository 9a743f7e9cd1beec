"""A PyTorch DataLoader whose workers resize images with OpenCV and augment them at random,
given modelpool's worker hygiene by one argument: ``worker_init_fn=worker_init_fn``.

Run it with ``python examples/torch_dataloader.py`` (needs ``pip install torch
opencv-python-headless``).

The dataset draws its augmentations from a generator it makes in ``__init__``, NumPy's
recommended style. Without modelpool's ``worker_init_fn``, each loader worker gets a copy of
that generator in the same state: the workers draw the same crops and gains (and draw them
again the next epoch). With it, each worker's generators are reseeded from the loader's seed
(distinct, and reproducible under ``torch.manual_seed``), and OpenCV, which otherwise starts a
pool of every core in every worker, runs on usable cores // num_workers threads.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from modelpool.integrations.torch import worker_init_fn


class Photos(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """``n`` synthetic photos of various sizes: resized to 72 x 72 with OpenCV, then cropped
    to 64 x 64 at a random place, flipped at random and given a random gain."""

    def __init__(self, n: int = 16, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)  # one generator, made here, in the parent
        self.sizes = self.rng.integers(96, 256, size=n)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        size = int(self.sizes[index])
        photo = np.random.default_rng(index).integers(0, 256, (size, size, 3), dtype=np.uint8)
        resized = cv2.resize(photo, (72, 72), interpolation=cv2.INTER_AREA)
        top, left = (int(v) for v in self.rng.integers(0, 9, size=2))
        gain = float(self.rng.uniform(0.8, 1.2))
        crop = resized[top : top + 64, left : left + 64]
        if np.random.random() < 0.5:  # NumPy's global RNG: torch seeds it in each worker
            crop = crop[:, ::-1]
        chw = np.ascontiguousarray(crop.transpose(2, 0, 1))
        image = torch.from_numpy(chw).float().mul_(gain / 255.0)
        return image, torch.tensor([top, left, gain]), cv2.getNumThreads()


def run(init: Callable[[int], None] | None) -> None:
    torch.manual_seed(0)  # the loader derives each worker's seeds from this: reproducible
    loader = DataLoader(Photos(), batch_size=4, num_workers=2, worker_init_fn=init)
    shapes: list[tuple[int, ...]] = []
    augmentations: set[tuple[float, ...]] = set()
    threads: set[int] = set()
    for images, params, cv2_threads in loader:
        shapes.append(tuple(images.shape))
        augmentations.update(tuple(p) for p in params.tolist())
        threads.update(cv2_threads.tolist())
    label = "with worker_init_fn" if init else "without"
    print(f"{label}: distinct augmentations: {len(augmentations)} of {len(Photos())}")
    print(f"{label}: OpenCV threads per worker: {', '.join(map(str, sorted(threads)))}")
    if init:
        print(f"batches: {len(shapes)} of shape {shapes[0]}")


if __name__ == "__main__":  # required: loader workers may re-import this file
    run(None)
    run(worker_init_fn)
