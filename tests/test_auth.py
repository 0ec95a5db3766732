"""Client authentication (issue 2, point 4): keys file, the add-key command, the dev key, 401s.

Every route but the health checks needs ``Authorization: Bearer <key>``; the keys file holds
only SHA-256 digests of the keys it accepts.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import multidict
import orjson
import pytest

from service.auth import DEV_USER, KeyRing, add_key, load_keys_file
from service.errors import AuthenticationError
from service.settings import AuthSettings, ConfigError, Secret, Settings
from tests.conftest import AUTH, DEV_KEY, GatewayFactory, chat_body
from tests.processes import python_module
from tests.wire import assert_openai_error


def _with_keys_file(settings: Settings, path: Path) -> Settings:
    return replace(settings, auth=AuthSettings(client_keys_file=path, dev_key=None))


async def _add_key_cli(path: Path, *args: str) -> str:
    """Run ``python -m service.auth add`` as a user would; return what it printed."""
    process = await python_module(
        "service.auth",
        "add",
        "--file",
        str(path),
        *args,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode().strip()


async def test_cli_key_round_trip(
    gateway: GatewayFactory, settings: Settings, tmp_path: Path
) -> None:
    """The key printed by the add command authenticates; the file keeps only its digest."""
    path = tmp_path / "keys.json"
    alice = await _add_key_cli(path, "--user", "alice", "--tenant", "acme")
    bob = await _add_key_cli(path, "--user", "bob", "--tenant", "acme", "--admin")
    stored = path.read_text()
    for key in (alice, bob):
        assert key.startswith("sk-sluice-")
        assert key not in stored
        assert hashlib.sha256(key.encode()).hexdigest() in stored
    entries = orjson.loads(stored)["keys"]
    assert entries[hashlib.sha256(alice.encode()).hexdigest()] == {
        "user": "alice",
        "tenant": "acme",
        "admin": False,
    }
    assert entries[hashlib.sha256(bob.encode()).hexdigest()]["admin"] is True

    client = await gateway(_with_keys_file(settings, path))
    for key in (alice, bob):
        response = await client.post(
            "/v1/chat/completions",
            json=chat_body("[sim chunks=2]", stream=False),
            headers={"Authorization": f"Bearer {key}"},
        )
        assert response.status == 200
    wrong = await client.get("/v1/models", headers={"Authorization": f"Bearer {alice}x"})
    assert wrong.status == 401


async def test_dev_key_only_without_keys_file(
    gateway: GatewayFactory, settings: Settings, tmp_path: Path
) -> None:
    """The dev key works in simulated mode without a keys file, and not once there is one."""
    plain = await gateway()
    assert (await plain.get("/v1/models", headers=AUTH)).status == 200
    path = tmp_path / "keys.json"
    add_key(path, user="alice", tenant="acme")
    keyed = await gateway(_with_keys_file(settings, path))
    response = await keyed.get("/v1/models", headers=AUTH)
    assert response.status == 401
    assert assert_openai_error(await response.json())["code"] == "invalid_api_key"


def test_from_env_drops_dev_key_with_keys_file(tmp_path: Path) -> None:
    """From the environment: a keys file means no dev key, in either provider mode."""
    path = str(tmp_path / "keys.json")
    simulated = Settings.from_env({"SLUICE_CLIENT_KEYS_FILE": path})
    real = Settings.from_env({"SLUICE_CLIENT_KEYS_FILE": path, "OPENAI_API_KEY": "sk-x"})
    assert simulated.auth.dev_key is None
    assert real.auth.dev_key is None
    assert Settings.from_env({}).auth.dev_key == Secret(DEV_KEY)


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "You didn't provide an API key"),
        ("", "You didn't provide an API key"),
        ("Bearer", "Incorrect API key"),
        ("Bearer ", "Incorrect API key"),
        ("Bearer not-a-key", "Incorrect API key"),
        (f"Basic {DEV_KEY}", "Incorrect API key"),
        (DEV_KEY, "Incorrect API key"),
    ],
)
async def test_401_shapes(gateway: GatewayFactory, authorization: str | None, message: str) -> None:
    """Missing or wrong keys: 401, OpenAI's shape, and the presented key is never echoed."""
    client = await gateway()
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
        response = await client.request(method, path, json=chat_body(), headers=headers)
        assert response.status == 401
        text = await response.text()
        error = assert_openai_error(orjson.loads(text), type_="invalid_request_error")
        assert error["code"] == (None if not authorization else "invalid_api_key")  # as
        # OpenAI's: a missing key has no code
        assert error["message"].startswith(message)
        assert "not-a-key" not in text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models/gpt-4o-mini"),
        ("GET", "/v1/usage"),
        ("GET", "/v1/streams/strm_x"),
        ("GET", "/v1/streams/strm_x/events"),
        ("POST", "/v1/streams/strm_x/cancel"),
        ("GET", "/v1/ws"),
        ("GET", "/metrics"),
    ],
)
async def test_every_other_route_needs_a_key(
    gateway: GatewayFactory, method: str, path: str
) -> None:
    """Every route but the probes answers a request without a valid key with the same 401,
    before anything of the route runs (a stream's existence included)."""
    client = await gateway()
    for headers in ({}, {"Authorization": "Bearer not-a-key"}):
        response = await client.request(method, path, headers=headers)
        assert response.status == 401
        error = assert_openai_error(await response.json(), type_="invalid_request_error")
        assert error["code"] == ("invalid_api_key" if headers else None)


