"""The ``modelpool`` command: a thin skin over the library.

Exit statuses, the same for every subcommand (docs/server.md, "Exit status"): 0 done or
stopped cleanly, 1 a failure while running, 2 a usage error (a bad option, configuration file
or model import string: nothing was started), 130 interrupted (Ctrl+C). Messages start with
``Error: ``, as click's own usage errors do.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import click

from . import __version__
from .demo import MODEL as DEMO_MODEL

if TYPE_CHECKING:
    from .config import Config

EXIT_USAGE = 2  # as click's UsageError
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class _UsageError(click.ClickException):
    """A wrong configuration: ``Error: <message>`` and exit status 2, without click's usage
    banner (the message says which file and field are wrong)."""

    exit_code = EXIT_USAGE


class _Commands(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # click alone would say "Aborted!" and exit 1
            click.echo("\nInterrupted.", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


@click.group(cls=_Commands)
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
    click.echo(f"starting {workers} workers on {DEMO_MODEL} ...")
    t0 = time.perf_counter()
    with Pool(DEMO_MODEL, workers=workers) as pool:
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


#: ``serve`` options that set the ``server:`` section (and override a file's)
SERVER_FLAGS = (
    "host",
    "port",
    "grpc_port",
    "access_log",
    "log_level",
    "log_format",
    "loop",
    "fronts",
)


@main.command()
@click.argument("target", required=False)
@click.option("--name", help="Model name in URLs (one model; default: the class name).")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes (one model).")
@click.option("--host", help="Address to bind (default 127.0.0.1: this machine only).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port to bind (default 8000).")
@click.option(
    "--grpc-port",
    type=click.IntRange(0, 65535),
    help="Also serve gRPC (GRPCInferenceService) on this port (default: off).",
)
@click.option("--max-batch-size", type=click.IntRange(min=1), help="Rows per batch (1 = off).")
@click.option("--max-batch-delay", type=click.FloatRange(min=0), help="Seconds to fill a batch.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Seconds per request.")
@click.option("--threads-per-worker", type=click.IntRange(min=1), help="Threads per worker.")
@click.option("--start-method", type=click.Choice(["forkserver", "spawn", "fork"]))
@click.option("--max-queue", type=click.IntRange(min=1), help="Queued requests before 503.")
@click.option(
    "--option", "options", multiple=True, metavar="KEY=VALUE", help="Model option (repeatable)."
)
@click.option(
    "--access-log",
    metavar="on|off|FRACTION",
    help="Request access log: on, off (default), or the share of requests to log, e.g. 0.1.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Least severe log records written (default info).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"], case_sensitive=False),
    help="text (default) or json: one JSON object per line, for log collectors.",
)
@click.option(
    "--loop",
    type=click.Choice(["auto", "asyncio", "uvloop"], case_sensitive=False),
    help="Event loop: auto (default: uvloop if installed), asyncio, or uvloop.",
)
@click.option(
    "--fronts",
    type=click.IntRange(1, 256),
    help="HTTP front processes sharing the port, each with its share of the workers (default 1).",
)
@click.option(
    "--reload",
    is_flag=True,
    help="For development: reload the configuration file and the models' source files when "
    "they change (a model whose new code fails keeps its old code serving).",
)
@click.option(
    "--auth/--no-auth",
    "auth",
    default=None,
    help="Require an API key or a login (as an auth: section), or explicitly serve without "
    "(as auth: {enabled: false}); needed to bind an address other machines can reach.",
)
def serve(target: str | None, **flags: object) -> None:
    """Serve models over HTTP (Open Inference Protocol / KServe v2, Triton-compatible).

    TARGET is a modelpool YAML file, or a model class 'pkg.module:Class'. With no TARGET, the
    built-in demo model (an Iris classifier, no download) is served.
    """
    import os

    from .config import ConfigError
    from .server import serve as run_server

    sys.path.insert(0, os.getcwd())  # models next to the command, as `python -m` would
    reload = bool(flags.pop("reload", False))
    given = dict(flags)
    try:
        config = _serve_config(target, flags)
    except ConfigError as exc:
        raise _UsageError(str(exc)) from None
    reread = None
    watch: str | bool = reload
    if target is not None and os.path.isfile(target):  # SIGHUP reads it again
        reread = lambda: _serve_config(target, dict(given))  # noqa: E731
        watch = target if reload else False
    sys.exit(run_server(config, reread=reread, watch=watch))


def _serve_config(target: str | None, flags: dict[str, object]) -> Config:
    """The Config for ``modelpool serve``: from a file, one import string, or the demo;
    ``--auth`` / ``--no-auth`` turn authentication on or off over the file's."""
    auth = flags.pop("auth", None)
    config = _config_for(target, flags)
    return config if auth is None else config.with_auth(bool(auth))


def _config_for(target: str | None, flags: dict[str, object]) -> Config:
    import os

    import yaml

    from .config import Config, ConfigError, load_config

    server = {k: flags.pop(k) for k in SERVER_FLAGS if k in flags}
    server = {k: v for k, v in server.items() if v is not None}
    name = flags.pop("name")
    options: dict[str, object] = {}
    for item in flags.pop("options") or ():  # type: ignore[attr-defined]
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {item!r}: write KEY=VALUE")
        options[key] = yaml.safe_load(value)
    settings = {k: v for k, v in flags.items() if v is not None}
    if options:
        settings["options"] = options
    if target is not None and (target.endswith((".yaml", ".yml")) or os.path.isfile(target)):
        given = [f"--{k.replace('_', '-')}" for k in settings] + (["--name"] if name else [])
        if given:
            raise ConfigError(
                f"{target}: {', '.join(given)} apply to one model given as 'pkg.module:Class'; "
                "set them in the file instead (only --host, --port, --grpc-port, --loop, "
                "--fronts and the logging options override a file)"
            )
        config = load_config(target)
        return config.with_server(server) if server else config
    model = target or DEMO_MODEL
    if ":" not in model:
        raise ConfigError(
            f"{model!r} is neither a YAML file nor an import string; pass modelpool.yaml or "
            "'package.module:ClassName'"
        )
    default_name = "iris" if target is None else model.rsplit(":", 1)[1]
    if target is None:
        settings.setdefault("workers", 2)
    data = {"server": server, "models": {name or default_name: {"model": model, **settings}}}
    return Config.from_mapping(data, "command line")


def _add_auth_commands() -> None:
    from .auth._cli import db, keys, users

    for group in (users, keys, db):
        main.add_command(group)


_add_auth_commands()


def _add_doctor() -> None:
    from .doctor._cli import doctor

    main.add_command(doctor)


_add_doctor()


def _add_models() -> None:
    from ._models_cli import models

    main.add_command(models)


_add_models()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
