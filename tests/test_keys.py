"""
Key format, policies, the ``auth:`` / ``state:`` config sections.
"""

from __future__ import annotations

import calendar
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oproxy.config import ConfigError, default_state_path, load_config
from oproxy.security import keys
from oproxy.security.keys import hash_key
from oproxy.security.policy import (
    KeyPolicy,
    Limits,
    PolicyError,
    policy_from_json,
    policy_to_json,
)
from oproxy.security.records import check_key_name, shown_name


def test_issued_keys_have_the_documented_shape() -> None:
    issued = keys.issue()
    assert issued.token.startswith("sk-oproxy-")
    assert keys.parse_token(issued.token) == (issued.key_id, issued.secret)
    assert len(issued.secret) == keys.SECRET_LENGTH and issued.secret.isalnum()
    assert issued.secret_sha256 == hash_key(issued.secret)
    assert keys.looks_like_key_id(issued.key_id)
    rotated = keys.issue(issued.key_id)
    assert rotated.key_id == issued.key_id and rotated.secret != issued.secret


@pytest.mark.parametrize(
    "token",
    [
        "",
        "sk-oproxy-",
        "sk-oproxy-abc-def",
        "sk-oproxy-ABCDEFGHIJKL-" + "a" * 43,  # ids are lowercase
        "sk-oproxy-abcdefghijkl-" + "a" * 42,
        "sk-oproxy-abcdefghijkl-" + "a" * 43 + "-",
        "sk-other-abcdefghijkl-" + "a" * 43,
    ],
)
def test_other_tokens_are_not_ours(token: str) -> None:
    assert keys.parse_token(token) is None


def test_secrets_do_not_repeat() -> None:
    assert len({keys.new_secret() for _ in range(1000)}) == 1000


policies = st.builds(
    KeyPolicy,
    models=st.lists(st.sampled_from(["llama3*", "qwen3:8b", "*"]), max_size=3).map(tuple),
    networks=st.lists(
        st.sampled_from(["10.0.0.0/8", "192.168.1.0/24", "::1/128"]).map(ipaddress.ip_network),
        max_size=2,
    ).map(tuple),
    expires=st.none() | st.floats(0, 4e9),
    limits=st.builds(
        Limits,
        rpm=st.none() | st.integers(1, 10**6),
        tpm=st.none() | st.integers(1, 10**9),
        max_parallel=st.none() | st.integers(1, 64),
    ),
    model_limits=st.lists(
        st.tuples(st.sampled_from(["a*", "b*"]), st.builds(Limits, rpm=st.integers(1, 9))),
        max_size=2,
        unique_by=lambda pair: pair[0],
    ).map(tuple),
    admin=st.booleans(),
)


@given(policies)
def test_policies_survive_the_store(policy: KeyPolicy) -> None:
    assert policy_from_json(policy_to_json(policy)) == policy


@pytest.mark.parametrize(
    "data",
    [
        {"modles": ["x"]},
        {"limits": {"rpm": 0}},
        {"limits": {"rpm": True}},
        {"limits": {"burst": 3}},
        {"model_limits": {"x*": {"daily_tokens": 5}}},
        {"networks": ["not a network"]},
        {"admin": "yes"},
        {"expires": "tomorrow"},
    ],
)
def test_bad_stored_policies_are_refused(data: dict[str, object]) -> None:
    with pytest.raises(PolicyError):
        policy_from_json(data)


def test_policy_checks() -> None:
    policy = KeyPolicy(
        models=("llama3*", "qwen3:8b"),
        networks=(ipaddress.ip_network("10.0.0.0/8"),),
        expires=100.0,
    )
    assert policy.allows_model("llama3.2:3b") and policy.allows_model("qwen3:8b")
    assert not policy.allows_model("qwen3:32b")
    assert policy.allows_address("10.1.2.3") and policy.allows_address("::ffff:10.1.2.3")
    assert not policy.allows_address("192.168.0.1") and not policy.allows_address("unix")
    assert not policy.expired(99.9) and policy.expired(100.0)
    assert KeyPolicy().allows_model("anything") and KeyPolicy().allows_address("1.2.3.4")