async def test_bearer_scheme_is_case_insensitive(gateway: GatewayFactory) -> None:
    """``bearer`` and ``BEARER`` are the same scheme (RFC 7235)."""
    client = await gateway()
    for scheme in ("bearer", "BEARER"):
        response = await client.get("/v1/models", headers={"Authorization": f"{scheme} {DEV_KEY}"})
        assert response.status == 200


@pytest.mark.parametrize("path", ["/livez", "/readyz"])
async def test_health_routes_are_public(gateway: GatewayFactory, path: str) -> None:
    """The probes answer without a key (and ignore a wrong one)."""
    client = await gateway()
    assert (await client.get(path)).status == 200
    assert (await client.get(path, headers={"Authorization": "Bearer wrong"})).status == 200


def test_keyring_from_keys_file(tmp_path: Path) -> None:
    """A loaded keys file maps each key to its user, tenant, admin flag and settings."""
    path = tmp_path / "keys.json"
    key = "sk-sluice-test-key"
    document = {
        "keys": {
            hashlib.sha256(key.encode()).hexdigest(): {
                "user": "carol",
                "tenant": "umbrella",
                "admin": True,
                "settings": {"rpm": 5},
            }
        }
    }
    path.write_bytes(orjson.dumps(document))
    keyring = KeyRing.from_settings(AuthSettings(client_keys_file=path, dev_key=None))
    principal = keyring.authenticate(f"Bearer {key}")
    assert (principal.user_id, principal.tenant, principal.admin) == ("carol", "umbrella", True)
    assert principal.settings == {"rpm": 5}
    assert principal.key_id == hashlib.sha256(key.encode()).hexdigest()[:12]
    with pytest.raises(AuthenticationError):
        keyring.authenticate(f"Bearer {DEV_KEY}")


def test_a_key_without_a_tenant_is_a_tenant_of_one(tmp_path: Path) -> None:
    """No tenant: the user's own, in a namespace no named tenant can share (so a user
    called "acme" shares no cache, limits or budgets with tenant "acme")."""
    path = tmp_path / "keys.json"
    key = "sk-sluice-solo"
    digest_hex = hashlib.sha256(key.encode()).hexdigest()
    path.write_bytes(orjson.dumps({"keys": {digest_hex: {"user": "acme"}}}))
    keyring = KeyRing.from_settings(AuthSettings(client_keys_file=path, dev_key=None))
    principal = keyring.authenticate(f"Bearer {key}")
    assert (principal.user_id, principal.tenant) == ("acme", "user:acme")


