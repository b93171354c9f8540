"""
Reference pages generated from the code, so they cannot drift from it.

Four directives, each replaced at build time by reStructuredText made from
the code it describes:

``.. oproxy-config::``
    every key of the configuration file, from the attrs schema in
    :mod:`oproxy.config.schema`: its name as the file spells it, its kind,
    its default and its documentation (``:ivar:`` fields and ``#:``
    comments);
``.. oproxy-cli::``
    every command and option of ``oproxy``, from its argparse parser, and
    ``twistd oproxy``'s options;
``.. oproxy-http::``
    every route of the HTTP API, from the OpenAPI document the daemon
    serves at ``/openapi.json``;
``.. oproxy-metrics::``
    every metric on ``/metrics``, from the registry of :mod:`oproxy.metrics`.

The generators are plain functions returning lines, so the tests check
them without Sphinx (``tests/test_reference_docs.py``).
"""

from __future__ import annotations

import argparse
import inspect
import re
import textwrap
import types
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Union, get_args, get_origin

import attrs

Lines = list[str]


# -- reStructuredText helpers ---------------------------------------------------


def heading(text: str, underline: str) -> Lines:
    return [text, underline * len(text), ""]


def literal(text: str) -> str:
    """Inline literal text, whatever it contains."""
    text = str(text)
    if not text:
        return "``''``"
    if "``" in text or text.startswith(" ") or text.endswith(" "):
        return ":literal:`" + text.replace("\\", "\\\\").replace("`", "\\`") + "`"
    return f"``{text}``"


def indented(text: str, by: int = 3) -> Lines:
    return [(" " * by + line) if line.strip() else "" for line in text.splitlines()]


def plain(text: str) -> str:
    """A docstring's prose with Sphinx cross-reference roles turned into literals."""
    text = re.sub(r":(?:py:)?(?:class|func|mod|meth|attr|data|exc):`~?([^`]+)`", r"``\1``", text)
    return text


# -- the configuration file -----------------------------------------------------


def _describe_conversion(convert: Callable[..., Any]) -> str:
    """What a value converter accepts, in words."""
    from oproxy.config import values

    closure = inspect.getclosurevars(convert).nonlocals if convert.__closure__ else {}
    if "choices" in closure:
        return "one of " + ", ".join(literal(c) for c in closure["choices"])
    words: dict[Callable[..., Any], str] = {
        values.seconds: "seconds (a positive number)",
        values.count: "a positive whole number",
        values.whole_number: "a whole number, zero or more",
        values.byte_size: "a size in bytes (a number, or ``512KiB``, ``32MiB``, ``1GiB``)",
        values.workers: "a number of processes, or ``auto`` (one per CPU)",
        values.endpoints: "a Twisted endpoint string, or a list of them",
        values.cidr: "a network in CIDR notation (``10.0.0.0/8``)",
        values.network: "an address or network in CIDR notation",
        values.host_pattern: "a host name (``*.`` for any subdomain) or a network in CIDR notation",
        values.redis_url: "a Redis URL (``redis://``, ``rediss://`` or ``unix://``)",
        values.sentry_dsn: "a Sentry DSN",
        values.digest_of: "a secret (kept only as its SHA-256)",
        values.sha256_hex: "a SHA-256 digest in hex",
        values.expiry: "a date, a date and time, ISO 8601, or a unix time",
        values.options: "a mapping of request options (Ollama's ``num_ctx``, ``keep_alive``...)",
        values.model_limits: "a mapping from model name or glob to limits (``rpm``, ``tpm``)",
        values.also_redacted: "a list of JSON keys",
    }
    return words.get(convert, convert.__name__.replace("_", " "))


def _strip_optional(t: Any) -> tuple[Any, bool]:
    if get_origin(t) in (Union, types.UnionType):
        args = [a for a in get_args(t) if a is not type(None)]
        if len(args) == 1 and len(get_args(t)) == 2:
            return args[0], True
    return t, False


def _annotation(t: Any) -> tuple[Any, tuple[Any, ...]]:
    if get_origin(t) is Annotated:
        return get_args(t)[0], tuple(t.__metadata__)
    return t, ()


