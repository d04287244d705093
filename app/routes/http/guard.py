"""What a hostile web page can still try against a tester on 127.0.0.1, refused before any route runs.

- **DNS rebinding.** A page on evil.example whose name is made to resolve to 127.0.0.1 reaches
  this server as if same-origin, but its requests still say ``Host: evil.example``. Only the
  loopback names, the bound host and ``server.allowed_hosts`` are served; any other Host is a 400
  (as Jupyter, llama-server and Ollama do).
- **Cross-site requests (CSRF).** A page on another site can send a "simple" POST (text/plain or
  multipart, no preflight) with the user's browser. Every state-changing request that carries an
  ``Origin`` must come from this server's own origin or a configured CORS origin; without an
  Origin, a browser's ``Sec-Fetch-Site: cross-site`` is refused too. Clients that are not
  browsers (curl, the openai SDK) send neither and pass. JSON bodies must also say they are JSON
  (body.py answers 415 otherwise), so a simple request cannot carry one.
- **Framing and sniffing.** Every answer says ``X-Frame-Options: DENY``,
  ``X-Content-Type-Options: nosniff`` and a Content-Security-Policy the page satisfies (its
  scripts are modules served from here; nothing inline).
"""
from __future__ import annotations

import logging
from typing import Iterable

from flask import Flask, request

from app.routes.http.errors import error_response

log = logging.getLogger(__name__)

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# The API docs page runs Swagger UI, whose bundle starts itself from one inline script and sets styles inline.
DOCS_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port; IPv6 literals lose their brackets."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def origin_of(url: str) -> str:
    return url.strip().rstrip("/").lower()


def install_guard(app: Flask, bound_host: str, allowed_hosts: Iterable[str], cors_origins: Iterable[str]) -> None:
    hosts = {name.lower().strip("[]") for name in allowed_hosts}
    any_host = "*" in hosts
    hosts |= LOOPBACK_NAMES
    if bound_host not in ("0.0.0.0", "::", ""):
        hosts.add(bound_host.lower().strip("[]"))
    trusted_origins = {origin_of(origin) for origin in cors_origins}

    @app.before_request
    def check_host_and_origin():
        name = host_name(request.host or "")
        if not any_host and name not in hosts:
            log.warning("refused a request for host %r (not in server.allowed_hosts)", request.host)
            return error_response(400, f"this server does not answer to host {name!r}; its operator can allow it with "
                                  f"MODEL_TEST_SERVER__ALLOWED_HOSTS", "host_not_allowed")
        if request.method in SAFE_METHODS:
            return None
        origin = request.headers.get("Origin")
        if origin is not None:
            own = origin_of(f"{request.scheme}://{request.host}")
            if origin_of(origin) != own and origin_of(origin) not in trusted_origins and "*" not in trusted_origins:
                log.warning("refused a %s %s from origin %r", request.method, request.path, origin)
                return error_response(403, f"requests from {origin} are not allowed; the server's operator can allow that "
                                      f"site with MODEL_TEST_SERVER__CORS_ORIGINS", "origin_not_allowed")
        elif request.headers.get("Sec-Fetch-Site") == "cross-site":
            return error_response(403, "cross-site requests are not allowed", "origin_not_allowed")
        return None

    @app.after_request
    def security_headers(response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        policy = DOCS_POLICY if request.path == "/docs" else PAGE_POLICY
        response.headers.setdefault("Content-Security-Policy", policy)
        return response
