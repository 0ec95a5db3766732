"""Client authentication: API keys the gateway issues to frontends, never the provider's.

The keys file (``SLUICE_CLIENT_KEYS_FILE``) stores only SHA-256 digests:

    {"keys": {"<sha256 hex of the key>": {"user": "alice", "tenant": "acme",
                                          "admin": false, "settings": {...}}}}

Add a key with ``python -m service.auth add --file keys.json --user alice --tenant acme``;
it prints the new key once. In simulated mode without a keys file the dev key is accepted.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AuthenticationError, MissingKeyError
from .settings import AuthSettings, ConfigError

_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")

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
            raise MissingKeyError(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        scheme, _, key = authorization.partition(" ")
        key = key.strip(" ")  # spaces only: no other whitespace is part of the header's syntax
        bearer = scheme.lower() == "bearer" and key  # (an empty key is none, whatever is listed)
        principal = self._by_digest.get(digest(key)) if bearer else None
        if principal is None:
            raise AuthenticationError("Incorrect API key provided.")
        return principal


def load_keys_file(path: Path) -> dict[str, Principal]:
    """The keys file, read once at start (a key added later counts after a restart),
    checked whole: a mistake in it stops the process with a message, it is never guessed
    at (a misspelt setting ignored, ``"admin": "false"`` taken as true, ...)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"SLUICE_CLIENT_KEYS_FILE cannot be read: {exc.strerror}") from None
    try:  # (json, not orjson: a digest listed twice must be told, not the last one taken)
        document = json.loads(raw.decode("utf-8-sig"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"SLUICE_CLIENT_KEYS_FILE is not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError("SLUICE_CLIENT_KEYS_FILE nests too deep to be a keys file") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, dict):
        raise ConfigError('SLUICE_CLIENT_KEYS_FILE must hold {"keys": {"<sha256>": {...}}}')
    principals = {hexdigest: _principal(hexdigest, entry) for hexdigest, entry in entries.items()}
    key_ids = collections.Counter(p.key_id for p in principals.values())
    shared = next((key_id for key_id, count in key_ids.items() if count > 1), None)
    if shared is not None:  # a key id names one key: in the ledger, and for its settings
        raise ConfigError(f"SLUICE_CLIENT_KEYS_FILE: two keys' digests begin {shared}...")
    return principals


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        names = collections.Counter(name for name, _ in pairs)
        twice = next(name for name, count in names.items() if count > 1)
        raise ValueError(f"{twice[:12]!r} is listed twice")
    return document


# A key without a tenant is a tenant of one, named with this prefix; a named tenant may not
# bear it, or it could share that user's cache, tenant limits and budgets.
OWN_TENANT_PREFIX = "user:"
_RESERVED_TENANT = f"tenant names beginning {OWN_TENANT_PREFIX!r} are reserved for keys without one"
_ENTRY_FIELDS = frozenset({"user", "tenant", "admin", "settings"})
_WHOLE_SETTINGS = ("rpm", "tpm", "max_streams")  # 0: no limit of the key's own
_USD_SETTINGS = ("daily_usd", "monthly_usd")


def _principal(hexdigest: str, entry: Any) -> Principal:
    where = f"SLUICE_CLIENT_KEYS_FILE: entry {hexdigest[:12]}..."
    if not _HEX_DIGEST.fullmatch(hexdigest):
        raise ConfigError(f"{where}: keys are sha256 digests, 64 lowercase hex digits")
    if not isinstance(entry, dict) or not isinstance(entry.get("user"), str) or not entry["user"]:
        raise ConfigError(f"{where} needs a user")
    unknown = set(entry) - _ENTRY_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    tenant, admin = entry.get("tenant"), entry.get("admin", False)
    if tenant is not None and (not isinstance(tenant, str) or not tenant):
        raise ConfigError(f"{where}: 'tenant' must be a non-empty string")
    if tenant is not None and tenant.startswith(OWN_TENANT_PREFIX):
        raise ConfigError(f"{where}: {_RESERVED_TENANT}")
    if not isinstance(admin, bool):
        raise ConfigError(f"{where}: 'admin' must be true or false")
    return Principal(
        user_id=entry["user"],
        tenant=tenant or OWN_TENANT_PREFIX + entry["user"],
        key_id=hexdigest[:12],
        admin=admin,
        settings=_settings(where, entry.get("settings", {})),
    )


def _settings(where: str, settings: Any) -> dict[str, Any]:
    """A key's own limits, each of the right kind and range."""
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: 'settings' must be an object")
    for name, value in settings.items():
        if name in _WHOLE_SETTINGS:
            valid = _whole(value, 0)
        elif name == "max_tokens":
            valid = _whole(value, 1)
        elif name in _USD_SETTINGS:
            number = isinstance(value, int | float) and not isinstance(value, bool)
            valid = number and math.isfinite(value) and value >= 0
        else:
            raise ConfigError(f"{where}: unknown setting {name!r}")
        if not valid:
            raise ConfigError(f"{where}: setting {name!r} has an invalid value {value!r}")
    return dict(settings)


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def add_key(path: Path, *, user: str, tenant: str | None = None, admin: bool = False) -> str:
    """Create a key for ``user``, store its digest in ``path``, and return the key.

    An existing file must be a valid keys file (``ConfigError`` otherwise, and it is left
    alone); the new one replaces it atomically (a reader never sees half a file), keeps its
    permissions, and, if ``path`` is a link (a mounted secret), the file it points to is the
    one updated. Concurrent adds take turns (a lock on its directory): none is lost.
    """
    if not user or tenant == "":
        raise ConfigError("a key needs a user, and a tenant when one is given")
    if tenant is not None and tenant.startswith(OWN_TENANT_PREFIX):
        raise ConfigError(_RESERVED_TENANT)
    target = path.resolve()
    with _locked(target):
        document: dict[str, Any] = {"keys": {}}
        mode = 0o600
        if target.exists():
            load_keys_file(target)  # refuse to extend (so rewrite) a file the gateway rejects
            # Read and written as the gateway reads it (json: a BOM, integers past 64 bits).
            document = json.loads(target.read_bytes().decode("utf-8-sig"))
            mode = target.stat().st_mode & 0o777
        key = "sk-sluice-" + secrets.token_urlsafe(24)
        entry: dict[str, Any] = {"user": user, "admin": admin}
        if tenant is not None:
            entry["tenant"] = tenant
        document["keys"][digest(key)] = entry
        _replace(target, json.dumps(document, indent=2, ensure_ascii=False).encode(), mode)
    return key


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """An exclusive lock on the directory of ``target`` (flock: released on close; no lock
    file left behind)."""
    try:
        fd = os.open(target.parent, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"cannot write {target}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _replace(target: Path, content: bytes, mode: int) -> None:
    partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        partial.write_bytes(content)
        partial.chmod(mode)
        partial.replace(target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {target}: {exc.strerror}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m service.auth", description="Manage client keys"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="issue a new client key")
    add.add_argument("--file", type=Path, required=True)
    add.add_argument("--user", required=True)
    add.add_argument("--tenant", help="default: a tenant of its own (user:<user>)")
    add.add_argument("--admin", action="store_true")
    args = parser.parse_args(argv)
    try:
        key = add_key(args.file, user=args.user, tenant=args.tenant, admin=args.admin)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(key)


if __name__ == "__main__":
    main()
