"""``modelpool models list|load|unload``: a running server's model repository, over HTTP.

They call the server's repository API (docs/server.md, "Models while the server runs"), so
they work against any server that speaks it (Triton's included). ``--url`` (or
``MODELPOOL_URL``) says where; ``--api-key`` (or ``MODELPOOL_API_KEY``) is sent as a bearer
key, which must be an admin's for load and unload when authentication is on. A refusal prints
the server's message and exits 1; a server that cannot be reached, too.
"""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import quote, urlsplit

import click
import yaml

__all__ = ["models"]

_URL = click.option(
    "--url",
    envvar="MODELPOOL_URL",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="The server (also $MODELPOOL_URL).",
)
_KEY = click.option(
    "--api-key", envvar="MODELPOOL_API_KEY", help="An API key (also $MODELPOOL_API_KEY)."
)
_TIMEOUT = 600.0  # a load waits for the model's workers to be ready


def _call(url: str, key: str | None, path: str, body: dict[str, Any] | None = None) -> Any:
    """POST ``path``; the answer's JSON. A non-200 answer or no answer: a ClickException."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.UsageError(f"--url must look like http://host:port, got {url!r}")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=_TIMEOUT)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key.strip()}"
    data = json.dumps(body).encode() if body is not None else b""
    try:
        conn.request("POST", parts.path.rstrip("/") + path, body=data, headers=headers)
        response = conn.getresponse()
        text = response.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as exc:
        raise click.ClickException(
            f"could not reach {url} ({type(exc).__name__}: {exc}); is the server running "
            "there? (--url, $MODELPOOL_URL)"
        ) from None
    finally:
        conn.close()
    try:
        doc = json.loads(text) if text else {}
    except ValueError:
        doc = {"error": text[:2000]}
    if response.status != 200:
        message = doc.get("error", text) if isinstance(doc, dict) else text
        raise click.ClickException(f"HTTP {response.status}: {message}")
    return doc


@click.group()
def models() -> None:
    """List, load and unload the models of a running server."""


@models.command("list")
@_URL
@_KEY
@click.option("--json", "as_json", is_flag=True, help="Print the index as JSON.")
def list_models(url: str, api_key: str | None, as_json: bool) -> None:
    """Every model the server knows, with its version and state."""
    index = _call(url, api_key, "/v2/repository/index", {})
    if as_json:
        click.echo(json.dumps(index, indent=2))
        return
    width = max([len("MODEL"), *(len(str(e.get("name", ""))) for e in index)])
    click.echo(f"{'MODEL':{width}}  {'VERSION':7}  {'STATE':11}  REASON")
    for entry in index:
        click.echo(
            f"{entry.get('name', ''):{width}}  {entry.get('version', ''):7}  "
            f"{entry.get('state', ''):11}  {entry.get('reason', '')}".rstrip()
        )


@models.command()
@click.argument("name")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="The model's settings, a YAML (or JSON) mapping as under models.NAME in the "
    "server's file. Without it, the server loads the model as it is configured.",
)
@click.option("--model", "model_ref", help="Shorthand for a config of just model: CLASS.")
@click.option(
    "--default-version",
    help="The version unversioned requests go to. Alone, of a loaded model: switch them to "
    "that (loaded) version, restarting nothing.",
)
@_URL
@_KEY
def load(
    name: str,
    config_file: str | None,
    model_ref: str | None,
    default_version: str | None,
    url: str,
    api_key: str | None,
) -> None:
    """Load model NAME (reload it, when it is loaded), and wait until it serves. With a
    config, only its new or changed versions start; without, every version restarts."""
    settings: dict[str, Any] = {}
    if config_file is not None:
        with open(config_file) as f:
            loaded = yaml.safe_load(f)
        if not isinstance(loaded, dict):
            raise click.UsageError(f"{config_file}: the model's settings must be a mapping")
        settings.update(loaded)
    if model_ref is not None:
        settings["model"] = model_ref
    parameters: dict[str, Any] = {"config": settings} if settings else {}
    if default_version is not None:
        parameters["default_version"] = default_version
    body = {"parameters": parameters} if parameters else {}
    _call(url, api_key, f"/v2/repository/models/{quote(name, safe='')}/load", body)
    if default_version is not None and not settings:
        click.echo(f"model {name!r}: unversioned requests go to version {default_version!r}")
    else:
        click.echo(f"model {name!r} loaded")


@models.command()
@click.argument("name")
@click.option("--version", help="Unload this version alone (not the default one).")
@_URL
@_KEY
def unload(name: str, version: str | None, url: str, api_key: str | None) -> None:
    """Unload model NAME: its requests in flight finish, later ones get 404."""
    body = {"parameters": {"version": version}} if version is not None else {}
    _call(url, api_key, f"/v2/repository/models/{quote(name, safe='')}/unload", body)
    what = f"version {version!r} of model {name!r}" if version else f"model {name!r}"
    click.echo(f"{what} unloaded")
