"""OpenCV (``opencv-python-headless``) inside modelpool workers: the thread budget applied, and
no hang after the parent ran OpenCV on its threads. Each pool runs in a fresh interpreter
(``_scripts``): the parent's threaded resize must not happen in the test process, which later
tests may fork. OpenCV imported late (in a submitted function): test_hazards.py, H16. In
PyTorch DataLoader workers: integrations/test_torch.py.
"""

from __future__ import annotations

from _deps import need_module
from _scripts import RESULT, ROOT, run_python, run_script
from modelpool import _hygiene

POOL_SCRIPT = f"""
import json, sys
import cv2
import modelpool, _torch_cv_models as m

out = {{"parent_cv2": m.resize_with_threads()}}  # the parent's OpenCV pool now has threads
image = m.image(1024, seed=1)
expected = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA)
with modelpool.Pool(m.Thumbnail, workers=1, threads_per_worker=int(sys.argv[3]),
                    start_method=sys.argv[1],
                    timeout=30, setup_timeout=float(sys.argv[2])) as pool:
    answer = pool.predict({{"image": image}}, timeout=30)
    out["start_method"] = pool.start_method
out["same"] = bool((answer["thumbnail"] == expected).all())
out["worker_cv2"] = int(answer["cv2_threads"][0])
print({RESULT!r} + json.dumps(out))
"""


def test_opencv_model_after_the_parent_used_opencv_threads() -> None:
    """A model that resizes with OpenCV, in a default pool (forkserver) with
    ``threads_per_worker=1``, after the parent ran a threaded resize of a 2048 x 2048 image:
    the worker's OpenCV has 1 thread, and predict answers (the same pixels as the parent's
    resize) instead of hanging."""
    need_module("cv2")
    result = run_script(POOL_SCRIPT, "forkserver", "60", "1", timeout=120)
    assert result["parent_cv2"] == _hygiene.usable_cores()
    assert result["start_method"] == "forkserver"
    assert result["worker_cv2"] == 1
    assert result["same"] is True


def test_opencv_imported_by_the_model_gets_the_whole_budget() -> None:
    """Imported in the worker (the model's module), OpenCV is the worker's own: it gets the
    budget, 2 threads here, not the sequential fallback of an OpenCV that came with a fork."""
    need_module("cv2")
    result = run_script(POOL_SCRIPT, "forkserver", "60", "2", timeout=120)
    assert result["worker_cv2"] == 2
    assert result["same"] is True


_CONTROL = f"""
import json, os, time
import cv2, _torch_cv_models as m

m.resize_with_threads()              # the parent's OpenCV pool now has threads
pid = os.fork()                      # what start_method="fork" (or a prefork server) does
if pid == 0:
    cv2.setNumThreads(1)             # a plain worker's thread limit
    os._exit(0)
deadline = time.monotonic() + 10.0
hung = True
while hung and time.monotonic() < deadline:
    hung = os.waitpid(pid, os.WNOHANG) == (0, 0)
    time.sleep(0.05)
if hung:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print({RESULT!r} + json.dumps({{"hung": hung}}))
"""


def test_opencv_thread_limit_hangs_in_a_child_forked_without_modelpool() -> None:
    """The control: forked after the parent ran OpenCV on threads, a child that limits
    OpenCV's threads (as any worker should) waits forever: the pool joins threads that the fork
    did not copy. (A limit that takes a moment is 10 s, not a hang: the call returns in
    microseconds when it works.)"""
    need_module("cv2")
    assert run_script(_CONTROL, timeout=60) == {"hung": True}


def test_opencv_model_in_a_forked_worker_after_the_parent_used_opencv_threads() -> None:
    """The same with ``start_method="fork"``: the worker inherits the parent's OpenCV, whose
    pool lists threads the fork did not copy; it answers, with OpenCV made sequential
    (resizing that pool to the budget would wait for those threads forever)."""
    need_module("cv2")
    result = run_script(POOL_SCRIPT, "fork", "5", "2", timeout=120)
    assert result["worker_cv2"] == 1
    assert result["same"] is True


def test_example_opencv_model() -> None:
    """examples/opencv_model.py runs, and says its workers made thumbnails on the budget."""
    need_module("cv2")
    out, _ = run_python([str(ROOT / "examples" / "opencv_model.py")], timeout=120, cwd=ROOT)
    assert "thumbnails: 4 of shape (64, 64, 3)\n" in out, out
    budget = max(1, _hygiene.usable_cores() // 2)
    assert f"OpenCV threads per worker: {budget} (budget {budget})\n" in out, out
    assert "same as a resize in this process: True\n" in out, out
