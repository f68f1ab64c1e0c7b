"""API and admin keys, compared in constant time."""

from __future__ import annotations

import enum
import hmac

from llmux.config import ServerConfig
from llmux.errors import AuthenticationFailed, PermissionDenied


class Access(enum.Enum):
    OPEN = "open"
    """/health: no key ever."""
    READ = "read"
    """/v1/*, /status, /metrics, /events, /: an api key (or an admin key) when keys are set."""
    ADMIN = "admin"
    """load, unload, logs: an admin key when admin keys are set, else as READ."""


def _matches(key: bytes, keys: list[bytes]) -> bool:
    # Compare against every key so the time does not depend on which one matched.
    found = False
    for k in keys:
        found |= hmac.compare_digest(key, k)
    return found


def bearer(authorization: str | None) -> bytes | None:
    """The token of ``Bearer <token>``, as bytes for the comparison, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode()


class Authenticator:
    def __init__(self, server: ServerConfig) -> None:
        self.update(server)

    def update(self, server: ServerConfig) -> None:
        """Take the keys of a (re)loaded config."""
        self.api_keys = [k.encode() for k in server.api_keys]
        self.admin_keys = [k.encode() for k in server.admin_keys]
        self._any_keys = self.api_keys + self.admin_keys

    def check_read(self, authorization: str | None) -> None:
        """``check(Access.READ, ...)``, for the hot path: READ is open when no api key is set;
        else any api or admin key will do. Raise AuthenticationFailed (401) or return."""
        if not self.api_keys:
            return
        key = bearer(authorization)
        if key is None:
            raise AuthenticationFailed("an API key is required (Authorization: Bearer)")
        if not _matches(key, self._any_keys):
            raise AuthenticationFailed("invalid API key")

    def check(self, access: Access, authorization: str | None) -> None:
        """Raise AuthenticationFailed (401) or PermissionDenied (403), or return."""
        if access is Access.OPEN:
            return
        if access is Access.READ:
            self.check_read(authorization)
            return
        key = bearer(authorization)
        if access is Access.ADMIN and self.admin_keys:
            if key is None:
                raise AuthenticationFailed("an admin API key is required (Authorization: Bearer)")
            if _matches(key, self.admin_keys):
                return
            if _matches(key, self.api_keys):
                raise PermissionDenied("this key may not load, unload or read logs")
            raise AuthenticationFailed("invalid API key")
        if not self._any_keys:
            return
        if key is None:
            raise AuthenticationFailed("an API key is required (Authorization: Bearer)")
        if _matches(key, self._any_keys):
            return
        raise AuthenticationFailed("invalid API key")