def describe_type(t: Any) -> str:
    """A field's type in words, as a reader of the file needs it."""
    from oproxy.security.policy import LIMIT_NAMES, Limits

    base, optional = _strip_optional(t)
    base, marks = _annotation(base)
    inner, inner_optional = _strip_optional(base)
    optional = optional or inner_optional
    conversion = next((m for m in marks if callable(m)), None)
    if conversion is not None:
        words = _describe_conversion(conversion)
    elif inner is bool:
        words = "``true`` or ``false``"
    elif inner is str:
        words = "a string"
    elif inner is int:
        words = "a whole number"
    elif inner is float:
        words = "a number"
    elif inner is Limits:
        words = "a mapping of limits: " + ", ".join(literal(n) for n in LIMIT_NAMES)
    elif get_origin(inner) is tuple and get_args(inner)[-1] is Ellipsis:
        element = get_args(inner)[0]
        words = "a list of " + re.sub(r"^an? ", "", describe_type(element))
        if not words.endswith("s"):
            words += "s"
    else:
        words = getattr(inner, "__name__", str(inner))
    if optional:
        words += ", or empty"
    return words


def describe_default(field: attrs.Attribute) -> str | None:  # type: ignore[type-arg]
    """The default as YAML would write it; ``None`` for a required field."""
    default = field.default
    if default is attrs.NOTHING:
        return None
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()  # type: ignore[attr-defined]
    if attrs.has(type(default)) or type(default).__name__ == "Limits":
        return ""
    if default is None:
        return "empty"
    if isinstance(default, bool):
        return literal("true" if default else "false")
    if isinstance(default, tuple):
        if not default:
            return "empty"
        return ", ".join(literal(str(v)) for v in default)
    if isinstance(default, bytes):
        return "empty"
    if isinstance(default, int) and default >= 1024 * 1024 and default % (1024 * 1024) == 0:
        return literal(f"{default // (1024 * 1024)}MiB")
    if isinstance(default, float) and default.is_integer():
        return literal(str(int(default)))
    return literal(str(default))


def _attribute_docs(cl: type[Any]) -> dict[str, str]:
    """``:ivar name:`` fields of the class docstring and ``#:`` comments on fields."""
    docs: dict[str, str] = {}
    doc = inspect.cleandoc(cl.__doc__ or "")
    for match in re.finditer(r"^:ivar (\w+):(.*(?:\n(?!:)\s+.*)*)", doc, re.MULTILINE):
        docs[match.group(1)] = " ".join(match.group(2).split())
    try:
        source = inspect.getsource(cl)
    except (OSError, TypeError):
        return docs
    comment: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            comment.append(stripped[2:].strip())
            continue
        field = re.match(r"(\w+)\s*:", stripped)
        if field and comment:
            docs.setdefault(field.group(1), " ".join(comment))
        comment = []
    return docs


def _summary(cl: type[Any]) -> str:
    doc = inspect.cleandoc(cl.__doc__ or "")
    paragraphs = [p for p in doc.split("\n\n") if p.strip() and not p.lstrip().startswith(":")]
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def _file_key(field: attrs.Attribute) -> str | None:  # type: ignore[type-arg]
    """The key the file writes a field under; ``None`` when it is set elsewhere."""
    from oproxy.config.values import FileKey

    for mark in _annotation(_strip_optional(field.type)[0])[1] + _annotation(field.type)[1]:
        if isinstance(mark, FileKey):
            return mark.key
    return field.name


@attrs.frozen
class ConfigKey:
    """One key of the file, for the reference and for the tests."""

    path: str
    kind: str
    default: str | None
    doc: str


@attrs.frozen
class ConfigSection:
    path: str
    summary: str
    keys: tuple[ConfigKey, ...]
    is_list: bool = False


