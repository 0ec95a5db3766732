"""Client authentication: API keys the gateway issues to frontends, never the provider's.

The keys file (``SLUICE_CLIENT_KEYS_FILE``) stores only SHA-256 digests:

    {"keys": {"<sha256 hex of the key>": {"user": "alice", "tenant": "acme",
                                          "admin": false, "settings": {...}}}}

Add a key with ``python -m service.auth add --file keys.json --user alice --tenant acme``;
it prints the new key once. In simulated mode without a keys file the dev key is accepted.
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .errors import AuthenticationError
from .settings import AuthSettings, ConfigError

DEV_USER = "dev"
DEV_TENANT = "dev"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    user_id: str
    tenant: str
    key_id: str  # a short prefix of the key's digest: safe to log and record
    admin: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict)


def digest(key: str) -> str:
    # surrogateescape: aiohttp decodes header bytes that are not UTF-8 this way; encoding
    # them back gives the bytes the client sent (a wrong key), not a UnicodeEncodeError.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class KeyRing:
    """Maps presented bearer keys to principals by their digest."""

    def __init__(self, principals: Mapping[str, Principal]) -> None:
        self._by_digest = dict(principals)

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> KeyRing:
        """Load the keys file, or accept only the dev key when there is none."""
        if settings.client_keys_file is not None:
            return cls(load_keys_file(settings.client_keys_file))
        if settings.dev_key is None:
            return cls({})
        dev = digest(settings.dev_key.reveal())
        return cls({dev: Principal(DEV_USER, DEV_TENANT, dev[:12], admin=True)})

    def authenticate(self, authorization: str | None) -> Principal:
        """Return the principal for an ``Authorization`` header, or raise 401."""
        if not authorization:
            raise AuthenticationError(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code=None,
            )
        scheme, _, key = authorization.partition(" ")
        principal = self._by_digest.get(digest(key.strip())) if scheme.lower() == "bearer" else None
        if principal is None:
            raise AuthenticationError("Incorrect API key provided.")
        return principal


def load_keys_file(path: Path) -> dict[str, Principal]:
    try:
        document = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"SLUICE_CLIENT_KEYS_FILE cannot be read: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"SLUICE_CLIENT_KEYS_FILE is not valid JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, dict):
        raise ConfigError('SLUICE_CLIENT_KEYS_FILE must hold {"keys": {"<sha256>": {...}}}')
    return {hexdigest: _principal(hexdigest, entry) for hexdigest, entry in entries.items()}


def _principal(hexdigest: str, entry: Any) -> Principal:
    if (
        len(hexdigest) != 64
        or not isinstance(entry, dict)
        or not isinstance(entry.get("user"), str)
    ):
        raise ConfigError(
            f"SLUICE_CLIENT_KEYS_FILE: entry {hexdigest[:12]}... needs a sha256 and a user"
        )
    # A key without a tenant is a tenant of one; the prefix keeps it from sharing a cache,
    # limits and budgets with a real tenant that happens to bear the user's name.
    return Principal(
        user_id=entry["user"],
        tenant=str(entry.get("tenant") or f"user:{entry['user']}"),
        key_id=hexdigest[:12],
        admin=bool(entry.get("admin", False)),
        settings=dict(entry.get("settings") or {}),
    )


def add_key(path: Path, *, user: str, tenant: str, admin: bool = False) -> str:
    """Create a key for ``user``, store its digest in ``path``, and return the key.

    An existing file must be a valid keys file (``ConfigError`` otherwise, and it is left
    alone); the new one replaces it atomically, so a gateway never reads half a file.
    """
    document: dict[str, Any] = {"keys": {}}
    if path.exists():
        load_keys_file(path)  # refuse to extend (and so rewrite) a file the gateway rejects
        document = orjson.loads(path.read_bytes())
    key = "sk-sluice-" + secrets.token_urlsafe(24)
    document["keys"][digest(key)] = {"user": user, "tenant": tenant, "admin": admin}
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        partial.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
        partial.replace(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    return key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m service.auth", description="Manage client keys"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="issue a new client key")
    add.add_argument("--file", type=Path, required=True)
    add.add_argument("--user", required=True)
    add.add_argument("--tenant", required=True)
    add.add_argument("--admin", action="store_true")
    args = parser.parse_args(argv)
    try:
        key = add_key(args.file, user=args.user, tenant=args.tenant, admin=args.admin)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(key)


if __name__ == "__main__":
    main()
