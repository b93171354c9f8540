"""
What every translator shares: ids, timestamps, usage, sampling options, the
Ollama ``options`` pass-through, and the field checks that turn a bad value
into an :class:`InvalidRequest` naming its ``param``.

The field checks are strict about JSON types on purpose.  Python's ``bool`` is
an ``int``, so a naive ``isinstance`` would accept ``"temperature": true``;
Ollama would then answer with a 500 ("option must be of type float32") long
after we could have told the client which field was wrong.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import string
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from oproxy.errors import InvalidRequest, UpstreamError

SYSTEM_FINGERPRINT: Final = "fp_oproxy"
"""Sent as ``system_fingerprint``: some clients log it, none may rely on it."""

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1

_TOKEN_ALPHABET: Final = string.ascii_letters + string.digits
_TOKEN_LENGTH: Final = 24


# --------------------------------------------------------------------------
# Identifiers, timestamps, usage


def random_token(length: int = _TOKEN_LENGTH) -> str:
    """
    ``length`` letters and digits drawn from :mod:`secrets`.

    Ollama's own ids are ``chatcmpl-0`` .. ``chatcmpl-998`` and collide; 24
    base-62 characters carry about 143 bits, so ours never do.  One call to
    :func:`secrets.randbelow` keeps this to a single ``urandom`` read.
    """
    number = secrets.randbelow(len(_TOKEN_ALPHABET) ** length)
    characters = []
    for _ in range(length):
        number, digit = divmod(number, len(_TOKEN_ALPHABET))
        characters.append(_TOKEN_ALPHABET[digit])
    return "".join(characters)


def new_completion_id(prefix: str) -> str:
    """
    A unique id such as ``chatcmpl-…``, ``cmpl-…`` or ``call_…``.
    """
    return prefix + random_token()


def created_from_ollama(timestamp: object, fallback: int) -> int:
    """
    Unix seconds from an Ollama RFC 3339 timestamp, else ``fallback``.

    Ollama writes Go ``time.Time`` values: nanosecond fractions, ``Z`` or a
    local offset (``2025-05-04T17:37:44.706015396-07:00``).  A missing,
    unparsable or pre-1970 value (Go's zero time ``0001-01-01T00:00:00Z``)
    gives ``fallback``, because OpenAI's ``created`` is a positive integer.
    """
    if not isinstance(timestamp, str):
        return fallback
    try:
        moment = datetime.fromisoformat(timestamp.strip())
    except ValueError:
        return fallback
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = math.floor(moment.timestamp())
    return seconds if seconds > 0 else fallback


def token_count(value: object) -> int:
    """A token count from upstream; anything but a sane integer counts as 0."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX:
        return value
    return 0


def usage_from_ollama(native: Mapping[str, Any]) -> dict[str, int]:
    """
    OpenAI ``usage`` from a native final line.

    Ollama omits zero counts (``omitempty``) and leaves out ``prompt_eval_count``
    when the prompt came from its cache, so a missing count is 0, not an error.
    """
    prompt = token_count(native.get("prompt_eval_count"))
    completion = token_count(native.get("eval_count"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def combined_usage(usages: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """
    The sum of several ``usage`` objects, for a request that fanned out
    (a completions prompt list) into several upstream calls.
    """
    total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for usage in usages:
        for key in total:
            total[key] += usage.get(key, 0)
    return total


def raise_for_upstream_error(line: Mapping[str, Any]) -> None:
    """
    Raise :class:`UpstreamError` if ``line`` is Ollama's ``{"error": "..."}``.

    After a stream has started Ollama reports a failure as a last NDJSON line
    with no ``done``; its own /v1 layer turns that into an empty chunk and the
    error is lost.  Raising lets the relay send an SSE error event instead.
    """
    error = line.get("error")
    if error is None:
        return
    message: object = error
    if isinstance(error, Mapping):
        message = error.get("message")
    if not isinstance(message, str) or not message:
        message = "The upstream server reported an error."
    raise UpstreamError(message)


# --------------------------------------------------------------------------
# Field validation


def join_path(*parts: str | int) -> str:
    """
    A dotted ``param`` path such as ``messages.2.content.0.image_url``.
    """
    return ".".join(str(part) for part in parts if part != "")


#: The JSON types as OpenAI's error messages name them, in the order they
#: are told apart (a ``bool`` is an ``int`` to Python, not to JSON).
_JSON_TYPE_NAMES: Final[tuple[tuple[type, str], ...]] = (
    (type(None), "null"),
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a decimal"),
    (str, "a string"),
    (Mapping, "an object"),
    (list, "an array"),
)


def describe(value: object) -> str:
    """The JSON type of ``value`` as OpenAI's error messages phrase it."""
    for kind, name in _JSON_TYPE_NAMES:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def wrong_type(param: str, expected: str, value: object) -> InvalidRequest:
    """The error for a field of the wrong JSON type."""
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {describe(value)} instead.",
        param=param,
        code="invalid_type",
    )


def missing_parameter(param: str) -> InvalidRequest:
    """The error for a required field that is absent."""
    return InvalidRequest(
        f"Missing required parameter: '{param}'.",
        param=param,
        code="missing_required_parameter",
    )


def invalid_value(param: str, message: str) -> InvalidRequest:
    """The error for a field of the right type but an unacceptable value."""
    return InvalidRequest(message, param=param, code="invalid_value")


def array_too_long(param: str, most: int, length: int) -> InvalidRequest:
    """The error for an array of ``length`` entries where ``most`` are allowed."""
    return invalid_value(
        param,
        f"Invalid '{param}': array too long. Expected an array with maximum length "
        f"{most}, but got an array with length {length} instead.",
    )


def unexpected_value(param: str, expected: str) -> InvalidRequest:
    """
    The error for a value that is none of a field's choices, worded as
    OpenAI words it: ``Invalid value for '<param>': <expected>``.
    """
    return invalid_value(param, f"Invalid value for '{param}': {expected}")


def unsupported_value(param: str, message: str) -> InvalidRequest:
    """The error for a valid OpenAI value that Ollama cannot honour."""
    return InvalidRequest(message, param=param, code="unsupported_value")


def require_object_body(body: object) -> Mapping[str, Any]:
    """The request body itself, which must be a JSON object."""
    if not isinstance(body, Mapping):
        raise InvalidRequest(
            f"The request body must be a JSON object, but got {describe(body)}.",
            code="invalid_type",
        )
    return body


def as_string(value: object, param: str) -> str:
    """``value`` if it is a string."""
    if not isinstance(value, str):
        raise wrong_type(param, "a string", value)
    return value


def as_boolean(value: object, param: str) -> bool:
    """``value`` if it is a boolean (``0`` and ``1`` are not)."""
    if not isinstance(value, bool):
        raise wrong_type(param, "a boolean", value)
    return value


def as_object(value: object, param: str) -> Mapping[str, Any]:
    """``value`` if it is a JSON object."""
    if not isinstance(value, Mapping):
        raise wrong_type(param, "an object", value)
    return value


def as_array(value: object, param: str) -> list[Any]:
    """``value`` if it is a JSON array."""
    if not isinstance(value, list):
        raise wrong_type(param, "an array", value)
    return value


def objects_of(value: object, param: str) -> Iterator[tuple[Mapping[str, Any], str]]:
    """Each entry of the array ``value``, checked to be an object, and its ``param``."""
    for index, entry in enumerate(as_array(value, param)):
        entry_param = join_path(param, index)
        yield as_object(entry, entry_param), entry_param


def _check_range(
    value: float, param: str, kind: str, minimum: float | None, maximum: float | None
) -> None:
    if minimum is not None and value < minimum:
        raise invalid_value(
            param,
            f"Invalid '{param}': {kind} below minimum value. "
            f"Expected a value >= {minimum}, but got {value} instead.",
        )
    if maximum is not None and value > maximum:
        raise invalid_value(
            param,
            f"Invalid '{param}': {kind} above maximum value. "
            f"Expected a value <= {maximum}, but got {value} instead.",
        )


def as_integer(
    value: object,
    param: str,
    *,
    minimum: int | None = INT64_MIN,
    maximum: int | None = INT64_MAX,
) -> int:
    """
    ``value`` as an integer within bounds.

    A float with no fraction (``16.0``, as some JavaScript clients send) is
    accepted; a boolean is not.  The default bounds are int64, so the value
    survives ``orjson.dumps`` and Go's ``int``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise wrong_type(param, "an integer", value)
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise wrong_type(param, "an integer", value)
        value = int(value)
    _check_range(value, param, "integer", minimum, maximum)
    return value


def as_number(
    value: object,
    param: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> int | float:
    """``value`` if it is a finite number within bounds (a boolean is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise wrong_type(param, "a number", value)
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid_value(param, f"Invalid '{param}': expected a finite number.")
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise invalid_value(param, f"Invalid '{param}': number out of range.")
    _check_range(value, param, "decimal", minimum, maximum)
    return value


def ensure_json_safe(value: Any, param: str) -> Any:
    """
    ``value`` if ``orjson`` can serialise it, for fields passed through as is.

    JSON parsed by the standard library may hold integers beyond 64 bits,
    which ``orjson.dumps`` refuses; finding that here makes it a 400 about
    the field instead of a 500 in the HTTP layer.
    """
    try:
        orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        raise invalid_value(
            param, f"Invalid '{param}': contains a value that cannot be sent upstream."
        ) from None
    return value


def compact_json(value: Any) -> str:
    """
    ``value`` as compact JSON text, key order kept, as OpenAI sends tool
    call ``arguments``.
    """
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def present(body: Mapping[str, Any], key: str) -> Any:
    """
    ``body[key]``, with JSON ``null`` and absence both meaning "not given".

    OpenAI marks most optional fields nullable and the SDK sends ``null`` for
    fields a caller set to ``None``, so the two must behave alike.
    """
    return body.get(key)


def required(body: Mapping[str, Any], key: str, param: str) -> Any:
    """``body[key]``; absent or null, it is a missing parameter."""
    value = present(body, key)
    if value is None:
        raise missing_parameter(param)
    return value


def required_string(body: Mapping[str, Any], key: str, param: str) -> str:
    """``body[key]`` as a string; absent or null, it is a missing parameter."""
    return as_string(required(body, key, param), param)


def required_object(body: Mapping[str, Any], key: str, param: str) -> Mapping[str, Any]:
    """``body[key]`` as an object; absent or null, it is a missing parameter."""
    return as_object(required(body, key, param), param)


def optional_string(body: Mapping[str, Any], key: str, param: str) -> str | None:
    """``body[key]`` as a string, or None when absent or null."""
    value = present(body, key)
    return None if value is None else as_string(value, param)


def optional_boolean(body: Mapping[str, Any], key: str, param: str) -> bool | None:
    """``body[key]`` as a boolean, or None when absent or null."""
    value = present(body, key)
    return None if value is None else as_boolean(value, param)


def optional_object(body: Mapping[str, Any], key: str, param: str) -> Mapping[str, Any] | None:
    """``body[key]`` as an object, or None when absent or null."""
    value = present(body, key)
    return None if value is None else as_object(value, param)


def optional_integer(
    body: Mapping[str, Any],
    key: str,
    param: str,
    *,
    minimum: int | None = INT64_MIN,
    maximum: int | None = INT64_MAX,
) -> int | None:
    """``body[key]`` as a bounded integer, or None when absent or null."""
    value = present(body, key)
    if value is None:
        return None
    return as_integer(value, param, minimum=minimum, maximum=maximum)


def optional_number(
    body: Mapping[str, Any],
    key: str,
    param: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> int | float | None:
    """``body[key]`` as a bounded finite number, or None when absent or null."""
    value = present(body, key)
    if value is None:
        return None
    return as_number(value, param, minimum=minimum, maximum=maximum)


def set_given(target: dict[str, Any], key: str, value: object) -> None:
    """``target[key] = value``, when the value is given (not None)."""
    if value is not None:
        target[key] = value


def _is_token_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    )


def text_inputs(
    body: Mapping[str, Any], key: str, *, tokens_refused: str, most: int | None = None
) -> list[str]:
    """
    ``body[key]`` as a list of texts: one string, or an array of 1 to
    ``most`` strings (an empty string is a text).

    No Ollama endpoint takes token ids, so an array of integers, or an
    array of such arrays, is refused with ``tokens_refused``, which says
    what to send instead, rather than with Ollama's Go decode error.
    """
    body = require_object_body(body)
    value = body.get(key)
    if value is None:
        raise missing_parameter(key)
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise wrong_type(key, "a string or an array of strings", value)
    if not value:
        raise invalid_value(
            key, f"Invalid '{key}': empty array. Expected an array with minimum length 1."
        )
    if most is not None and len(value) > most:
        raise array_too_long(key, most, len(value))
    if _is_token_list(value):
        raise unsupported_value(key, tokens_refused)
    for index, item in enumerate(value):
        if _is_token_list(item):
            raise unsupported_value(key, tokens_refused)
        if not isinstance(item, str):
            raise wrong_type(join_path(key, index), "a string", item)
    return list(value)


# --------------------------------------------------------------------------
# Request flags


def wants_stream(body: Mapping[str, Any]) -> bool:
    """
    The request's ``stream`` flag, false by default.

    The native API streams by default, so every translated body sets
    ``stream`` explicitly from this.
    """
    return optional_boolean(body, "stream", "stream") is True


def wants_usage_chunk(body: Mapping[str, Any]) -> bool:
    """``stream_options.include_usage``: whether a stream ends with a usage chunk."""
    stream_options = optional_object(body, "stream_options", "stream_options")
    if stream_options is None:
        return False
    flag = optional_boolean(stream_options, "include_usage", "stream_options.include_usage")
    return flag is True


# --------------------------------------------------------------------------
# Sampling options


_BOUNDED_SAMPLING: Final[Mapping[str, tuple[float, float]]] = {
    "temperature": (0, 2),
    "top_p": (0, 1),
    "frequency_penalty": (-2, 2),
    "presence_penalty": (-2, 2),
}
_MAX_STOP_SEQUENCES: Final = 4


def stop_sequences(value: object, param: str) -> list[str] | None:
    """
    OpenAI ``stop`` (a string or up to four strings) as Ollama's list.

    Ollama's /v1 silently drops non-string items; a 400 tells the client.
    Empty strings are dropped because they match everywhere.
    """
    if value is None:
        return None
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise wrong_type(param, "a string or an array of strings", value)
    if len(items) > _MAX_STOP_SEQUENCES:
        raise array_too_long(param, _MAX_STOP_SEQUENCES, len(items))
    for item in items:
        if not isinstance(item, str):
            raise wrong_type(param, "a string or an array of strings", item)
    sequences = [item for item in items if item]
    return sequences or None


def _token_limit(body: Mapping[str, Any], param_prefix: str) -> int | None:
    """
    ``max_completion_tokens``, else the deprecated ``max_tokens``.

    Ollama's /v1 ignores ``max_completion_tokens`` and generation runs
    unbounded.  The minimum is 1 because ``num_predict: 0`` means "no limit"
    to the runner, the opposite of what the client asked for.
    """
    preferred = optional_integer(
        body, "max_completion_tokens", param_prefix + "max_completion_tokens", minimum=1
    )
    legacy = optional_integer(body, "max_tokens", param_prefix + "max_tokens", minimum=1)
    return preferred if preferred is not None else legacy


def sampling_options(body: Mapping[str, Any], param_prefix: str = "") -> dict[str, Any]:
    """
    Native ``options`` from the OpenAI sampling fields, only those given.

    Unlike Ollama's /v1, an absent ``temperature`` or ``top_p`` is not sent
    as 1.0, so the Modelfile's values still apply.  ``param_prefix`` names
    the fields when they are nested in a larger object.
    """
    options: dict[str, Any] = {}
    for name, (minimum, maximum) in _BOUNDED_SAMPLING.items():
        value = optional_number(body, name, param_prefix + name, minimum=minimum, maximum=maximum)
        if value is not None:
            options[name] = value
    seed = optional_integer(body, "seed", param_prefix + "seed")
    if seed is not None:
        options["seed"] = seed
    stop = stop_sequences(present(body, "stop"), param_prefix + "stop")
    if stop is not None:
        options["stop"] = stop
    limit = _token_limit(body, param_prefix)
    if limit is not None:
        options["num_predict"] = limit
    return options


# --------------------------------------------------------------------------
# Ollama extras: the ``options`` object, keep_alive, format, think


_INTEGER_OPTIONS: Final = frozenset(
    {
        "num_keep",
        "seed",
        "num_predict",
        "top_k",
        "repeat_last_n",
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "mirostat",
    }
)
_NUMBER_OPTIONS: Final = frozenset(
    {
        "temperature",
        "top_p",
        "min_p",
        "typical_p",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
        "tfs_z",
        "mirostat_tau",
        "mirostat_eta",
    }
)
_BOOLEAN_OPTIONS: Final = frozenset(
    {"use_mmap", "use_mlock", "numa", "low_vram", "f16_kv", "vocab_only", "penalize_newline"}
)

_GO_DURATION: Final = re.compile(
    r"[-+]?(?:0|(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h))+)"
)
"""What Go's ``time.ParseDuration`` accepts, as Ollama parses ``keep_alive``."""


def _native_stop(value: object, param: str) -> list[str]:
    """Native ``options.stop``: a list of strings (a lone string is wrapped)."""
    items = [value] if isinstance(value, str) else as_array(value, param)
    for index, item in enumerate(items):
        as_string(item, join_path(param, index))
    return list(items)


def native_option(key: str, value: object, param: str) -> Any:
    """
    One entry of the native ``options`` object, checked against Ollama's types.

    Ollama answers a mistyped option with a 500; a 400 naming the option is
    more useful.  Keys Ollama may know but we do not (older releases accept
    ``mirostat``-era options, newer ones may add some) pass through unchanged:
    Ollama ignores keys it does not know.
    """
    if key in _INTEGER_OPTIONS:
        return as_integer(value, param)
    if key in _NUMBER_OPTIONS:
        return as_number(value, param)
    if key in _BOOLEAN_OPTIONS:
        return as_boolean(value, param)
    if key == "stop":
        return _native_stop(value, param)
    return ensure_json_safe(value, param)


def keep_alive_value(value: object, param: str) -> str | int | float:
    """
    A native ``keep_alive``: a Go duration string (``"5m"``, ``"0"``) or seconds.
    """
    if isinstance(value, str):
        if not _GO_DURATION.fullmatch(value):
            raise invalid_value(
                param,
                f"Invalid '{param}': {value!r} is not a duration; use e.g. \"5m\", "
                '"1h30m", "0" or a number of seconds.',
            )
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise wrong_type(param, "a duration string or a number of seconds", value)
    return as_number(value, param)


def generation_options(body: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    A generation's native ``options`` and top-level fields: Ollama's own
    knobs (:func:`native_extras`) with the OpenAI sampling fields
    (:func:`sampling_options`) over them, so an explicit OpenAI field wins.
    """
    options, top_level = native_extras(body)
    options.update(sampling_options(body))
    return options, top_level


def native_extras(body: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    Ollama's own knobs, from an ``options`` object and a top-level ``keep_alive``.

    The OpenAI SDK sends them with ``extra_body={"options": {"num_ctx": 8192},
    "keep_alive": "10m"}``.  Ollama's /v1 drops both, so long prompts are
    silently cut to the default context; passing them through fixes that.
    Returns ``(options, top_level)``: the native ``options`` and the fields
    that belong at the native top level (``keep_alive``, also accepted as
    ``options.keep_alive``; the top-level one wins).  Callers merge the OpenAI
    sampling fields over ``options`` so an explicit OpenAI field wins.
    """
    raw = optional_object(body, "options", "options")
    options: dict[str, Any] = {}
    keep_alive: str | int | float | None = None
    for key, value in (raw or {}).items():
        if value is None:
            continue
        param = join_path("options", key)
        if key == "keep_alive":
            keep_alive = keep_alive_value(value, param)
        else:
            options[key] = native_option(key, value, param)
    top_level_keep_alive = present(body, "keep_alive")
    if top_level_keep_alive is not None:
        keep_alive = keep_alive_value(top_level_keep_alive, "keep_alive")
    top_level = {} if keep_alive is None else {"keep_alive": keep_alive}
    return options, top_level


_NATIVE_THINK_LEVELS: Final = frozenset({"low", "medium", "high", "max"})


def native_format(body: Mapping[str, Any]) -> str | dict[str, Any] | None:
    """
    A top-level native ``format`` (``"json"`` or a JSON Schema object), if sent.
    """
    value = present(body, "format")
    if value is None or value == "":
        return None
    if value == "json":
        return "json"
    if isinstance(value, Mapping):
        return dict(ensure_json_safe(value, "format"))
    raise invalid_value("format", "Invalid 'format': expected \"json\" or a JSON Schema object.")


def native_think(body: Mapping[str, Any]) -> bool | str | None:
    """A top-level native ``think`` (a boolean or a level), if sent."""
    value = present(body, "think")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value in _NATIVE_THINK_LEVELS:
        return value
    raise invalid_value(
        "think",
        'Invalid \'think\': expected true, false, "low", "medium", "high" or "max".',
    )


def envelope(kind: str, *, completion_id: str, model: str, created: int) -> dict[str, Any]:
    """
    The fields an OpenAI completion object, or one of its chunks, begins
    with, in OpenAI's order; ``kind`` is its ``object``.
    """
    return {
        "id": completion_id,
        "object": kind,
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


class StreamTranslation(ABC):
    """
    What every stream translator knows about the stream so far, and what it
    does: :meth:`feed` it native lines, it gives OpenAI chunks.

    :ivar done: whether the native ``done: true`` line has been translated.
    :ivar usage: the usage from the done line, or None before it.
    """

    def __init__(self, kind: str, *, completion_id: str, model: str, created: int) -> None:
        """:param kind: the ``object`` of the chunks, which start with :func:`envelope`."""
        self.done = False
        self.usage: dict[str, int] | None = None
        self._text_parts: list[str] = []
        self._envelope = envelope(kind, completion_id=completion_id, model=model, created=created)

    @property
    def text(self) -> str:
        """The text streamed so far, for logging and partial accounting."""
        return "".join(self._text_parts)

    @abstractmethod
    def feed(self, native_line: Mapping[str, Any]) -> list[dict[str, Any]]:
        """
        The chunks to send for one native line (possibly none; none at all
        once the done line is translated).

        :raises UpstreamError: for an ``{"error": ...}`` line.
        """
