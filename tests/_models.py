"""Models used by the tests. Importable by workers (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import time
from typing import Any

import numpy as np

import modelpool


class Echo(modelpool.Model):
    """Returns its inputs, plus facts about the worker that served them."""

    def predict(self, inputs: Any) -> Any:
        return inputs


class Doubler(modelpool.Model):
    inputs = [modelpool.TensorSpec("x", "FP32", [-1, 4])]
    outputs = [modelpool.TensorSpec("y", "FP32", [-1, 4])]

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"] * 2}


class WhoAmI(modelpool.Model):
    """Answers with the worker's info, RNG draws and thread settings."""

    def __init__(self, **options: Any) -> None:  # deliberately no super().__init__
        self.opts = options

    def predict(self, inputs: Any) -> Any:
        info = modelpool.worker_info()
        out: dict[str, Any] = {
            "info": info,
            "pid": os.getpid(),
            "random": random.random(),
            "numpy": float(np.random.random()),
            "env": {
                k: os.environ.get(k)
                for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
            },
            "options": self.opts,
        }
        from threadpoolctl import threadpool_info

        out["pools"] = {i["internal_api"]: i["num_threads"] for i in threadpool_info()}
        if inputs == "torch":
            import torch

            out["torch"] = float(torch.rand(1))
            out["torch_threads"] = torch.get_num_threads()
        if inputs == "sleep":
            time.sleep(0.2)
        return out


def _die(how: str) -> None:
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "sigsegv":
        ctypes.string_at(0)  # a real segfault in native code
    elif how == "exit":
        os._exit(7)
    elif how == "raise":
        raise RuntimeError("boom on purpose")
    elif how == "hang":
        time.sleep(3600)


class Crashy(modelpool.Model):
    """Dies in the way and at the stage named by its options / inputs."""

    def __init__(self, **options: Any) -> None:
        self.stage = options.get("stage")
        self.how = options.get("how", "raise")

    def setup(self) -> None:
        if self.stage == "setup":
            _die(self.how)

    def predict(self, inputs: Any) -> Any:
        if isinstance(inputs, dict):
            if "die" in inputs:
                _die(str(np.asarray(inputs["die"]).ravel()[0]))
            if "die_encode" in inputs:
                return {"out": _DiesWhenPickled(str(inputs["die_encode"]))}
            if "die_once" in inputs:  # crash the first worker that sees this marker path
                path = str(inputs["die_once"])
                if not os.path.exists(path):
                    open(path, "w").close()
                    _die("sigkill")
        if self.stage == "predict":
            _die(self.how)
        return {"pid": os.getpid()}


class _DiesWhenPickled:
    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> Any:
        _die(self.how)
        return (str, ("unreachable",))


class SlowSetup(modelpool.Model):
    def __init__(self, **options: Any) -> None:
        self.seconds = float(options.get("seconds", 1.0))
        self.marker = options.get("marker")

    def setup(self) -> None:
        if self.marker:
            with open(self.marker, "a") as f:
                f.write(f"{os.getpid()}\n")
        time.sleep(self.seconds)

    def predict(self, inputs: Any) -> Any:
        return os.getpid()


class Teardown(modelpool.Model):
    """Appends to a file on teardown so tests can see it ran."""

    def __init__(self, **options: Any) -> None:
        self.path = options["path"]

    def predict(self, inputs: Any) -> Any:
        if inputs == "slow":
            time.sleep(0.5)
        return os.getpid()

    def teardown(self) -> None:
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")


class Leaky(modelpool.Model):
    """Grows its RSS by ``mb`` MiB per request."""

    def setup(self) -> None:
        self.hoard: list[bytearray] = []

    def predict(self, inputs: Any) -> Any:
        self.hoard.append(bytearray(int(inputs) * 1024 * 1024))
        return os.getpid()


class Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:  # rebuilt with one arg: fails to unpickle
        super().__init__(f"{a}-{b}")


class Raiser(modelpool.Model):
    def predict(self, inputs: Any) -> Any:
        if inputs == "value":
            raise ValueError("bad value 42")
        if inputs == "unpicklable":
            raise Unpicklable(1, 2)
        if inputs == "lock":
            import threading

            return {"lock": threading.Lock()}
        return "ok"


class TorchModel(modelpool.Model):
    def setup(self) -> None:
        import torch

        self.torch = torch
        self.layer = torch.nn.Linear(4, 2)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        x = torch.from_numpy(inputs["x"])  # warns if the array is read-only
        x.add_(1)  # in place: needs a writable buffer
        with torch.no_grad():
            y = self.layer(x)
        return {"y": y.numpy(), "threads": np.array(torch.get_num_threads())}


class FailSlot(modelpool.Model):
    """setup() fails in worker slot ``bad_index``, or once overall (``fail_once`` marker)."""

    def __init__(self, **options: Any) -> None:
        self.options = options

    def setup(self) -> None:
        info = modelpool.worker_info()
        assert info is not None
        if info.index == self.options.get("bad_index"):
            raise RuntimeError(f"slot {info.index} cannot load")
        marker = self.options.get("fail_once")
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("transient failure")

    def predict(self, inputs: Any) -> Any:
        info = modelpool.worker_info()
        assert info is not None
        return info.index