def _sections(cl: type[Any], path: str, is_list: bool = False) -> Iterator[ConfigSection]:
    """The section of ``cl`` at ``path``, then its subsections, depth first."""
    from oproxy.config.schema import APIKey, ListedKey

    if cl is APIKey:
        cl = ListedKey  # the file writes a key as ListedKey; the daemon keeps APIKey
    cl = attrs.resolve_types(cl)
    docs = _attribute_docs(cl)
    keys: list[ConfigKey] = []
    below: list[tuple[type[Any], str, bool]] = []
    for field in attrs.fields(cl):
        key = _file_key(field)
        if key is None:
            continue
        where = f"{path}.{key}" if path else key
        base, _ = _annotation(_strip_optional(field.type)[0])
        base = _strip_optional(base)[0]
        if attrs.has(base):
            below.append((base, where, False))
            continue
        if get_origin(base) is tuple and len(get_args(base)) == 2 and attrs.has(get_args(base)[0]):
            below.append((get_args(base)[0], where, True))
            continue
        keys.append(
            ConfigKey(
                where, describe_type(field.type), describe_default(field), docs.get(field.name, "")
            )
        )
    yield ConfigSection(path, _summary(cl), tuple(keys), is_list)
    for section_class, where, listed in below:
        yield from _sections(section_class, where, listed)


def config_sections() -> list[ConfigSection]:
    """Every section of the file, the top level first, ``models`` last."""
    from oproxy.config.schema import Config, ModelRule

    sections = list(_sections(Config, ""))
    rule = next(_sections(ModelRule, "models.<name>"))
    keys = tuple(k for k in rule.keys if k.path != "models.<name>.pattern")
    sections.append(attrs.evolve(rule, keys=keys))
    return sections


def config_reference() -> Lines:
    lines: Lines = []
    for section in config_sections():
        title = section.path or "Top level"
        lines += heading(literal(title) if section.path else title, "=")
        if section.is_list:
            lines += [
                f"{literal(section.path)} is a list; each item is a mapping of these keys.",
                "",
            ]
        if section.path == "models.<name>":
            lines += [
                "``models:`` maps each public model name, or a glob such as ``llama3*``, to "
                "how it is routed; these are the keys of each rule.",
                "",
            ]
        if section.summary:
            lines += [plain(section.summary), ""]
        for key in section.keys:
            lines.append(literal(key.path))
            default = (
                "required"
                if key.default is None
                else f"default {key.default}"
                if key.default
                else ""
            )
            lines += indented(f"*{key.kind}*" + (f"; {default}" if default else "") + ".")
            if key.doc:
                lines += ["", *indented(plain(key.doc))]
            lines.append("")
    return lines


# -- the command line -----------------------------------------------------------


def _option_line(action: argparse.Action) -> str:
    if not action.option_strings:
        return literal(action.metavar or action.dest)
    metavar = ""
    if action.nargs != 0:
        metavar = " " + (action.metavar if isinstance(action.metavar, str) else action.dest.upper())
    return ", ".join(literal(option + metavar) for option in action.option_strings)


