"""What routes get: the App built by `app.py`, from `request.app.state`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Depends, Query, Request

from mendloop.app import App


async def get_app(request: Request) -> App:
    # async: FastAPI runs a plain `def` dependency in its threadpool, a thread hop on every request.
    app: App = request.app.state.mendloop
    return app


AppDep = Annotated[App, Depends(get_app)]


def route_path(scope: Mapping[str, Any]) -> str:
    """The request's path inside the app, without the proxy's prefix (`root_path`): uvicorn puts the prefix back
    in front of the path it was given, so `/health` behind `/mendloop` arrives as `/mendloop/health`."""
    path: str = scope["path"]
    root: str = scope.get("root_path") or ""
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root) :] or "/"
    return path


def prefixed(request: Request, path: str) -> str:
    """`path` (absolute inside the app) as the browser must ask for it: behind the proxy's prefix."""
    return (request.scope.get("root_path") or "") + path


# Paging, the same on every list.
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000)]
# Keyset paging: the `next_cursor` of the page before. It costs the same however deep the page is; an offset walks
# past every item before it.
Cursor = Annotated[
    str | None,
    Query(max_length=500, description="Start after the last item of a page: pass that page's `next_cursor`"),
]
