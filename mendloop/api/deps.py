"""What routes get: the App built by `app.py`, from `request.app.state`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from mendloop.app import App


def get_app(request: Request) -> App:
    app: App = request.app.state.mendloop
    return app


AppDep = Annotated[App, Depends(get_app)]
