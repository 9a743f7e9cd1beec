"""The model server: the Open Inference Protocol (KServe v2 REST) over aiohttp.

``serve(config)`` runs it until SIGTERM / Ctrl+C (what ``modelpool serve`` does);
``Server(config).app()`` is the aiohttp application, for embedding or tests.
"""

from ._app import Server
from ._main import serve
from ._served import ServedModel

__all__ = ["ServedModel", "Server", "serve"]
