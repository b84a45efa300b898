"""The status page's web application: read-only pages, their JSON, and `/metrics`.

Flask serves it (waitress in `dbguard.web.server`); every route only reads the watcher's latest
snapshot. With a token (any address beyond loopback), every request must carry it: as
``?token=`` once (the page then keeps it in a cookie), or as ``Authorization: Bearer``.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, jsonify, request, send_file

from dbguard.lease.history import EVENTS
from dbguard.web.metrics import SiteMetrics
from dbguard.web.watch import SiteWatcher

STATIC = Path(__file__).with_name("static")
_COOKIE = "dbguard_token"


def create_app(watcher: SiteWatcher, metrics: SiteMetrics, token: str | None = None) -> Flask:
    app = Flask("dbguard.web", static_folder=str(STATIC), static_url_path="/static")

    @app.before_request
    def check_token() -> Response | None:
        if token is None:
            return None
        offered = (
            request.args.get("token")
            or request.cookies.get(_COOKIE)
            or request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        )
        if offered and hmac.compare_digest(offered.encode(), token.encode()):
            return None
        return Response(
            "This status page is served beyond loopback and needs its token: open the address that "
            "`dbguard web` (or `dbguard up`) printed, which ends in ?token=..., or send the token of "
            "the file web.token in the broker's state directory as 'Authorization: Bearer TOKEN'.\n",
            status=401,
            mimetype="text/plain",
        )

    @app.after_request
    def harden(response: Response) -> Response:
        # Read-only and self-contained: nothing from elsewhere, no framing, no sniffing.
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        offered = request.args.get("token")
        if token is not None and offered and hmac.compare_digest(offered.encode(), token.encode()):
            response.set_cookie(_COOKIE, token, httponly=True, samesite="Strict")
        return response

    @app.get("/")
    @app.get("/project/<path:project>")
    def page(project: str | None = None) -> Response:
        return send_file(STATIC / "page.html", mimetype="text/html")

    @app.get("/api/site")
    def site() -> Response:
        return jsonify(watcher.snapshot())

    @app.get("/api/project/<path:project>")
    def one_project(project: str) -> Response:
        found = watcher.project(project)
        if found is None:
            abort(404, description=f"the lease service knows no project {project}")
        return jsonify(found)

    @app.get("/api/events")
    def event_kinds() -> Response:
        return jsonify(EVENTS)

    @app.get("/metrics")
    def scrape() -> Response:
        return Response(metrics.text(), mimetype="text/plain; version=0.0.4; charset=utf-8")

    @app.errorhandler(404)
    def not_found(error: Any) -> Response:
        return Response(f"{getattr(error, 'description', 'not found')}\n", status=404, mimetype="text/plain")

    return app
