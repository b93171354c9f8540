"""
Tests for configuration loading, interpolation and validation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from oproxy.config import (
    DEFAULT_LISTEN,
    ConfigError,
    endpoint_is_loopback,
    interpolate,
    load_config,
    normalise_ollama_url,
    with_overrides,
)

MINIMAL = """
listen: ["tcp:8000:interface=127.0.0.1"]
backends:
  - {name: local, type: ollama, url: "http://127.0.0.1:11434"}
auth:
  keys:
    - {name: alice, key: "sk-alice"}
"""


def test_embedded_defaults() -> None:
    config = load_config(None, {})
    assert config.listen == (DEFAULT_LISTEN,)
    assert [b.url for b in config.backends] == ["http://127.0.0.1:11434"]
    assert config.limits.max_body_bytes == 32 * 1024 * 1024
    assert config.auth.keys == ()


def test_ollama_host_environment_sets_default_backend() -> None:
    config = load_config(None, {"OLLAMA_HOST": "0.0.0.0:9999"})
    assert config.backends[0].url == "http://127.0.0.1:9999"


def test_minimal_form_from_the_docs() -> None:
    config = load_config(MINIMAL, {})
    assert config.backends[0].name == "local"
    (key,) = config.auth.keys
    assert key.name == "alice"
    assert key.sha256 == hashlib.sha256(b"sk-alice").digest()


def test_plain_keys_are_not_kept() -> None:
    config = load_config(MINIMAL, {})
    assert "sk-alice" not in repr(config)


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("${A:-d}", {}, "d"),
        ("${A:-d}", {"A": ""}, "d"),
        ("a${A}b${B:-c}", {"A": "1"}, "a1bc"),
        ("$$HOME", {}, "$HOME"),
        ("no refs", {}, "no refs"),
    ],
)
def test_interpolate(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


def test_unset_variable_without_default_names_key() -> None:
    text = "auth:\n  keys:\n    - {name: a, key: '${SECRET}'}\n"
    with pytest.raises(ConfigError) as raised:
        load_config(text, {})
    assert raised.value.key == "auth.keys[0].key"
    assert "SECRET" in str(raised.value)


def test_interpolation_in_keys() -> None:
    text = "auth:\n  keys:\n    - {name: a, key: '${SECRET}'}\n"
    config = load_config(text, {"SECRET": "sk-s"})
    assert config.auth.keys[0].sha256 == hashlib.sha256(b"sk-s").digest()


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("listen: 5", "listen", "list"),
        ("backends: []", "backends", "at least one"),
        ("backends: [{name: x}]", "backends[0].url", "required"),
        ("backends: [{url: 'ftp://x'}]", "backends[0].url", "http"),
        ("backends: [{url: 'http://x', type: magic}]", "backends[0].type", "one of"),
        ("backends: [{url: 'http://x', colour: red}]", "backends[0].colour", "not a known"),
        ("limits: {max_body_bytes: -1}", "limits.max_body_bytes", "positive"),
        ("limits: {max_body_bytes: lots}", "limits.max_body_bytes", "size"),
        ("limits: {max_n: 0}", "limits.max_n", "positive"),
        ("limits: {head_timeout: 0}", "limits.head_timeout", "positive"),
        ("limits: {max_prompt: 3}", "limits.max_prompt", "not a known"),
        ("images: {allow_hosts: ['bad host']}", "images.allow_hosts[0]", "host name"),
        ("images: {max_redirects: -1}", "images.max_redirects", "zero or more"),
        ("metrics: {allow_networks: [10.0.0.0/33]}", "metrics.allow_networks[0]", "CIDR"),
        ("timeouts: {connect: 0}", "timeouts.connect", "positive"),
        ("timeouts: {connect: yes}", "timeouts.connect", "positive"),
        ("auth: {keys: [{name: a}]}", "auth.keys[0]", "exactly one"),
        ("auth: {keys: [{name: a, key_sha256: abc}]}", "auth.keys[0].key_sha256", "64"),
        ("auth: {anonymous: 1}", "auth.anonymous", "true or false"),
        ("lisen: []", "lisen", "not a known"),
        ("- a\n- b", "", "mapping"),
    ],
)
def test_bad_settings_name_their_key(text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(text, {})
    assert raised.value.key == key
    assert words in str(raised.value)


def test_request_limits_images_and_metrics_networks() -> None:
    config = load_config(
        """
limits: {max_prompts: 10, max_n: 2, generation_concurrency: 3, head_timeout: 5,
         body_timeout: 9, max_connections: 100, max_connections_per_client: 7}
images: {allow_hosts: [Cams.Home, "*.lan", 192.168.1.7/24], max_per_request: 3,
         fetch_concurrency: 2, max_redirects: 0}
