"""Auth: only clients with a signed token get in, and their user id comes from the token.

Connect to ``/ws/auth?token=TOKEN``. A token is ``USER.ROLE.SIGNATURE``, the signature being the
HMAC-SHA256 of ``USER.ROLE`` under a secret only the server (and whatever issues tokens) knows:
``make_token("ann")`` makes one. ``extract_meta`` checks it before the WebSocket upgrade, so a
missing or forged token gets ``401`` over plain HTTP and no room code ever runs for it. The
user id and role in the socket's meta are the token's; a ``?userId=`` in the query is ignored.
``whoami`` answers ``whoami {userId, role}``. ``python rooms/auth.py ann [admin]`` prints a token.

The secret is the environment variable ``VERANI_AUTH_SECRET``; without it a fixed development
secret is used (and logged), with which anyone can make tokens. Browsers cannot set headers on
a WebSocket, hence the query string: serve over TLS, and keep request URLs out of shared logs.
These tokens never expire; a real deployment would sign an expiry too (or use JWTs).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import sys
import uuid
from typing import Any

import attrs

from verani import ConnectionMeta, HandshakeRefused, HandshakeRequest, RoomContext, define_room

log = logging.getLogger("rooms.auth")

SECRET_ENV = "VERANI_AUTH_SECRET"
DEV_SECRET = "verani-dev-secret-do-not-use-in-production"
#: User ids and roles: no "." (the token's separator), nothing a URL needs to escape.
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

if SECRET_ENV not in os.environ:
    log.warning("%s is not set: using the development secret; anyone can forge tokens", SECRET_ENV)


# eq=False as ConnectionMeta's: a meta is one socket's, two sockets never compare equal.
@attrs.define(eq=False)
class AuthMeta(ConnectionMeta):
    """The default meta plus the role the token grants."""

    role: str = "user"


def _secret() -> bytes:
    # Read at every check, not once at import, so a changed environment applies (tests set it).
    return os.environ.get(SECRET_ENV, DEV_SECRET).encode()


def _sign(payload: str, secret: bytes) -> str:
    digest = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def make_token(user_id: str, role: str = "user", *, secret: str | None = None) -> str:
    """A token for ``user_id`` with ``role``, signed with ``secret`` (default: the room's).

    Raises :class:`ValueError` naming the one that is not 1 to 64 letters, digits, ``_`` or ``-``.
    """
    for what, value in (("user id", user_id), ("role", role)):
        if not NAME.fullmatch(value):
            raise ValueError(
                f"{what} {value!r} cannot be in a token: use 1 to 64 letters, digits, '_' or '-' "
                f"(no '.': it separates the token's parts)"
            )
    key = secret.encode() if secret is not None else _secret()
    return f"{user_id}.{role}.{_sign(f'{user_id}.{role}', key)}"


def verify_token(token: str) -> tuple[str, str] | None:
    """``(user_id, role)`` if ``token`` carries a valid signature, else None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    user_id, role, signature = parts
    expected = _sign(f"{user_id}.{role}", _secret())
    # compare_digest takes as long whatever the first wrong character, so timing reveals nothing.
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        return None
    return user_id, role


auth_room = define_room(name="auth", websocket_path="/ws/auth")

Ctx = RoomContext[Any]


@auth_room.extract_meta
def authenticate(request: HandshakeRequest) -> AuthMeta:
    token = request.query.get("token")
    if not token:
        raise HandshakeRefused(401, "missing token")
    verified = verify_token(token)
    if verified is None:
        # One answer for every bad token: a forger learns nothing about what was wrong.
        raise HandshakeRefused(401, "invalid token")
    user_id, role = verified
    return AuthMeta(user_id=user_id, client_id=str(uuid.uuid4()), role=role)


def _meta(ctx: Ctx) -> AuthMeta:
    # Every socket of this room got its meta from authenticate(), so it is an AuthMeta.
    assert isinstance(ctx.meta, AuthMeta)
    return ctx.meta


@auth_room.on("whoami")
def whoami(ctx: Ctx, data: Any) -> None:
    meta = _meta(ctx)
    ctx.emit.emit("whoami", {"userId": meta.user_id, "role": meta.role})


def main(args: list[str]) -> int:
    """``python rooms/auth.py USER_ID [ROLE]``: print a token to try the room by hand."""
    if not 1 <= len(args) <= 2:
        print("usage: python rooms/auth.py USER_ID [ROLE]", file=sys.stderr)
        return 2
    try:
        print(make_token(*args))
    except ValueError as exc:
        print(f"rooms/auth.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