class BatchProbe(modelpool.Model):
    """y = 2x, plus, per row, the size and dtype of the batch that row ran in."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        n = x.shape[0]
        if float(x.sum()) < 0:  # a negative input: sleep that many tenths of a second
            time.sleep(-float(x.min()) / 10)
        return {
            "y": x * 2,
            "batch": np.full(n, n),
            "dtype": np.full(n, x.dtype.str),
        }


class WrongRows(modelpool.Model):
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"][:-1]}  # one row short


class Limited(modelpool.Model):
    max_batch_size = 4

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"n": np.full(inputs["x"].shape[0], inputs["x"].shape[0])}


class ForksHelper(modelpool.Model):
    """predict forks a helper process that inherits the worker's sockets, then hangs."""

    def predict(self, inputs: Any) -> Any:
        pid = os.fork()
        if pid == 0:  # the helper: holds every inherited descriptor for a while
            time.sleep(float(inputs))
            os._exit(0)
        time.sleep(3600)
        return None


class Stagger(modelpool.Model):
    """Records when its setup starts and ends (to see loads overlap or not); slow predict."""

    def __init__(self, **options: Any) -> None:
        self.path = options["path"]

    def setup(self) -> None:
        start = time.monotonic()
        time.sleep(0.3)
        with open(self.path, "a") as f:
            f.write(f"{start} {time.monotonic()}\n")

    def predict(self, inputs: Any) -> Any:
        time.sleep(float(inputs))
        return os.getpid()


class Gate(modelpool.Model):
    """y = 2x; a request with a negative input waits until the file ``path`` exists (a gate
    the test opens, so workers stay busy exactly as long as the test needs). With ``record``,
    each predict appends "pid x" lines to that file (what ran where)."""

    def __init__(self, **options: Any) -> None:
        self.path = options["path"]
        self.record = options.get("record")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if self.record:
            with open(self.record, "a") as f:
                f.writelines(f"{os.getpid()} {float(v)}\n" for v in x.ravel())
        if float(x.min()) < 0:
            deadline = time.monotonic() + 120
            while not os.path.exists(self.path) and time.monotonic() < deadline:
                time.sleep(0.005)
        return {"y": x * 2}


def wait_for_path(path: str, timeout: float = 120.0) -> bool:
    """For ``pool.submit``: keep a worker busy until the file ``path`` exists (a gate the test
    opens when it is ready), at most ``timeout`` s. True if the gate opened."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


class ForksHelperToFile(modelpool.Model):
    """Like ``ForksHelper``, but the helper writes its pid to ``inputs["path"]`` and lives until
    the file ``path + ".stop"`` exists (at most ``inputs["seconds"]``), so a test can give it a
    long life and still end it."""

    def predict(self, inputs: Any) -> Any:
        seconds, path = float(inputs["seconds"]), str(inputs["path"])
        if os.fork() == 0:  # the helper: holds every inherited descriptor for a while
            try:
                with open(path + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.replace(path + ".tmp", path)
                wait_for_path(path + ".stop", seconds)
            finally:
                os._exit(0)
        time.sleep(3600)
        return None


class RequestIdEcho(modelpool.Model):
    """Answers ``modelpool.request_id()`` for each row (a batch's ids joined by ',')."""

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        rid = modelpool.request_id() or ""
        return {"rid": np.array([rid] * len(inputs["x"]), dtype=object)}


class PortPerWorker(modelpool.Model):
    """Listens on a port of its own from ``setup()`` on (a metrics or side-channel server):
    ``base + index``, which collides while a recycled worker and its replacement overlap, or
    with ``use_lane``, ``base + 2 * index + lane``, which does not."""

    def __init__(self, base: int, use_lane: bool = False) -> None:
        self.base = base
        self.use_lane = use_lane

    def setup(self) -> None:
        import socket

        info = modelpool.worker_info()
        assert info is not None
        self.port = self.base + (2 * info.index + info.lane if self.use_lane else info.index)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", self.port))  # OSError: Address already in use
        self.sock.listen()

    def predict(self, inputs: Any) -> Any:
        info = modelpool.worker_info()
        assert info is not None
        return {"pid": info.pid, "generation": info.generation, "lane": info.lane}

    def teardown(self) -> None:
        self.sock.close()


class LoadsOnce(modelpool.Model):
    """The first worker of each slot loads; every replacement's ``setup()`` fails."""

    def setup(self) -> None:
        info = modelpool.worker_info()
        assert info is not None
        if info.generation > 0:
            raise RuntimeError(f"replacement {info.generation} cannot load on purpose")

    def predict(self, inputs: Any) -> Any:
        return os.getpid()


class FrozenDoubler(Doubler):
    """``Doubler`` whose output is read-only in the worker (as an array over ``bytes``, or one a
    library marks read-only, would be): only the transport can make it writable."""

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        y = inputs["x"] * 2
        y.flags.writeable = False
        return {"y": y}


class Journal(modelpool.Model):
    """Appends a line per row of ``x`` to the file ``path``, as the rows run: the row's first
    value and the number of rows it ran with (its batch's size)."""

    def __init__(self, **options: Any) -> None:
        self.path = options["path"]

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with open(self.path, "a") as f:
            f.writelines(f"{int(row.ravel()[0])} {len(x)}\n" for row in x)
        return {"y": x * 2}


def started_then_wait(started: str, gate: str, timeout: float = 120.0) -> int:
    """For ``pool.submit``: tell the test this request is running (the file ``started``, holding
    the worker's pid), then hold the worker until the file ``gate`` exists, like
    ``wait_for_path``. Returns the worker's pid."""
    with open(started + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(started + ".tmp", started)
    if not wait_for_path(gate, timeout):
        raise TimeoutError(f"the gate {gate} never opened")
    return os.getpid()
