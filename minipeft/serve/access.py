"""Who may ask `minipeft serve` what. Every request passes `check_site`, and all but the page's own files
`check`, before its body is read.

    Host    ─► on loopback, a loopback name only (a page whose DNS name rebinds to 127.0.0.1 is refused)
    Origin  ─► absent (curl, the openai client) or the Host itself (the page): a cross-site request is refused
    key     ─► with --api-key (or MINIPEFT_API_KEY): `Authorization: Bearer KEY`, else 401 as OpenAI says it
    admin   ─► loading from a path, training, deleting: on loopback as they are; beyond it, --allow-admin too
    paths   ─► only inside --adapter-dir, named relative to it; no reply shows an absolute path

Beyond loopback (--host 0.0.0.0, a LAN address) the server refuses to start without an API key.
"""

import hmac
import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import BadInput

KEY_VARIABLE = "MINIPEFT_API_KEY"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ADMIN = {("POST", "add_adapter"), ("DELETE", "delete_adapter"), ("POST", "tune"), ("DELETE", "cancel_tune")}


class Refused(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.code = status, code


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Access:
    def __init__(self, host: str, api_key=None, allow_admin=False, adapter_dir=None):
        self.key = api_key if api_key is not None else os.environ.get(KEY_VARIABLE) or None
        self.loopback = is_loopback(host)
        if not self.loopback and not self.key:
            raise BadInput(f"--host {host}: a server reachable beyond this machine needs --api-key KEY (or "
                           f"{KEY_VARIABLE})")
        if self.key is not None and len(self.key) < 8:
            raise BadInput("--api-key: expected at least 8 characters")
        self.admin = self.loopback or allow_admin
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir else None
        if self.adapter_dir and not self.adapter_dir.is_dir():
            raise BadInput(f"--adapter-dir {adapter_dir}: not a directory")

    def check_site(self, headers) -> None:
        """Raise Refused unless the request comes from a page of this server's own, or from no page at all."""
        host = headers.get("Host") or ""
        if self.loopback and (urlsplit("//" + host).hostname or "") not in LOOPBACK_NAMES:
            raise Refused(403, f"Host {host[:64]!r}: this server answers only to localhost", "bad_host")
        origin = headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != host:
            raise Refused(403, f"Origin {origin[:64]!r}: cross-site requests are refused", "bad_origin")

    def check(self, method: str, route: str, headers) -> None:
        """Raise Refused unless this caller may call `route` (an Api method's name)."""
        if self.key is not None:
            given = headers.get("Authorization") or ""
            if not hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
                raise Refused(401, "Incorrect API key provided: expected the header 'Authorization: Bearer KEY' "
                                   "with this server's --api-key", "invalid_api_key")
        if (method, route) in ADMIN and not self.admin:
            raise Refused(403, f"{method} on this route needs --allow-admin on a server beyond loopback",
                          "admin_only")

    def adapter_path(self, text: str) -> Path:
        """A path a caller named, inside --adapter-dir, or refused before anything on disk is looked at."""
        if self.adapter_dir is None:
            raise Refused(403, "path: loading an adapter from a path needs --adapter-dir DIR at start", "no_paths")
        relative = Path(text)
        if not text or relative.is_absolute() or ".." in relative.parts:
            raise Refused(400, "path: expected a directory relative to --adapter-dir, without '..'", "bad_path")
        path = (self.adapter_dir / relative).resolve()
        if not path.is_relative_to(self.adapter_dir):  # a symlink out of it
            raise Refused(400, "path: it leads outside --adapter-dir", "bad_path")
        return path

    def shown(self, text: str) -> str:
        """A message or source with --adapter-dir's absolute path taken out."""
        return text.replace(str(self.adapter_dir) + os.sep, "") if self.adapter_dir else text
