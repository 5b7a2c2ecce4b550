"""A prediction service with a web page: `vitkit serve MODEL`.

Starlette (the ASGI toolkit under FastAPI: routing, multipart uploads, lifespan, one dependency besides anyio)
and uvicorn (the reference ASGI server) are small, well kept and enough here; FastAPI would add pydantic and
request models this service does not need. Both are imported only when a service is built (the `serve` extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..models import VisionTransformer

__all__ = ["serve"]


def serve(
    model: VisionTransformer,
    host: str = "127.0.0.1",
    port: int = 8000,
    access_log: bool = False,
    **options: Any,
) -> None:
    """Serve `model` over HTTP until interrupted (Ctrl-C or SIGTERM end it cleanly).

    Args:
        model: the model to serve.
        host: the address to listen on; loopback by default, so nothing outside this machine can reach it
            unless asked (e.g. host="0.0.0.0").
        port: the TCP port.
        access_log: log one line per request.
        **options: `vitkit.serve.app.create_app` options (max_batch, max_wait_ms, max_queue, limits, name,
            precision, flip).

    Raises:
        ImportError: starlette, uvicorn or python-multipart is not installed.
    """
    try:
        import python_multipart  # noqa: F401  (starlette parses multipart uploads with it)
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise ImportError(
            f"vitkit serve needs the 'serve' extra ({e.name} is missing): "
            "pip install -c constraints.txt 'vitkit[serve]'"
        ) from None
    app = create_app(model, **options)
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="info")
