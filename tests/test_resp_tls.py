"""
``rediss://``: the RESP client over TLS, against a real ``redis-server``
that speaks only TLS (``--port 0 --tls-port``), with certificates this
module makes (:func:`tests.redisserver.make_certificates`): a private CA, a
server certificate for ``localhost`` and a client certificate.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from oproxy.cache import CachePolicy, build_cache
from oproxy.config import CacheConfig, ConfigError, StateConfig, load_config
from oproxy.resp import RedisAddress, RedisClient, RedisConnectionError, TLSSettings
from oproxy.state.base import KeyRecord
from oproxy.state.opening import open_store
from tests import redisserver
from tests.redisserver import Certificates, RedisServer, free_port

redis_tls_server = redisserver.redis_tls_server
certificates = redisserver.certificates

# -- the URL ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "rediss://cache.example",
            RedisAddress("cache.example", 6379, None, 0, None, None, TLSSettings()),
        ),
        (
            "rediss://:pw@h:6380/2?ssl_ca_certs=/etc/ca%20dir/ca.pem",
            RedisAddress("h", 6380, None, 2, None, "pw", TLSSettings(ca_file="/etc/ca dir/ca.pem")),
        ),
        (
            "rediss://h?ssl_cert_reqs=none",
            RedisAddress("h", 6379, None, 0, None, None, TLSSettings(verify=False)),
        ),
        (
            "rediss://h?ssl_cert_reqs=optional",
            RedisAddress("h", 6379, None, 0, None, None, TLSSettings(verify=True)),
        ),
        (
            "rediss://h?ssl_cert_reqs=REQUIRED&ssl_certfile=/c.pem&ssl_keyfile=/k.pem",
            RedisAddress(
                "h", 6379, None, 0, None, None, TLSSettings(cert_file="/c.pem", key_file="/k.pem")
            ),
        ),
        ("redis://h", RedisAddress("h", 6379, None, 0, None, None, None)),
    ],
)
def test_rediss_urls(url: str, expected: RedisAddress) -> None:
    address = RedisAddress.from_url(url)
    assert address == expected
    assert str(address).endswith("over TLS") == (expected.tls is not None)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://h?ssl_cert_reqs=none", "need a rediss://"),
        ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs must be required or none"),
        ("rediss://h?ssl_ca_cert=/ca.pem", "unknown TLS parameter 'ssl_ca_cert'"),
        ("rediss://h?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem", "no use with ssl_cert_reqs=none"),
        ("rediss://h?ssl_keyfile=/k.pem", "ssl_keyfile needs ssl_certfile"),
        ("rediss://:secret@h?ssl_cert_reqs=maybe", r"rediss://:\*\*\*@h"),
    ],
)
def test_bad_rediss_urls(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as raised:
        RedisAddress.from_url(url)
    assert "secret" not in str(raised.value)


def test_the_configuration_takes_rediss_for_the_cache_and_the_state_store() -> None:
    url = "rediss://:pw@redis.example:6380/1?ssl_ca_certs=/etc/oproxy/redis-ca.pem"
    config = load_config(
        f"cache: {{backend: redis, redis_url: '{url}'}}\nstate: {{backend: redis, url: '{url}'}}",
        {},
    )
    assert config.cache.redis_url == url and config.state.url == url


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("cache: {backend: redis, redis_url: 'rediss://h?ssl_cert_reqs=maybe'}", "cache.redis_url"),
        ("state: {backend: redis, url: 'rediss://h?ssl_ca_cert=/x'}", "state.url"),
        ("state: {backend: redis, url: 'https://h'}", "state.url"),
    ],
)
def test_bad_tls_settings_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(text, {})
    assert raised.value.key == key


# -- a real server ----------------------------------------------------------------


@pytest.fixture
def clients() -> Iterator[list[RedisClient]]:
    """Clients made by a test, all closed after it."""
    made: list[RedisClient] = []
    yield made
    for client in made:
        pytest_twisted.blockon(client.close())


@pytest.fixture
def connect(redis_tls_server: RedisServer, clients: list[RedisClient]) -> Any:
    def make(url: str | None = None, **options: Any) -> RedisClient:
        client = RedisClient(reactor, url or redis_tls_server.url, **options)
        clients.append(client)
        return client

    return make


@pytest_twisted.ensureDeferred
async def test_a_server_certificate_from_a_private_ca(connect: Any) -> None:
    client = connect()  # rediss://localhost:PORT?ssl_ca_certs=ca.pem
    key = "test:" + uuid.uuid4().hex
    assert await client.execute("PING") == "PONG"
    assert await client.execute("SET", key, "over TLS") == "OK"
    assert await client.execute("GET", key) == b"over TLS"


@pytest_twisted.ensureDeferred
async def test_a_certificate_from_another_ca_is_refused(
    connect: Any, redis_tls_server: RedisServer, certificates: Certificates
) -> None:
    """The other CA has the same name as the real one, but not its key."""
    client = connect(redis_tls_server.tls_url(ssl_ca_certs=certificates.other_ca), retry_delay=60)
    with pytest.raises(RedisConnectionError, match=r"no TLS connection.*certificate verify failed"):
        await client.execute("PING")
    # Like any failed connection: the next commands fail at once, for a while.
    with pytest.raises(RedisConnectionError, match="not connected to Redis at localhost"):
        await client.execute("PING")


@pytest_twisted.ensureDeferred
async def test_the_system_trust_store_does_not_know_a_private_ca(
    connect: Any, redis_tls_server: RedisServer
) -> None:
    client = connect(redis_tls_server.tls_url(ssl_ca_certs=""))
    with pytest.raises(RedisConnectionError, match="certificate verify failed"):
        await client.execute("PING")


@pytest_twisted.ensureDeferred
async def test_the_server_name_must_match(connect: Any, redis_tls_server: RedisServer) -> None:
    """The certificate is for localhost; 127.0.0.1 is the same server, but not its name."""
    client = connect(redis_tls_server.tls_url("127.0.0.1"))
    with pytest.raises(RedisConnectionError, match="no TLS connection"):
        await client.execute("PING")


@pytest_twisted.ensureDeferred
async def test_verification_off_when_asked(connect: Any, redis_tls_server: RedisServer) -> None:
    client = connect(redis_tls_server.tls_url("127.0.0.1", ssl_ca_certs="", ssl_cert_reqs="none"))
    assert await client.execute("PING") == "PONG"


@pytest_twisted.ensureDeferred
async def test_an_unreadable_ca_file_is_a_connection_error(
    connect: Any, redis_tls_server: RedisServer, tmp_path: Path
) -> None:
    missing = connect(redis_tls_server.tls_url(ssl_ca_certs=tmp_path / "missing.pem"))
    with pytest.raises(RedisConnectionError, match=r"cannot set up TLS.*missing\.pem"):
        await missing.execute("PING")
    (tmp_path / "empty.pem").write_text("no certificates here\n")
    empty = connect(redis_tls_server.tls_url(ssl_ca_certs=tmp_path / "empty.pem"))
    with pytest.raises(RedisConnectionError, match="no PEM certificate"):
        await empty.execute("PING")


class Mute(Protocol):
    """Takes the connection, says nothing: no TLS handshake ever."""


@pytest_twisted.ensureDeferred
async def test_a_server_that_never_finishes_the_handshake(connect: Any) -> None:
    port = reactor.listenTCP(0, Factory.forProtocol(Mute), interface="127.0.0.1")
    try:
        client = connect(
            f"rediss://127.0.0.1:{port.getHost().port}?ssl_cert_reqs=none", connect_timeout=0.2
        )
        started = time.monotonic()
        with pytest.raises(RedisConnectionError, match=r"no TLS handshake within 0\.2 seconds"):
            await client.execute("PING")
        assert time.monotonic() - started < 5
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_client_certificate_for_a_server_that_asks_for_one(
    certificates: Certificates, tmp_path: Path, clients: list[RedisClient]
) -> None:
    server = RedisServer(redisserver.redis_executable(), tmp_path, certificates, "yes")
    server.start()
    try:
        without = RedisClient(reactor, server.tls_url())
        clients.append(without)
        with pytest.raises(RedisConnectionError):
            await without.execute("PING")
        with_certificate = RedisClient(
            reactor,
            server.tls_url(
                ssl_certfile=certificates.client_cert, ssl_keyfile=certificates.client_key
            ),
        )
        clients.append(with_certificate)
        assert await with_certificate.execute("PING") == "PONG"
        # The key may follow the certificate in one file.
        both = tmp_path / "client-and-key.pem"
        both.write_bytes(
            certificates.client_cert.read_bytes() + certificates.client_key.read_bytes()
        )
        one_file = RedisClient(reactor, server.tls_url(ssl_certfile=both))
        clients.append(one_file)
        assert await one_file.execute("PING") == "PONG"
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_the_response_cache_over_tls(redis_tls_server: RedisServer) -> None:
    cache, client = build_cache(
        CacheConfig(backend="redis", redis_url=redis_tls_server.url), reactor
    )
    assert client is not None and client.address.tls is not None
    try:
        key = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
        wanted = CachePolicy(key=key, read=True, write=True, max_age=None, ttl=30)
        assert await cache.lookup(wanted) is None
        await cache.store(wanted, {"object": "embedding", "data": [1.5]}, stream=False)
        answer = await cache.lookup(wanted)
        assert answer is not None and answer.body == {"object": "embedding", "data": [1.5]}
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_the_state_store_over_tls(redis_tls_server: RedisServer) -> None:
    config = StateConfig(
        backend="redis", url=redis_tls_server.url, namespace=f"test:{uuid.uuid4().hex}:"
    )
    store = open_store(config, reactor)
    try:
        await store.ping()
        record = KeyRecord("k1", "alice", bytes(32), 1_700_000_000.0, {"rpm": 60})
        await store.add_key(record)
        assert await store.get_key("k1") == record
    finally:
        await store.close()


def test_a_rediss_url_is_read_without_touching_its_files() -> None:
    """Parsing (and so validating the configuration) reads no file: connecting does."""
    address = RedisAddress.from_url(f"rediss://localhost:{free_port()}?ssl_ca_certs=/nowhere.pem")
    assert address.tls == TLSSettings(ca_file="/nowhere.pem")
