"""The dashboard at `/ui`: server-rendered pages (Jinja2 templates in `templates/`) whose small
vanilla JS (`static/`) calls the JSON API. Everything is served by the API itself: no CDN, no
build step, works air-gapped. `install(app)` adds the pages and the static files."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api.ui.router import STATIC_DIR, router

__all__ = ["install"]


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