metrics: {allow_networks: [10.1.2.3/8]}
""",
        {},
    )
    limits = config.limits
    assert (limits.max_prompts, limits.max_n, limits.generation_concurrency) == (10, 2, 3)
    assert (limits.head_timeout, limits.body_timeout) == (5.0, 9.0)
    assert (limits.max_connections, limits.max_connections_per_client) == (100, 7)
    images = config.images
    assert images.allow_hosts == ("cams.home", "*.lan", "192.168.1.0/24")
    assert (images.max_per_request, images.fetch_concurrency, images.max_redirects) == (3, 2, 0)
    assert config.metrics.allow_networks == ("10.0.0.0/8",)
    assert load_config(None, {}).metrics.allow_networks == ("127.0.0.0/8", "::1/128")


def test_bad_yaml_names_line() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config("listen: [\n  'a'\n  b: c", {})
    assert "line" in str(raised.value)


def test_sizes_accept_units() -> None:
    config = load_config("limits: {max_body_bytes: 2MiB}", {})
    assert config.limits.max_body_bytes == 2 * 1024 * 1024


def test_key_sha256_form() -> None:
    digest = hashlib.sha256(b"sk-x").hexdigest()
    config = load_config(f"auth: {{keys: [{{name: a, key_sha256: '{digest}'}}]}}", {})
    assert config.auth.keys[0].sha256.hex() == digest


def test_duplicate_backend_names() -> None:
    text = "backends: [{name: a, url: 'http://x'}, {name: a, url: 'http://y'}]"
    with pytest.raises(ConfigError, match="used twice"):
        load_config(text, {})


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp:8000:interface=127.0.0.1", True),
        ("tcp:8000:interface=\\:\\:1", True),
        ("tcp:8000:interface=localhost", True),
        ("tcp:8000", False),
        ("tcp:8000:interface=0.0.0.0", False),
        ("ssl:8443:privateKey=k.pem:certKey=c.pem:interface=127.0.0.1", True),
        ("tls:/etc/certs:port=8443", False),
        ("unix:/run/oproxy.sock", True),
        ("systemd:domain=INET:index=0", False),
    ],
)
def test_endpoint_is_loopback(endpoint: str, loopback: bool) -> None:
    assert endpoint_is_loopback(endpoint) is loopback


def test_exposed_without_keys_refused() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config("listen: ['tcp:8000']", {})
    assert raised.value.key == "auth"
    assert "anonymous" in str(raised.value)


def test_exposed_with_keys_or_anonymous_allowed() -> None:
    load_config("listen: ['tcp:8000']\nauth: {anonymous: true}", {})
    load_config("listen: ['tcp:8000']\nauth: {keys: [{name: a, key: k}]}", {})


def test_command_line_overrides() -> None:
    config = with_overrides(
        load_config(MINIMAL, {}), listen=["tcp:9000:interface=127.0.0.1"], backend_url="otherhost"
    )
    assert config.listen == ("tcp:9000:interface=127.0.0.1",)
    assert config.backends[0].url == "http://otherhost:11434"


def test_command_line_listen_exposure_checked() -> None:
    with pytest.raises(ConfigError):
        with_overrides(load_config(None, {}), listen=["tcp:9000"])


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:11434"),
        ("0.0.0.0", "http://127.0.0.1:11434"),
        ("http://gpu:11434/", "http://gpu:11434"),
        ("https://ollama.example.com", "https://ollama.example.com:443"),
        ("[::1]:11434", "http://[::1]:11434"),
    ],
)
def test_normalise_ollama_url(given: str, url: str) -> None:
    assert normalise_ollama_url(given) == url


def test_workers_and_cache_settings() -> None:
    config = load_config(
        "workers: auto\ndrain_timeout: 5\n"
        "cache: {backend: redis, redis_url: 'redis://h:1/2', ttl: 60}",
        {},
    )
    assert config.workers is None
    assert config.drain_timeout == 5
    assert config.cache.backend == "redis"
    assert config.cache.redis_url == "redis://h:1/2"
    assert load_config(None, {}).workers == 1
    assert load_config(None, {}).cache.enabled


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("workers: 0", "workers"),
        ("workers: many", "workers"),
        ("cache: {backend: disk}", "cache.backend"),
        ("cache: {redis_url: 'http://x'}", "cache.redis_url"),
    ],
)
def test_bad_workers_and_cache(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(text, {})
    assert raised.value.key == key


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "etc" / "oproxy.yaml"
    config = load_config(example.read_text(), {"OLLAMA_HOST": "http://127.0.0.1:11434"})
    assert config.backends[0].url == "http://127.0.0.1:11434"
    assert config.auth.keys


def test_sentry_settings_from_file_or_environment() -> None:
    from_env = load_config(None, {"SENTRY_DSN": "https://k@sentry.example/1"})
    assert from_env.sentry.dsn == "https://k@sentry.example/1"
    assert from_env.sentry.environment == "production"
    from_file = load_config(
        "sentry: {dsn: 'http://k@127.0.0.1:9/2', environment: staging, release: r1}", {}
    )
    assert (from_file.sentry.dsn, from_file.sentry.environment, from_file.sentry.release) == (
        "http://k@127.0.0.1:9/2",
        "staging",
        "r1",
    )
    assert load_config(None, {}).sentry.dsn is None
    with pytest.raises(ConfigError) as raised:
        load_config("sentry: {dsn: 'not a url'}", {})
    assert raised.value.key == "sentry.dsn"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "limits: {max_body_bytes: lots}",
            "limits.max_body_bytes: must be a positive size such as 32MiB, not 'lots'",
        ),
        ("backends: [{name: x}]", "backends[0].url: is required"),
        ("lisen: []", "lisen: is not a known setting"),
        ("lisen:", "lisen: is not a known setting"),
        (
            "timeouts: {connect: yes}",
            "timeouts.connect: must be a positive number of seconds, not True",
        ),
        ("listen: []", "listen: must name at least one endpoint"),
        (
            "images: {allow_hosts: ['bad host']}",
            "images.allow_hosts[0]: must be a host name or a network (CIDR), not 'bad host'",
        ),
        ("auth: {anonymous: 1}", "auth.anonymous: must be true or false, not an integer"),
        (
            "auth: {keys: [{name: a, key: k}, {name: a, key: j}]}",
            "auth.keys: key name 'a' is used twice",
        ),
        (
            "routing: {circuit_breaker: {failures: 0}}",
            "routing.circuit_breaker.failures: must be a positive whole number, not 0",
        ),
        (
            "routing: {circuit_breaker: {colour: red}}",
            "routing.circuit_breaker.colour: is not a known setting",
        ),
        (
            "routing: {circuit_breaker: [3]}",
            "routing.circuit_breaker: must be a mapping, not a list",
        ),
        ("routing: {breaker_failures: 3}", "routing.breaker_failures: is not a known setting"),
        ("routing: {models: {x: {}}}", "routing.models: is not a known setting"),
        ("models: {x: {pattern: y}}", "models.x.pattern: is not a known setting"),
        ("models: {'[ab]*': {tagret: y}}", "models.[ab]*.tagret: is not a known setting"),
        (
            "metrics: {bearer_token: 5}",
            "metrics.bearer_token: must be a non-empty string, not an integer",
        ),
        ("metrics: {token_sha256: abc}", "metrics.token_sha256: is not a known setting"),
        (
            "auth: {keys: [{name: a, key: k, sha256: abc}]}",
            "auth.keys[0].sha256: is not a known setting",
        ),
        ("access_log: {max_bytes: 1MiB}", "access_log.path: is required"),
        (
            "backends: [{url: 'http://x', timeouts: {conect: 1}}]",
            "backends[0].timeouts.conect: is not a known setting",
        ),
    ],
)
def test_errors_name_the_key_as_the_file_spells_it(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(text, {})
    assert str(raised.value) == message


def test_empty_values_mean_the_defaults() -> None:
    text = "limits: {max_n: null}\nrouting: {circuit_breaker: }\naccess_log: {}\nimages:\n"
    config = load_config(text, {})
    assert config == load_config(None, {})
    assert config.access_log is None


def test_a_backends_timeouts_are_the_global_ones_overridden_key_by_key() -> None:
    config = load_config(
        "timeouts: {connect: 7}\n"
        "backends: [{name: a, url: 'http://a', timeouts: {first_byte: 9}}, {url: 'http://b'}]",
        {},
    )
    a, b = config.backends
    assert (a.timeouts.connect, a.timeouts.first_byte, a.timeouts.between_chunks) == (7, 9, 300)
    assert (b.name, b.timeouts) == ("backend1", config.timeouts)
    assert load_config("timeouts: {connect: 7}", {}).backends[0].timeouts.connect == 7


@pytest.mark.parametrize(
    "url", ["rediss://:secret@redis.example:6380/1", "unix:///run/redis.sock?db=2"]
)
def test_redis_urls_may_use_tls_or_a_socket(url: str) -> None:
    config = load_config(
        f"cache: {{backend: redis, redis_url: '{url}'}}\nstate: {{backend: redis, url: '{url}'}}",
        {},
    )
    assert (config.cache.redis_url, config.state.url) == (url, url)


def test_secrets_are_not_in_a_repr() -> None:
    config = load_config(
        """
backends: [{name: up, type: openai, url: "http://x/v1", api_key: sk-upstream}]
metrics: {bearer_token: scrape-me}
auth: {keys: [{name: alice, key: sk-alice}]}
""",
        {},
    )
    assert config.metrics.token_sha256 == hashlib.sha256(b"scrape-me").digest()
    shown = repr(config)
    assert "scrape-me" not in shown and "sk-upstream" not in shown and "sk-alice" not in shown
