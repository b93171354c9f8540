"""
The fake Ollama's model catalogue: what a model is, how names resolve, and
the default models whose behaviour tests rely on.

Ollama resolves ``llama3.2`` to ``registry.ollama.ai/library/llama3.2:latest``
and matches existing models case-insensitively, while every response echoes
the name exactly as sent.  Proxies get this wrong in both directions, so the
fake reproduces the resolution rules of ``types/model.Name``.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from oproxy.testing.ollama.wire import parse_rfc3339_ns, rfc3339_nano

DEFAULT_HOST: Final = "registry.ollama.ai"
DEFAULT_NAMESPACE: Final = "library"
DEFAULT_TAG: Final = "latest"

BROKEN_ERROR: Final = "an error was encountered while running the model: unexpected EOF"
"""The mid-stream error ``broken:latest`` reports."""

CRASH_ERROR: Final = "llama runner process has terminated: exit status 2"
"""The error ``crash:latest`` answers with, status 500, before any byte."""

COLD_LOAD_SECONDS: Final = 1.0
"""How long ``cold:latest`` takes to load when it is not in memory."""

DEFAULT_KEEP_ALIVE: Final = 300.0
"""Seconds a model stays loaded without ``keep_alive`` (``OLLAMA_KEEP_ALIVE``)."""

DEFAULT_NUM_CTX: Final = 4096
"""The context length a runner gets without ``options.num_ctx``."""

_FOREVER_NS: Final = (1 << 63) - 1

_PART_PATTERNS: Final = {
    "host": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}$"),
    "namespace": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,79}$"),
    "model": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$"),
    "tag": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$"),
}


@dataclass(frozen=True)
class ModelName:
    """
    A parsed ``[host/][namespace/]model[:tag]`` with Ollama's defaults
    filled in.
    """

    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """
        Split like Go's ``model.ParseNameBare`` and merge the defaults; the
        result may be invalid (see :meth:`is_valid`).
        """
        rest, tag = text, None
        if text.rfind(":") > text.rfind("/"):
            rest, tag = _cut_last(text, ":")
        rest, model = _cut_last(rest, "/")
        host, namespace = "", None
        if model is None:
            model = rest
        else:
            host, namespace = _cut_last(rest, "/")
            if namespace is None:
                host, namespace = "", host
            host = host.split("://", 1)[-1]
        return cls(
            host=host or DEFAULT_HOST,
            namespace=namespace or DEFAULT_NAMESPACE,
            model=model,
            tag=tag or DEFAULT_TAG,
        )

    def is_valid(self) -> bool:
        """
        Whether every part matches Ollama's allowed characters and lengths.
        """
        return all(
            pattern.match(getattr(self, part)) is not None
            for part, pattern in _PART_PATTERNS.items()
        )

    @property
    def full(self) -> str:
        """
        ``registry.ollama.ai/library/llama3.2:latest``: the form used in
        capability errors.
        """
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def key(self) -> str:
        """
        The case-insensitive lookup key.
        """
        return self.full.lower()

    @property
    def display(self) -> str:
        """
        The shortest display name (``name``/``model`` in ``/api/tags``): the
        default host and namespace are dropped, the tag is always kept.
        """
        if self.host.lower() != DEFAULT_HOST:
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace.lower() != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        else:
            prefix = ""
        return f"{prefix}{self.model}:{self.tag}"


def _cut_last(text: str, sep: str) -> tuple[str, str | None]:
    """
    Go's ``cutPromised``: split at the last ``sep``; an empty part after it
    becomes ``!`` so the name is invalid rather than silently defaulted.
    """
    before, found, after = text.rpartition(sep)
    if not found:
        return text, None
    return before, after or "!"


def _digest_for(name: str) -> str:
    return hashlib.sha256(f"fake-ollama:{name}".encode()).hexdigest()


MODEL_MEDIA: Final = "application/vnd.ollama.image.model"
TEMPLATE_MEDIA: Final = "application/vnd.ollama.image.template"
SYSTEM_MEDIA: Final = "application/vnd.ollama.image.system"
PARAMS_MEDIA: Final = "application/vnd.ollama.image.params"
LICENSE_MEDIA: Final = "application/vnd.ollama.image.license"
MESSAGES_MEDIA: Final = "application/vnd.ollama.image.messages"
CONFIG_MEDIA: Final = "application/vnd.docker.container.image.v1+json"


@dataclass(frozen=True)
class Layer:
    """
    One blob of a model's manifest.

    :ivar digest: 64 hex digits, no ``sha256:`` prefix.
    """

    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class FakeModel:
    """
    One installed model: the metadata the real server reports plus the
    knobs that make the fake misbehave on purpose.

    :ivar name: display name, e.g. ``llama3.2:latest``.
    :ivar capabilities: subset of ``completion``, ``tools``, ``insert``,
        ``vision``, ``embedding``, ``thinking``.
    :ivar digest: 64 hex digits, no ``sha256:`` prefix; derived from the
        name when left empty.
    :ivar modified_at: RFC 3339 with nanoseconds and an offset, as Go prints
        local times.
    :ivar min_token_delay: a floor for the per-token delay, so a model can be
        slow even when the server's ``token_delay`` is 0.
    :ivar answer_tokens: when positive, the answer is padded to exactly this
        many tokens (a long answer for cancellation tests).
    :ivar stall: never send a byte of a generation until the client leaves.
    :ivar midstream_error: after ``tokens_before_error`` tokens, end the
        stream with this ``{"error": ...}`` line (500 when not streaming).
    :ivar load_error: fail every inference with a 500 and this message
        before any byte, as a crashing runner does.
    :ivar load_delay: seconds the model takes to load when it is not in
        memory (not listed by ``/api/ps``).  Like Ollama's scheduler, the
        fake sends nothing, not even headers, until it is loaded, and
        reports the wait as ``load_duration``; requests that come during
        the load wait for the same load.
    :ivar system: the system prompt a ``/api/create`` gave the model.
    :ivar layers: the manifest's layers; when empty, three are derived
        from ``digest`` (weights, template, params), see
        :meth:`blob_layers`.
    """

    name: str
    capabilities: tuple[str, ...] = ("completion",)
    family: str = "llama"
    parameter_size: str = "3.2B"
    quantization_level: str = "Q4_K_M"
    size: int = 2019393189
    digest: str = ""
    modified_at: str = "2025-01-01T00:00:00-08:00"
    embedding_length: int = 3072
    context_length: int = 131072
    families: tuple[str, ...] | None = None
    architecture: str = ""
    template: str = "{{ .Prompt }}"
    parameters: tuple[tuple[str, str], ...] = ()
    min_token_delay: float = 0.0
    answer_tokens: int = 0
    stall: bool = False
    midstream_error: str | None = None
    tokens_before_error: int = 3
    load_error: str | None = None
    load_delay: float = 0.0
    system: str = ""
    layers: tuple[Layer, ...] = ()

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", _digest_for(self.name))
        if not self.architecture:
            object.__setattr__(self, "architecture", self.family)

    @property
    def parsed(self) -> ModelName:
        """
        The model's name with defaults applied.
        """
        return ModelName.parse(self.name)

    @property
    def short(self) -> str:
        """
        The bare model part (``llama3.2``), used in generated answers.
        """
        return self.parsed.model

    def blob_layers(self) -> tuple[Layer, ...]:
        """
        The manifest's layers: :attr:`layers`, or the weights (sharing the
        model's digest), a template and a params blob.
        """
        if self.layers:
            return self.layers
        sizes = (max(self.size - 1500, 1), 1429, 96)
        media = (MODEL_MEDIA, TEMPLATE_MEDIA, PARAMS_MEDIA)
        return tuple(
            Layer(kind, layer_digest(self, index), size)
            for index, (kind, size) in enumerate(zip(media, sizes, strict=True))
        )

    def config_layer(self) -> Layer:
        """
        The manifest's config blob (pushed after the layers).
        """
        return Layer(CONFIG_MEDIA, _digest_for(f"{self.digest}:config"), 485)

    def has(self, capability: str) -> bool:
        """
        Whether the model advertises ``capability``.
        """
        return capability in self.capabilities

    def tag_entry(self) -> dict[str, Any]:
        """
        The model's entry in ``/api/tags``.
        """
        name = self.parsed.display
        return {
            "name": name,
            "model": name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
            "capabilities": list(self.capabilities),
        }

    def details(self) -> dict[str, Any]:
        """
        The ``details`` object of tags, show and ps; every key present, as
        the Go struct has no ``omitempty`` on them.
        """
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": list(self.families) if self.families is not None else [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }

    def parameter_count(self) -> int:
        """
        ``general.parameter_count`` derived from ``parameter_size``.
        """
        match = re.match(r"^([\d.]+)([KMBT]?)$", self.parameter_size)
        if match is None:
            return 0
        scale = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}[match.group(2)]
        return round(float(match.group(1)) * scale)

    def model_info(self) -> dict[str, Any]:
        """
        ``model_info`` for ``/api/show``, keys sorted as Go marshals maps.
        """
        arch = self.architecture
        info = {
            "general.architecture": arch,
            "general.parameter_count": self.parameter_count(),
            f"{arch}.context_length": self.context_length,
            f"{arch}.embedding_length": self.embedding_length,
        }
        return dict(sorted(info.items()))

    def parameters_text(self) -> str:
        """
        The ``parameters`` string of ``/api/show``: ``name`` padded to 30
        columns, a space, the value; one per line.
        """
        return "\n".join(f"{name:<30} {value}" for name, value in self.parameters)

    def modelfile(self) -> str:
        """
        A Modelfile in the shape ``ollama show --modelfile`` prints.
        """
        lines = [
            '# Modelfile generated by "ollama show"',
            "# To build a new Modelfile based on this, replace FROM with:",
            f"# FROM {self.name}",
            "",
            f"FROM /root/.ollama/models/blobs/sha256-{self.digest}",
            f'TEMPLATE """{self.template}"""',
        ]
        if self.system:
            lines.append(f'SYSTEM """{self.system}"""')
        lines += [f"PARAMETER {name} {value}" for name, value in self.parameters]
        return "\n".join(lines) + "\n"

    def modified_ns(self) -> int:
        """
        ``modified_at`` as nanoseconds, for sorting newest first.
        """
        return parse_rfc3339_ns(self.modified_at)


_LLAMA_TEMPLATE: Final = (
    "<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
    "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
_LLAMA_STOPS: Final = (
    ("stop", '"<|start_header_id|>"'),
    ("stop", '"<|end_header_id|>"'),
    ("stop", '"<|eot_id|>"'),
)
_QWEN_TEMPLATE: Final = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
_QWEN_STOPS: Final = (("stop", '"<|im_start|>"'), ("stop", '"<|im_end|>"'))


def _test_model(name: str, modified_at: str, **knobs: Any) -> FakeModel:
    return FakeModel(
        name=name,
        capabilities=("completion",),
        family="llama",
        parameter_size="1.2B",
        quantization_level="Q8_0",
        size=1321098329,
        modified_at=modified_at,
        embedding_length=2048,
        context_length=8192,
        template=_LLAMA_TEMPLATE,
        parameters=_LLAMA_STOPS,
        **knobs,
    )


DEFAULT_MODELS: Final[tuple[FakeModel, ...]] = (
    FakeModel(
        name="llama3.2:latest",
        capabilities=("completion", "tools"),
        family="llama",
        parameter_size="3.2B",
        quantization_level="Q4_K_M",
        size=2019393189,
        digest="a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
        modified_at="2025-05-04T17:37:44.706015396-07:00",
        embedding_length=3072,
        context_length=131072,
        template=_LLAMA_TEMPLATE,
        parameters=_LLAMA_STOPS,
    ),
    FakeModel(
        name="qwen3:latest",
        capabilities=("completion", "tools", "thinking"),
        family="qwen3",
        parameter_size="8.2B",
        quantization_level="Q4_K_M",
        size=5225388164,
        digest="500a1f067a9f782620b40bee6f7b0c89e17ae61f686b92c24933e4ca4b2b8b41",
        modified_at="2025-06-12T09:15:02.123456789-07:00",
        embedding_length=4096,
        context_length=40960,
        template=_QWEN_TEMPLATE,
        parameters=(*_QWEN_STOPS, ("temperature", "0.6"), ("top_k", "20"), ("top_p", "0.95")),
    ),
    FakeModel(
        name="llava:latest",
        capabilities=("completion", "vision"),
        family="llama",
        families=("llama", "clip"),
        parameter_size="7B",
        quantization_level="Q4_0",
        size=4733363377,
        digest="8dd30f6b0cb19f555f2c7a7ebda861449ea2cc76bf1f44e262931f45fc81d081",
        modified_at="2025-03-20T11:02:33.5-07:00",
        embedding_length=4096,
        context_length=32768,
        template="[INST] {{ if .System }}{{ .System }} {{ end }}{{ .Prompt }} [/INST]",
        parameters=(("stop", '"[INST]"'), ("stop", '"[/INST]"')),
    ),
    FakeModel(
        name="qwen2.5-coder:latest",
        capabilities=("completion", "insert"),
        family="qwen2",
        parameter_size="7.6B",
        quantization_level="Q4_K_M",
        size=4683087332,
        digest="dae161e27b0e90dd1856c8bb3209201fd6736d8eb66298e75ed87571486f4364",
        modified_at="2025-04-02T08:30:00.25-07:00",
        embedding_length=3584,
        context_length=32768,
        template="{{- if .Suffix }}<|fim_prefix|>{{ .Prompt }}<|fim_suffix|>{{ .Suffix }}"
        "<|fim_middle|>{{- else }}" + _QWEN_TEMPLATE + "{{- end }}",
        parameters=_QWEN_STOPS,
    ),
    FakeModel(
        name="all-minilm:latest",
        capabilities=("embedding",),
        family="bert",
        parameter_size="23M",
        quantization_level="F16",
        size=45960996,
        digest="1b226e2802dbb772b5fc32a58f103ca1804ef7501331012de126ab22f67475ef",
        modified_at="2024-12-10T14:20:11.987654321-08:00",
        embedding_length=384,
        context_length=512,
        template="",
    ),
    _test_model(
        "slow:latest",
        "2024-11-01T10:00:00.1-07:00",
        min_token_delay=0.05,
        answer_tokens=2000,
    ),
    _test_model("stall:latest", "2024-11-01T10:00:00.2-07:00", stall=True),
    _test_model(
        "broken:latest",
        "2024-11-01T10:00:00.3-07:00",
        midstream_error=BROKEN_ERROR,
    ),
    _test_model("crash:latest", "2024-11-01T10:00:00.4-07:00", load_error=CRASH_ERROR),
    _test_model("cold:latest", "2024-11-01T10:00:00.5-07:00", load_delay=COLD_LOAD_SECONDS),
)
"""
The catalogue a :class:`~oproxy.testing.FakeOllama` starts with by default:
ordinary models with distinct capabilities, and five misbehaving ones
(``slow``, ``stall``, ``broken``, ``crash``, and ``cold``, which takes
:data:`COLD_LOAD_SECONDS` to load) for timeout, cancellation, keep-alive
and error-path tests.
"""


class Catalogue:
    """
    The installed models, keyed case-insensitively by full name.  Tests may
    change it directly (``fake.models.clear()``, ``fake.models.add(...)``)
    to shape what ``/api/tags`` and the inference routes see.
    """

    def __init__(self, models: Iterable[FakeModel]) -> None:
        self._models: dict[str, FakeModel] = {}
        for model in models:
            self.add(model)

    def __iter__(self) -> Iterator[FakeModel]:
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.find(name) is not None

    def find(self, name: str) -> FakeModel | None:
        """
        The installed model ``name`` resolves to, if any.
        """
        parsed = ModelName.parse(name)
        if not parsed.is_valid():
            return None
        return self._models.get(parsed.key)

    def add(self, model: FakeModel) -> None:
        """
        Install ``model``, replacing a model of the same name.
        """
        self._models[model.parsed.key] = model

    def remove(self, model: FakeModel) -> None:
        """
        Uninstall ``model``.
        """
        self._models.pop(model.parsed.key, None)

    def clear(self) -> None:
        """
        Uninstall every model (``/api/tags`` then answers ``{"models":[]}``).
        """
        self._models.clear()

    def newest_first(self) -> list[FakeModel]:
        """
        Every model, sorted by ``modified_at``, newest first (as
        ``/api/tags`` lists them).
        """
        return sorted(self._models.values(), key=FakeModel.modified_ns, reverse=True)

    def replace_all(self, models: Sequence[FakeModel]) -> None:
        """
        Forget every model and install ``models``.
        """
        self._models.clear()
        for model in models:
            self.add(model)


@dataclass(frozen=True)
class Loaded:
    """
    A model in memory: until when, and with what context size.
    """

    model: FakeModel
    expires_ns: int
    context_length: int

    def ps_entry(self) -> dict[str, Any]:
        """
        The model's entry in ``/api/ps``.
        """
        name = self.model.parsed.display
        return {
            "name": name,
            "model": name,
            "size": self.model.size,
            "digest": self.model.digest,
            "details": self.model.details(),
            "expires_at": rfc3339_nano(self.expires_ns),
            "size_vram": self.model.size,
            "context_length": self.context_length,
        }


class LoadedModels:
    """
    What ``/api/ps`` reports: a model is loaded by any inference or load
    request and stays for its ``keep_alive`` (default 5 minutes; 0 unloads
    when the request ends; negative means forever).
    """

    def __init__(self) -> None:
        self._entries: dict[str, Loaded] = {}

    def touch(
        self, model: FakeModel, now_ns: int, keep_alive: float | None, num_ctx: int | None = None
    ) -> None:
        """
        Load ``model`` (or extend its stay) from ``now_ns``; ``num_ctx``
        sets the reported context length, capped at the model's.
        """
        seconds = DEFAULT_KEEP_ALIVE if keep_alive is None else keep_alive
        if seconds == 0:
            self.unload(model)
            return
        previous = self._entries.get(model.parsed.key)
        if num_ctx is None or num_ctx <= 0:
            num_ctx = previous.context_length if previous else DEFAULT_NUM_CTX
        span = _FOREVER_NS if math.isinf(seconds) else round(seconds * 1e9)
        context = min(num_ctx, model.context_length)
        self._entries[model.parsed.key] = Loaded(model, now_ns + span, context)

    def refresh(self, model: FakeModel, now_ns: int, keep_alive: float | None) -> None:
        """
        A request on ``model`` ended: restart its ``keep_alive`` countdown,
        or unload it for ``keep_alive: 0``.
        """
        if keep_alive == 0 or model.parsed.key in self._entries:
            self.touch(model, now_ns, keep_alive)

    def unload(self, model: FakeModel) -> None:
        """
        Forget ``model`` (a ``keep_alive: 0`` request).
        """
        self._entries.pop(model.parsed.key, None)

    def live(self, now_ns: int) -> list[Loaded]:
        """
        The models still loaded at ``now_ns``, latest expiry first.
        """
        alive = [entry for entry in self._entries.values() if entry.expires_ns > now_ns]
        return sorted(alive, key=lambda entry: entry.expires_ns, reverse=True)

    def clear(self) -> None:
        """
        Unload everything.
        """
        self._entries.clear()


def registry_model(name: ModelName, known: Iterable[FakeModel], modified_at: str) -> FakeModel:
    """
    What ``/api/pull`` installs for ``name``: the known definition when
    there is one (so deleting and pulling a default model restores it),
    otherwise a plain completion model.
    """
    for model in known:
        if model.parsed.key == name.key:
            return replace(model, modified_at=modified_at)
    return FakeModel(name=name.display, modified_at=modified_at, parameter_size="1B")


def registry_has(name: ModelName) -> bool:
    """
    Whether the fake registry "has" ``name``: everything except models whose
    name starts with ``nonexistent``, which give the manifest error.
    """
    return not name.model.lower().startswith("nonexistent")


def pull_progress(model: FakeModel, *, already_present: bool) -> list[dict[str, Any]]:
    """
    The progress lines of a pull (without the final ``success``): the
    manifest, each layer (``pulling <12 hex>``; a missing layer reports a
    start, half-way and complete line, a present one only complete), the
    digest check and the manifest write.
    """
    lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
    for layer in model.blob_layers():
        digest, total = layer.digest, layer.size
        head = {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}", "total": total}
        if not already_present:
            lines += [head, {**head, "completed": max(total // 2, 1)}]
        lines.append({**head, "completed": total})
    lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}]
    return lines


def layer_digest(model: FakeModel, index: int) -> str:
    """
    The digest of a model's ``index``-th layer (the weights are layer 0
    and share the model's digest).
    """
    return model.digest if index == 0 else _digest_for(f"{model.digest}:{index}")