def test_a_keys_file_nested_past_the_parser_s_depth_is_a_config_error(tmp_path: Path) -> None:
    """A traceback (RecursionError) at start, and from ``add``."""
    path = tmp_path / "keys.json"
    path.write_bytes(b'{"keys": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    with pytest.raises(ConfigError, match="nests too deep"):
        load_keys_file(path)
    with pytest.raises(ConfigError, match="nests too deep"):
        add_key(path, user="late")


def test_a_named_tenant_cannot_take_a_tenant_of_one_s_name(tmp_path: Path) -> None:
    """``"tenant": "user:bob"`` would share bob's cache (his answers), tenant limits and
    budgets: the loader refuses it, and so does ``add``, leaving the file as it was."""
    path = tmp_path / "keys.json"
    bob = hashlib.sha256(b"sk-bob").hexdigest()
    mallory = hashlib.sha256(b"sk-mallory").hexdigest()
    keys = {bob: {"user": "bob"}, mallory: {"user": "mallory", "tenant": "user:bob"}}
    path.write_bytes(orjson.dumps({"keys": keys}))
    with pytest.raises(ConfigError, match="reserved"):
        load_keys_file(path)
    path.write_bytes(orjson.dumps({"keys": {bob: {"user": "bob"}}}))
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="reserved"):
        add_key(path, user="mallory", tenant="user:bob")
    assert path.read_bytes() == before


def test_dev_keyring() -> None:
    """Without a keys file the dev key is the only key, as an admin dev user."""
    keyring = KeyRing.from_settings(AuthSettings())
    assert keyring.authenticate(f"Bearer {DEV_KEY}").user_id == DEV_USER
    with pytest.raises(AuthenticationError):
        keyring.authenticate("Bearer sluice-dev-key-2")


def _keys(entry: dict[str, Any]) -> bytes:
    return orjson.dumps({"keys": {"a" * 64: entry}})


@pytest.mark.parametrize(
    "content",
    [
        None,
        b"not json",
        b"[]",
        b'{"keys": []}',
        b'{"keys": {"abc": {"user": "x"}}}',
        b'{"keys": {"' + b"a" * 64 + b'": {"tenant": "no-user"}}}',
        # Never guessed at: each of these stops the gateway with a message.
        _keys({"user": "x", "admin": "false"}),  # a string is not false
        _keys({"user": "x", "tennant": "acme"}),  # a misspelt field
        _keys({"user": "x", "settings": "abc"}),
        _keys({"user": "x", "settings": {"rmp": 10}}),  # a misspelt setting
        _keys({"user": "x", "settings": {"rpm": -1}}),
        _keys({"user": "x", "settings": {"tpm": "10"}}),
        _keys({"user": "x", "settings": {"max_tokens": 0}}),
        _keys({"user": "x", "settings": {"daily_usd": -1}}),
        _keys({"user": ""}),
        b'{"keys": {"' + b"A" * 64 + b'": {"user": "x"}}}',  # no digest is upper case
        b'{"keys": {"' + b"a" * 64 + b'": {"user": "x"}, "' + b"a" * 64 + b'": {"user": "y"}}}',
        # Two digests sharing the 12 digits of a key id: it would name either key.
        b'{"keys": {"'
        + b"a" * 64
        + b'": {"user": "x"}, "'
        + b"a" * 12
        + b"b" * 52
        + b'": {"user": "y"}}}',
    ],
)
def test_bad_keys_file_names_the_variable(tmp_path: Path, content: bytes | None) -> None:
    """An unreadable or malformed keys file is a ConfigError naming SLUICE_CLIENT_KEYS_FILE."""
    path = tmp_path / "keys.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match="SLUICE_CLIENT_KEYS_FILE"):
        load_keys_file(path)