def _parser_lines(parser: argparse.ArgumentParser, name: str, depth: int) -> Lines:
    lines = heading(literal(name), "=-~^"[min(depth, 3)])
    lines += ["::", "", *indented(parser.format_usage().strip().removeprefix("usage: ")), ""]
    if parser.description:
        lines += [parser.description, ""]
    subcommands: list[tuple[str, argparse.ArgumentParser, str]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            subcommands += [(n, p, helps.get(n, "")) for n, p in action.choices.items()]
            continue
        if isinstance(action, argparse._HelpAction):
            continue
        lines.append(_option_line(action))
        text = (action.help or "").replace("%(default)s", str(action.default))
        lines += indented(text or "(no description)")
        lines.append("")
    for sub_name, sub_parser, sub_help in subcommands:
        sub_lines = _parser_lines(sub_parser, f"{name} {sub_name}", depth + 1)
        if sub_help and not sub_parser.description:
            sub_lines[3:3] = [sub_help[0].upper() + sub_help[1:] + ".", ""]
        lines += sub_lines
    return lines


def cli_reference() -> Lines:
    from oproxy.cli import parser
    from oproxy.tap import Options

    lines = _parser_lines(parser(), "oproxy", 0)
    lines += heading("``twistd oproxy``", "=")
    lines += [
        "The same daemon through Twisted's plugin: ``twistd [twistd options] oproxy "
        "[options]``.  Its options:",
        "",
    ]
    options = Options()
    for long, short, _default, doc, *_ in options.optParameters:
        spelled = f"--{long} VALUE" + (f", -{short} VALUE" if short else "")
        lines += [literal(spelled), *indented(doc or ""), ""]
    for long, short, doc, *_ in getattr(options, "optFlags", []):
        lines += [
            literal(f"--{long}") + (f", {literal('-' + short)}" if short else ""),
            *indented(doc or ""),
            "",
        ]
    return lines


# -- the HTTP API -----------------------------------------------------------------


def http_reference() -> Lines:
    from oproxy.openapi import openapi_document

    document = openapi_document()
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if method.startswith("x-") or not isinstance(operation, dict):
                continue
            tag = (operation.get("tags") or ["Other"])[0]
            by_tag.setdefault(tag, []).append((method.upper(), path, operation))
    descriptions = {t["name"]: t.get("description", "") for t in document.get("tags", [])}
    lines: Lines = []
    for tag, operations in by_tag.items():
        lines += heading(tag, "=")
        if descriptions.get(tag):
            lines += [descriptions[tag], ""]
        for method, path, operation in operations:
            lines.append(literal(f"{method} {path}"))
            text = operation.get("summary", "")
            if operation.get("description"):
                text += "\n\n" + operation["description"]
            lines += indented(text.strip() or "(no description)")
            statuses = ", ".join(sorted(operation.get("responses", {})))
            if statuses:
                lines += ["", *indented(f"Answers: {statuses}.")]
            lines.append("")
    return lines


# -- metrics ---------------------------------------------------------------------


@attrs.frozen
class MetricDoc:
    name: str
    kind: str
    labels: tuple[str, ...]
    doc: str


def metric_docs() -> list[MetricDoc]:
    """Every metric oproxy registers, with the name a scrape shows."""
    from prometheus_client import CollectorRegistry

    from oproxy.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    found: list[MetricDoc] = []
    for value in vars(metrics).values():
        name = getattr(value, "_name", None)
        kind = getattr(value, "_type", None)
        if name is None or kind is None:
            continue
        shown = f"{name}_total" if kind == "counter" else name
        found.append(
            MetricDoc(shown, kind, tuple(getattr(value, "_labelnames", ())), value._documentation)
        )
    return found


def metrics_reference() -> Lines:
    lines: Lines = []
    for metric in metric_docs():
        lines.append(literal(metric.name))
        labels = ", ".join(literal(label) for label in metric.labels) or "none"
        lines += indented(f"*{metric.kind}*; labels: {labels}.")
        lines += ["", *indented(metric.doc), ""]
    return lines


# -- Sphinx -------------------------------------------------------------------------

GENERATORS: dict[str, Callable[[], Lines]] = {
    "oproxy-config": config_reference,
    "oproxy-cli": cli_reference,
    "oproxy-http": http_reference,
    "oproxy-metrics": metrics_reference,
}


def setup(app: Any) -> dict[str, Any]:
    from docutils import nodes
    from docutils.statemachine import StringList
    from sphinx.util.docutils import SphinxDirective
    from sphinx.util.nodes import nested_parse_with_titles

    def directive(generate: Callable[[], Lines]) -> type[SphinxDirective]:
        class Generated(SphinxDirective):
            def run(self) -> list[nodes.Node]:
                source = self.get_source_info()[0]
                content = StringList()
                for index, line in enumerate(generate()):
                    content.append(line, source, index)
                container = nodes.section()
                container.document = self.state.document
                nested_parse_with_titles(self.state, content, container)
                return list(container.children)

        return Generated

    for name, generate in GENERATORS.items():
        app.add_directive(name, directive(generate))
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}


__all__ = [
    "ConfigKey",
    "ConfigSection",
    "MetricDoc",
    "cli_reference",
    "config_reference",
    "config_sections",
    "http_reference",
    "metric_docs",
    "metrics_reference",
    "textwrap",
]
