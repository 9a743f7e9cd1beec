"""The ``modelpool`` command: a thin skin over the library."""

from __future__ import annotations

import sys
import time

import click

from . import __version__


@click.group()
@click.version_option(__version__, prog_name="modelpool")
def main() -> None:
    """Run deep-learning models in supervised worker processes."""


@main.command()
@click.option("--workers", default=2, show_default=True, help="Worker processes to start.")
@click.option("--requests", "n", default=1000, show_default=True, help="Requests to send.")
def demo(workers: int, n: int) -> None:
    """Start a pool on the built-in Iris demo model and classify some flowers."""
    import numpy as np

    from . import Pool
    from .demo import SPECIES

    flowers = np.array(
        [[5.1, 3.5, 1.4, 0.2], [6.0, 2.7, 4.1, 1.0], [6.9, 3.1, 5.8, 2.2]], dtype=np.float32
    )
    click.echo(f"starting {workers} workers on modelpool.demo:IrisClassifier ...")
    t0 = time.perf_counter()
    with Pool("modelpool.demo:IrisClassifier", workers=workers) as pool:
        click.echo(f"ready in {time.perf_counter() - t0:.2f} s")
        out = pool.predict({"INPUT0": flowers})
        for row, label, p in zip(flowers, out["LABEL"], out["PROBABILITIES"], strict=True):
            shown = ", ".join(f"{v:.1f}" for v in row)
            click.echo(f"  [{shown}] -> {SPECIES[label]:<10} (p={p[label]:.2f})")
        t0 = time.perf_counter()
        for _ in range(n):
            pool.predict({"INPUT0": flowers[:1]})
        elapsed = time.perf_counter() - t0
        click.echo(
            f"{n} sequential requests: {n / elapsed:.0f} req/s, {elapsed / n * 1e6:.0f} us each"
        )
        for w in pool.stats().workers:
            click.echo(f"  worker {w.index}: pid {w.pid}, {w.state}, served {w.served}")
    click.echo("pool shut down; all workers reaped")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
