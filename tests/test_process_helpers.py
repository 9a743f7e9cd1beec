"""multiprocessing's fork server and resource tracker: process-wide helpers that the first
forkserver pool starts. A pool's shutdown leaves them for the next pool; the process's exit
stops and reaps them, so a script leaves no orphan (or zombie) behind for init to reap."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from _reaping import adopted, left_behind, orphans_adopted

SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing, psutil
    from modelpool import Pool
    from modelpool._pool import stop_process_helpers

    def children():
        return {p.pid for p in psutil.Process().children(recursive=True)}

    if __name__ == "__main__":
        with Pool("modelpool.demo:IrisClassifier", workers=1) as pool:
            first = children()
            assert not stop_process_helpers(), "a running pool still needs them"
        helpers = children()  # the workers are gone; the helpers stay for the next pool
        with Pool("modelpool.demo:IrisClassifier", workers=1) as pool:
            second = children()
        print(json.dumps({"first": sorted(first), "second": sorted(second),
                          "helpers": sorted(helpers)}))
    """
)


def test_a_script_with_pools_leaves_no_process_behind() -> None:
    watched: set[int] = set()
    with orphans_adopted(watched):
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout)
        helpers = set(seen["helpers"])
        assert len(helpers) == 2, seen  # fork server and resource tracker
        assert helpers < set(seen["first"])  # shared by both pools
        assert helpers < set(seen["second"])
        watched |= set(seen["first"]) | set(seen["second"])
        assert not [p for p in watched if adopted(p)], left_behind(watched)
        assert not left_behind(watched)
