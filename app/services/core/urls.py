"""URLs as they may be shown: in answers (even the public /health), logs and saved results. A
server URL can carry credentials (``http://user:secret@host/v1``) or a key in its query
(``?api_key=...``); what is shown keeps the scheme, host, port and path, and says that there was
more without repeating it."""
from __future__ import annotations

from typing import Optional
from urllib.parse import urlsplit, urlunsplit

HIDDEN = "***"


def redacted_url(url: Optional[str]) -> str:
    """``url`` without its user name and password, and with every query and fragment value hidden."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # no URL one could show safely: say only that one was given
        return "(a URL that does not parse)"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = (f"{HIDDEN}@" if parts.username is not None or parts.password is not None else "") + host
    if port is not None:
        netloc += f":{port}"
    # a name=value pair keeps its name (api-version says what it is); a bare part may be the token itself
    query = "&".join(f"{part.partition('=')[0]}={HIDDEN}" if "=" in part else HIDDEN
                     for part in parts.query.split("&") if part)
    return urlunsplit((parts.scheme, netloc, parts.path, query, HIDDEN if parts.fragment else ""))


def scrubbed(text: str, url: Optional[str]) -> str:
    """``text`` (an exception's message, say) with ``url``'s password and query values taken out,
    wherever a library quoted them."""
    if not url:
        return text
    try:
        parts = urlsplit(url)
    except ValueError:
        return text
    secrets = [parts.password or "", *(part.partition("=")[2] or part for part in parts.query.split("&") if part)]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    return text
