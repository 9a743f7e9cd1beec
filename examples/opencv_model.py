"""An OpenCV model (``opencv-python-headless``) served by a modelpool.Pool: thumbnails.

Run it with ``python examples/opencv_model.py`` (needs ``pip install opencv-python-headless``).

OpenCV reads none of the thread variables (``OMP_NUM_THREADS``...): left alone, each worker's
OpenCV starts a pool of every core, and N workers oversubscribe the machine N times. modelpool
sets each worker's OpenCV to the pool's thread budget (usable cores // workers, or
``threads_per_worker``), also when cv2 is imported late, in ``predict``. Its workers start
from a clean process (forkserver), so the parent may use OpenCV on all its threads first.
"""

from __future__ import annotations

import cv2
import numpy as np

import modelpool


class Thumbnailer(modelpool.Model):
    """Resizes a BGR image (uint8, H x W x 3) to ``size`` x ``size``."""

    inputs = [modelpool.TensorSpec("image", "UINT8", [-1, -1, 3])]
    outputs = [
        modelpool.TensorSpec("thumbnail", "UINT8", [-1, -1, 3]),
        modelpool.TensorSpec("cv2_threads", "INT32", [1]),
    ]

    def __init__(self, *, size: int = 64) -> None:  # Pool(options={"size": ...})
        self.size = size

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image = inputs["image"]
        thumbnail = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return {"thumbnail": thumbnail, "cv2_threads": np.array([cv2.getNumThreads()], np.int32)}


if __name__ == "__main__":  # required: workers re-import this file when they start
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for side in (256, 480, 720, 1080)
    ]
    # the parent uses OpenCV too, on all its threads, before the pool starts: no harm done
    expected = [cv2.resize(im, (64, 64), interpolation=cv2.INTER_AREA) for im in images]

    with modelpool.Pool(Thumbnailer, workers=2, options={"size": 64}, timeout=30.0) as pool:
        answers = [pool.predict({"image": image}) for image in images]
        budget = pool.threads_per_worker

    shapes = {a["thumbnail"].shape for a in answers}
    threads = sorted({int(a["cv2_threads"][0]) for a in answers})
    same = all(np.array_equal(a["thumbnail"], e) for a, e in zip(answers, expected, strict=True))
    print(f"thumbnails: {len(answers)} of shape {shapes.pop()}")
    print(f"OpenCV threads per worker: {', '.join(map(str, threads))} (budget {budget})")
    print(f"same as a resize in this process: {same}")