def test_keys_in_the_config_carry_policies() -> None:
    config = load_config(
        """
auth:
  keys:
    - name: alice
      key: sk-alice
      models: ["llama3*"]
      networks: [10.0.0.0/8]
      expires: 2027-01-31
      rpm: 60
      tpm: 100000
      max_parallel: 4
      daily_tokens: 1000
      monthly_tokens: 20000
      model_limits: {"qwen*": {rpm: 10}}
      admin: true
  anonymous: true
  anonymous_limits: {rpm: 30}
""",
        {},
    )
    (alice,) = config.auth.keys
    assert alice.sha256 == hash_key("sk-alice")
    assert alice.policy == KeyPolicy(
        models=("llama3*",),
        networks=(ipaddress.ip_network("10.0.0.0/8"),),
        expires=float(calendar.timegm((2027, 1, 31, 0, 0, 0, 0, 0, 0))),
        limits=Limits(rpm=60, tpm=100000, max_parallel=4, daily_tokens=1000, monthly_tokens=20000),
        model_limits=(("qwen*", Limits(rpm=10)),),
        admin=True,
    )
    assert config.auth.anonymous_limits == Limits(rpm=30)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("auth: {keys: [{name: a, key: k, rpm: 0}]}", "auth.keys[0].rpm"),
        ("auth: {keys: [{name: a, key: k, rmp: 5}]}", "auth.keys[0].rmp"),
        ("auth: {keys: [{name: a, key: k, expires: soon}]}", "auth.keys[0].expires"),
        ("auth: {keys: [{name: a, key: k, networks: [nope]}]}", "auth.keys[0].networks[0]"),
        (
            "auth: {keys: [{name: a, key: k, model_limits: {x: {max_parallel: 2}}}]}",
            "auth.keys[0].model_limits.x",
        ),
        ("auth: {anonymous_limits: {rpm: -1}}", "auth.anonymous_limits"),
        ("state: {backend: etcd}", "state.backend"),
        ("state: {backend: redis}", "state.url"),
        ("state: {on_unavailable: maybe}", "state.on_unavailable"),
    ],
)
def test_bad_auth_and_state_settings_name_the_key(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(text, {})
    assert caught.value.key == where


def test_state_settings_and_the_default_path() -> None:
    config = load_config("state: {backend: redis, url: 'redis://127.0.0.1:6379/2'}", {})
    assert (config.state.backend, config.state.url, config.state.on_unavailable) == (
        "redis",
        "redis://127.0.0.1:6379/2",
        "closed",
    )
    assert default_state_path({"STATE_DIRECTORY": "/var/lib/oproxy"}) == "/var/lib/oproxy/state.db"
    assert default_state_path({"XDG_STATE_HOME": "/x"}) == "/x/oproxy/state.db"
    assert default_state_path({"HOME": "/home/u"}) == "/home/u/.local/state/oproxy/state.db"
    assert load_config(None, {"XDG_STATE_HOME": "/s"}).state.path == "/s/oproxy/state.db"


def test_listening_beyond_loopback_accepts_stored_keys_when_said() -> None:
    with pytest.raises(ConfigError, match="require_keys"):
        load_config("listen: tcp:8000", {})
    assert load_config("listen: tcp:8000\nauth: {require_keys: true}", {}).auth.require_keys


# -- key names ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["ci", "alice", "bob@example.com", "team:ci-runner_2.x", "A1", "9" * 64]
)
def test_plain_key_names_are_accepted(name: str) -> None:
    assert check_key_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x\ny",
        "x" * 65,
        pytest.param("x" * 100_000, id="x*100000"),
        " ci",
        "ci ",
        "two words",
        "tab\there",
        "nul\x00",
        "esc\x1b[31m",
        "-rm",
        ".hidden",
        "caf\u00e9",
        "zero\u200bwidth",
        "slash/name",
        None,
        42,
    ],
)
def test_other_key_names_are_refused(name: object) -> None:
    with pytest.raises(ValueError, match="letters, digits"):
        check_key_name(name)


@given(st.text())
def test_accepted_names_are_short_printable_ascii(name: str) -> None:
    try:
        check_key_name(name)
    except ValueError:
        return
    assert 1 <= len(name) <= 64
    assert name.isascii() and name.isprintable() and not any(c.isspace() for c in name)


@given(st.text(max_size=200))
def test_any_stored_name_is_shown_safely(name: str) -> None:
    shown = shown_name(name)
    assert shown.isprintable()
    # At most 64 characters, each escaped to at most 10 (\U0010ffff), quoted, cut short.
    assert len(shown) <= 64 * 10 + 5
