"""Who may do what, for every combination of configured keys (README, "Configuration"):
``/health`` is open; reading (``/v1/*``, ``/status``, ...) needs an api key or an admin key
once api keys are set; load/unload/logs need an admin key once admin keys are set, else they
are treated as reading. The hot path's ``check_read`` must agree with ``check``."""

from __future__ import annotations

import pytest

from llmux.api.auth import Access, Authenticator
from llmux.config import ServerConfig
from llmux.errors import AuthenticationFailed, PermissionDenied

API, ADMIN = "user-key", "admin-key"
HEADERS = {
    "none": None,
    "api": f"Bearer {API}",
    "admin": f"Bearer {ADMIN}",
    "wrong": "Bearer nope",
    "not bearer": f"Basic {API}",
    "empty token": "Bearer  ",
}
OK, E401, E403 = "ok", "401", "403"

# (api_keys, admin_keys) -> access -> header -> outcome
TABLE: dict[tuple[bool, bool], dict[Access, dict[str, str]]] = {
    (False, False): {
        Access.READ: dict.fromkeys(HEADERS, OK),
        Access.ADMIN: dict.fromkeys(HEADERS, OK),
    },
    (True, False): {
        Access.READ: {**dict.fromkeys(HEADERS, E401), "api": OK},
        Access.ADMIN: {**dict.fromkeys(HEADERS, E401), "api": OK},
    },
    (False, True): {
        Access.READ: dict.fromkeys(HEADERS, OK),  # no api keys: reading stays open
        Access.ADMIN: {**dict.fromkeys(HEADERS, E401), "admin": OK},
    },
    (True, True): {
        Access.READ: {**dict.fromkeys(HEADERS, E401), "api": OK, "admin": OK},
        Access.ADMIN: {**dict.fromkeys(HEADERS, E401), "admin": OK, "api": E403},
    },
}


def outcome(call: object, *args: object) -> str:
    assert callable(call)
    try:
        call(*args)
    except AuthenticationFailed:
        return E401
    except PermissionDenied:
        return E403
    return OK


@pytest.mark.parametrize("keys", list(TABLE), ids=lambda k: f"api={k[0]},admin={k[1]}")
def test_access_table(keys: tuple[bool, bool]) -> None:
    has_api, has_admin = keys
    auth = Authenticator(
        ServerConfig(api_keys=[API] if has_api else [], admin_keys=[ADMIN] if has_admin else [])
    )
    for access, expected in TABLE[keys].items():
        for name, header in HEADERS.items():
            assert outcome(auth.check, access, header) == expected[name], (access, name)
            assert outcome(auth.check, Access.OPEN, header) == OK
        for name, header in HEADERS.items():
            assert outcome(auth.check_read, header) == TABLE[keys][Access.READ][name], name


def test_keys_follow_a_reload() -> None:
    auth = Authenticator(ServerConfig(api_keys=[API]))
    auth.check_read(f"Bearer {API}")
    auth.update(ServerConfig(api_keys=["new-key"]))
    with pytest.raises(AuthenticationFailed):
        auth.check_read(f"Bearer {API}")
    auth.check_read("Bearer new-key")
