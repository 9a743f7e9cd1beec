"""Plot a ``bench/server.py --json`` result: req/s against p99 latency, one point per
contender, one panel per scenario (``pip install matplotlib``; not needed to run the bench).

    python bench/server.py --target-only --json server.json
    python bench/plot.py server.json docs/bench-server.png
"""

from __future__ import annotations

import json
import sys
from typing import Any


def plot(results: dict[str, Any], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    scenarios = {k: v for k, v in results.items() if k != "targets"}
    fig, axes = plt.subplots(1, len(scenarios), figsize=(7 * len(scenarios), 5.5), squeeze=False)
    for ax, (title, contenders) in zip(axes[0], scenarios.items(), strict=True):
        for i, (label, m) in enumerate(contenders.items()):
            mine = label.startswith("modelpool")  # squares: baselines and peers
            marker = "o" if mine else "s"
            color = plt.get_cmap("tab20")(i % 20)  # (the default cycle repeats after 10)
            ax.scatter(m["p99_ms"], m["req_per_s"], s=70, marker=marker, color=color, label=label)
        ax.legend(fontsize=7, loc="upper right")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("p99 latency (ms), lower is better")
        ax.set_ylabel("requests/s, higher is better")
        ax.grid(True, alpha=0.3)
        ax.set_xlim(0, 1.2 * max(m["p99_ms"] for m in contenders.values()))
        ax.set_ylim(0, 1.35 * max(m["req_per_s"] for m in contenders.values()))
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        plot(json.load(f), sys.argv[2])
    print(f"wrote {sys.argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
