"""The dashboard at `/ui`: server-rendered pages (Jinja2 templates in `templates/`) whose small
vanilla JS (`static/`) calls the JSON API. Everything is served by the API itself: no CDN, no
build step, works air-gapped. `install(app)` adds the pages, the static files and `/` (a
redirect to `/ui`)."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from api.ui.router import STATIC_DIR, router

__all__ = ["install"]


def install(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        """A browser opening the service's address lands on the dashboard."""
        return RedirectResponse("/ui", status_code=307)

    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
