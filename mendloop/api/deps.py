"""What routes get: the App built by `app.py`, from `request.app.state`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from mendloop.app import App


async def get_app(request: Request) -> App:
    # async: FastAPI runs a plain `def` dependency in its threadpool, a thread hop on every request.
    app: App = request.app.state.mendloop
    return app


AppDep = Annotated[App, Depends(get_app)]

# Paging, the same on every list.
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000)]
# Keyset paging: the `next_cursor` of the page before. It costs the same however deep the page is; an offset walks
# past every item before it.
Cursor = Annotated[
    str | None,
    Query(max_length=500, description="Start after the last item of a page: pass that page's `next_cursor`"),
]