@pytest.mark.parametrize(
    ("content", "mentions"),
    [(b"{bad", "not valid JSON"), (b'{"keys": []}', '{"keys"'), (None, "cannot write")],
)
async def test_cli_refuses_a_bad_keys_file(
    tmp_path: Path, content: bytes | None, mentions: str
) -> None:
    """The add command on a file the gateway would reject, or cannot write: exit 2, one line,
    no traceback, and the file is left exactly as it was."""
    path = tmp_path / "keys.json" if content is not None else tmp_path / "missing" / "keys.json"
    if content is not None:
        path.write_bytes(content)
    process = await python_module(
        "service.auth",
        "add",
        "--file",
        str(path),
        "--user",
        "alice",
        "--tenant",
        "acme",
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 2
    assert out == b""  # no key was issued
    assert err.decode().startswith("python -m service.auth: error:")
    assert mentions in err.decode()
    assert b"Traceback" not in err
    if content is not None:
        assert path.read_bytes() == content
    leftovers = os.listdir(tmp_path)  # no temporary file left behind
    assert leftovers == ([path.name] if content is not None else [])


def test_adding_a_key_keeps_a_file_the_gateway_reads_as_it_reads_it(tmp_path: Path) -> None:
    """A keys file with a byte-order mark, and a limit past 64 bits: the gateway takes it,
    so ``add`` must too, and write it back the same (it failed on the BOM, and turned the
    integer into 1e+20, which the gateway then refused)."""
    path = tmp_path / "keys.json"
    entry = '{"user": "big", "settings": {"rpm": 100000000000000000000}}'
    path.write_bytes(b"\xef\xbb\xbf" + f'{{"keys": {{"{"a" * 64}": {entry}}}}}'.encode())
    assert load_keys_file(path)[("a" * 64)].user_id == "big"
    add_key(path, user="new", tenant="acme")
    kept = load_keys_file(path)
    assert sorted(p.user_id for p in kept.values()) == ["big", "new"]
    assert b"100000000000000000000" in path.read_bytes()


def test_adding_keys_at_once_loses_none_and_keeps_the_file_s_place_and_mode(
    tmp_path: Path,
) -> None:
    """Eight adds at once: eight keys, all of them valid. A keys file reached through a link
    (a mounted secret) is updated where it lies, with its permissions kept; a tenant may be
    left out (a tenant of one)."""
    real = tmp_path / "secret" / "keys.json"
    real.parent.mkdir()
    add_key(real, user="first")
    real.chmod(0o640)
    link = tmp_path / "keys.json"
    link.symlink_to(real)
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda n: add_key(link, user=f"u{n}", tenant="acme"), range(8)))
    assert link.is_symlink()
    assert real.stat().st_mode & 0o777 == 0o640
    keyring = KeyRing(load_keys_file(link))
    assert sorted(keyring.authenticate(f"Bearer {key}").user_id for key in keys) == [
        f"u{n}" for n in range(8)
    ]
    assert len(load_keys_file(real)) == 9
    (first,) = [p for p in load_keys_file(real).values() if p.user_id == "first"]
    assert first.tenant == "user:first"


async def test_several_authorization_headers_are_a_401(gateway: GatewayFactory) -> None:
    """Authorization is no list header: with two, which one a proxy in front checked cannot
    be known, so neither is taken (the first was, an admin's key included)."""
    client = await gateway()
    headers = multidict.CIMultiDict([("Authorization", f"Bearer {DEV_KEY}")] * 2)
    response = await client.get("/v1/models", headers=headers)
    assert response.status == 401
    assert_openai_error(await response.json(), type_="invalid_request_error")
    headers.add("Authorization", "Bearer not-a-key")
    assert (await client.get("/v1/models", headers=headers)).status == 401
    assert (await client.get("/v1/models", headers=AUTH)).status == 200


def test_an_empty_key_or_one_padded_with_other_whitespace_is_no_key(tmp_path: Path) -> None:
    """Even a keys file listing the digest of the empty string lets no request in with
    nothing after "Bearer"; and a key padded with a no-break space is another key, not the
    same one trimmed: only spaces around it are the header's syntax."""
    path = tmp_path / "keys.json"
    listed = {"": "nobody", "sk-key": "alice"}
    entries = {hashlib.sha256(k.encode()).hexdigest(): {"user": u} for k, u in listed.items()}
    path.write_bytes(orjson.dumps({"keys": entries}))
    ring = KeyRing(load_keys_file(path))
    assert ring.authenticate("Bearer  sk-key ").user_id == "alice"
    for header in ("Bearer ", "Bearer    ", "Bearer sk-key\u00a0"):
        with pytest.raises(AuthenticationError):
            ring.authenticate(header)
