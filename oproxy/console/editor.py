"""
The configuration file as the console edits it: shown with its secrets
masked, validated with the daemon's own checks (errors placed on their
line), and replaced atomically, then reloaded everywhere.

Masking works on the text, not on a re-dump of the YAML, so comments and
layout survive: each secret's value (found by its key's name through the
YAML node marks) is replaced by a placeholder, ``"[masked:N]"``.  A
placeholder sent back is put back as the value it hid, so a secret left as
it is stays; a value typed over it replaces it.

Applying takes a lock (one apply at a time, across workers), refuses a file
that changed since the editor loaded it (nothing anyone else wrote is
lost), validates, keeps the previous version as ``FILE.bak``, writes the
new one beside it and renames it into place.  The file work runs in a
thread; the caller then reloads every worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from oproxy.config import Config, ConfigError
from oproxy.config.restart import waiting_for_restart
from oproxy.errors import InvalidRequest, OProxyError, PermissionDenied, RequestTooLarge

#: The largest file the console writes.
MAX_BYTES = 1024 * 1024

#: Keys whose values are secrets wherever they appear (compared lowercased).
SECRET_NAMES = frozenset(
    (
        "key",
        "api_key",
        "bearer_token",
        "token",
        "secret",
        "password",
        "dsn",
        "authorization",
        "session_secret",
    )
)
_SECRET_SUFFIXES = ("_key", "_token", "_secret", "_password")
#: A URL with a password in it (``redis://:pass@host``).
_URL_WITH_PASSWORD = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s]*:[^/@\s]*@", re.IGNORECASE)
#: A value that only names environment variables holds no secret itself.
_ONLY_REFERENCES = re.compile(r"^(\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}\s*)+$")
_PLACEHOLDER = re.compile(r"""(["']?)\[masked:(\d+)\]\1""")
#: Characters no configuration holds: the paste was not text.
_BINARY = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class Conflict(OProxyError):
    """The file is being applied by someone else, or changed since it was loaded."""

    status = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


@dataclass(frozen=True)
class Problem:
    """One reason a file is refused, placed where a reader finds it."""

    message: str
    key: str = ""
    line: int | None = None
    column: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"message": self.message, "key": self.key, "line": self.line, "column": self.column}

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.message}"


def digest(text: str) -> str:
    """What tells one version of the file from another."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_secret(name: str, value: str) -> bool:
    """Whether the value of ``name`` is masked."""
    if _ONLY_REFERENCES.match(value.strip()):
        return False
    lowered = name.lower()
    if lowered in SECRET_NAMES or lowered.endswith(_SECRET_SUFFIXES):
        return bool(value.strip())
    return bool(_URL_WITH_PASSWORD.match(value.strip()))


def _source(node: yaml.Node, start: int, end: int) -> str:
    buffer = node.start_mark.buffer
    return str(buffer[start:end]) if buffer is not None else ""


def _secret_spans(node: yaml.Node) -> Iterator[tuple[int, int]]:
    """The source spans of the secret values under ``node``."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if (
                isinstance(key, yaml.ScalarNode)
                and isinstance(value, yaml.ScalarNode)
                and is_secret(str(key.value), str(value.value))
            ):
                start, end = value.start_mark.index, value.end_mark.index
                # A block scalar's span takes the line break after it: keep it.
                yield start, start + len(_source(value, start, end).rstrip())
            else:
                yield from _secret_spans(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _secret_spans(item)


_LINE_SECRET = re.compile(
    r"^(\s*-?\s*(?:\w*(?:key|token|secret|password|dsn)\w*)\s*:\s*)(\S.*?)\s*$", re.IGNORECASE
)


def mask(text: str) -> tuple[str, list[str]]:
    """
    ``text`` with every secret value replaced by ``"[masked:N]"``, and the
    values, in order (``N`` is the index).  A file that does not parse is
    masked line by line, by the same names.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return _mask_lines(text)
    if root is None:
        return text, []
    spans = sorted(_secret_spans(root))
    secrets: list[str] = []
    pieces: list[str] = []
    position = 0
    for start, end in spans:
        pieces.append(text[position:start])
        pieces.append(f'"[masked:{len(secrets)}]"')
        secrets.append(text[start:end])
        position = end
    pieces.append(text[position:])
    return "".join(pieces), secrets


def _mask_lines(text: str) -> tuple[str, list[str]]:
    secrets: list[str] = []
    lines = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        match = _LINE_SECRET.match(body)
        if match and not _ONLY_REFERENCES.match(match.group(2)):
            lines.append(f'{match.group(1)}"[masked:{len(secrets)}]"{line[len(body) :]}')
            secrets.append(match.group(2))
        else:
            lines.append(line)
    return "".join(lines), secrets


def unmask(text: str, secrets: list[str]) -> str:
    """
    ``text`` with each placeholder back as the value it hid.

    :raises InvalidRequest: a placeholder that hides nothing in this file.
    """

    def restore(match: re.Match[str]) -> str:
        index = int(match.group(2))
        if index >= len(secrets):
            raise InvalidRequest(
                f"{match.group(0)} is not a masked value of the current file: "
                "type the secret in full, or reload the page.",
                param="text",
                code="unknown_masked_value",
            )
        return secrets[index]

    return _PLACEHOLDER.sub(restore, text)


def check_text(text: Any) -> str:
    """
    ``text`` when it can be a configuration file: a string, not too long,
    with no control characters.

    :raises RequestTooLarge: over :data:`MAX_BYTES` once encoded.
    :raises InvalidRequest: not a string, or binary.
    """
    if not isinstance(text, str):
        raise InvalidRequest("text must be the configuration, as a string", param="text")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise RequestTooLarge(
            f"The configuration is {size} bytes long; the console writes files of at most "
            f"{MAX_BYTES} bytes."
        )
    binary = _BINARY.search(text)
    if binary is not None:
        line = text.count("\n", 0, binary.start()) + 1
        raise InvalidRequest(
            f"The configuration is not text: line {line} holds the control character "
            f"U+{ord(binary.group(0)):04X}. Paste a YAML file.",
            param="text",
            code="not_text",
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            "The configuration is not valid UTF-8 text.", param="text", code="not_text"
        ) from None
    return text


# -- problems and where they are ------------------------------------------------------


_INDEX = re.compile(r"\[(\d+)\]")


def _path(key: str) -> list[str | int]:
    """
    ``backends[0].url`` as ``["backends", 0, "url"]`` (a name holding dots
    is put back together by :func:`node_at`).
    """
    parts: list[str | int] = []
    for piece in key.split("."):
        name = _INDEX.split(piece)
        # ``keys[0][1]`` splits into ["keys", "0", "", "1", ""]
        if name[0]:
            parts.append(name[0])
        parts.extend(int(index) for index in name[1::2])
    return parts


def node_at(root: yaml.Node, key: str) -> yaml.Node:
    """
    The deepest node of the tree along the key path ``key``.

    A name may hold dots (``models.llama3.2.target``): at a mapping, the
    longest run of path parts that names one of its keys is taken.
    """
    parts = _path(key)
    node = root
    while parts:
        if isinstance(node, yaml.SequenceNode) and isinstance(parts[0], int):
            if parts[0] >= len(node.value):
                return node
            node = node.value[parts.pop(0)]
            continue
        if not isinstance(node, yaml.MappingNode):
            return node
        found = None
        for length in range(len(parts), 0, -1):
            if not all(isinstance(p, str) for p in parts[:length]):
                continue
            name = ".".join(str(p) for p in parts[:length])
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and str(k.value) == name:
                    found = (length, k, v)
                    break
            if found:
                break
        if found is None:
            return node
        length, key_node, value = found
        del parts[:length]
        # A key that is wrong in itself (unknown, misspelt) is on its own line.
        node = value if parts else key_node
    return node


def problems(text: str, load: Callable[[str], Config]) -> list[Problem]:
    """
    Why ``text`` would be refused by ``oproxy check-config`` and by a
    reload (``load`` is what the daemon runs), each on its line; none when
    it is valid.
    """
    found, _ = checked(text, load)
    return found


def checked(text: str, load: Callable[[str], Config]) -> tuple[list[Problem], Config | None]:
    """:func:`problems`, and the configuration when there are none."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        return [
            Problem(
                f"not valid YAML: {problem}",
                line=mark.line + 1 if mark is not None else None,
                column=mark.column + 1 if mark is not None else None,
            )
        ], None
    try:
        return [], load(text)
    except ConfigError as e:
        line = column = None
        if root is not None and e.key:
            node = node_at(root, e.key)
            line, column = node.start_mark.line + 1, node.start_mark.column + 1
        return [Problem(str(e), key=e.key, line=line, column=column)], None


def restart_notes(new: Config, running: Config) -> list[str]:
    """What a reload does not change: said before it is applied."""
    return [f"{label} changes at the next restart." for label in waiting_for_restart(new, running)]


# -- the file ------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """The file as the editor shows it."""

    path: str | None
    text: str
    digest: str
    writable: bool
    note: str | None = None
    secrets: list[str] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "text": self.text,
            "digest": self.digest,
            "writable": self.writable,
            "note": self.note,
        }


def read_only_reason(path: str | None) -> str | None:
    """Why the file cannot be edited here, if it cannot."""
    if path is None:
        return (
            "The daemon runs on its embedded defaults: there is no file to edit. "
            "Start it with --config FILE to edit its configuration here."
        )
    target = os.path.realpath(path)
    if not os.access(target, os.W_OK):
        return f"{path} is not writable by the daemon's user: it is shown read-only."
    if not os.access(os.path.dirname(target) or ".", os.W_OK):
        return (
            f"The directory of {path} is not writable by the daemon's user, so a new version "
            "cannot be put in place atomically: it is shown read-only."
        )
    return None


def read_version(path: str | None) -> Version:
    """The file, masked (blocking: run it in a thread)."""
    if path is None:
        return Version(None, "", digest(""), False, read_only_reason(None))
    with open(path, encoding="utf-8") as f:
        text = f.read()
    masked, secrets = mask(text)
    note = read_only_reason(path)
    return Version(path, masked, digest(text), note is None, note, secrets)


@dataclass(frozen=True)
class Applied:
    """A new version in place."""

    digest: str
    backup: str
    notes: list[str]


@contextlib.contextmanager
def _locked(lock_path: str) -> Iterator[None]:
    """Hold the apply lock, or say at once that someone else does."""
    os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(
                "Another change to the configuration is being applied. Wait a moment, "
                "reload the page and try again.",
                code="apply_in_progress",
            ) from None
        yield
    finally:
        os.close(fd)  # and with it the lock


def _write_beside(target: str, data: bytes, mode: int, owner: tuple[int, int]) -> None:
    """Write ``data`` to ``target`` whole: a new file beside it, renamed over it."""
    directory = os.path.dirname(target) or "."
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        with contextlib.suppress(OSError):
            os.chown(temporary, *owner)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


def commit(
    path: str | None,
    lock_path: str,
    submitted: str,
    base: str,
    load: Callable[[str], Config],
    running: Config,
) -> Applied:
    """
    Put ``submitted`` (as the editor sent it, secrets masked) in place of
    the file, if the file is still the version ``base`` and the result is
    valid (blocking: run it in a thread).

    :raises PermissionDenied: the file is read-only here.
    :raises Conflict: another apply holds the lock, or the file changed.
    :raises InvalidRequest: the new file is refused; ``problems`` says why.
    """
    reason = read_only_reason(path)
    if path is None or reason is not None:
        raise PermissionDenied(reason or "read-only", code="configuration_read_only")
    with _locked(lock_path):
        target = os.path.realpath(path)
        with open(target, "rb") as f:
            current_bytes = f.read()
        current = current_bytes.decode("utf-8")
        if digest(current) != base:
            raise Conflict(
                f"{path} changed since you loaded it (someone else applied a change, or it "
                "was edited on disk). Reload the page to see the new version; nothing was written.",
                code="configuration_changed",
            )
        _, secrets = mask(current)
        text = unmask(submitted, secrets)
        found, config = checked(text, load)
        if config is None:
            raise Refused(found)
        stat = os.stat(target)
        owner = (stat.st_uid, stat.st_gid)
        backup = path + ".bak"
        _write_beside(os.path.realpath(backup), current_bytes, stat.st_mode & 0o7777, owner)
        _write_beside(target, text.encode("utf-8"), stat.st_mode & 0o7777, owner)
        return Applied(digest(text), backup, restart_notes(config, running))


class Refused(InvalidRequest):
    """The file is not valid: nothing was written."""

    def __init__(self, found: list[Problem]) -> None:
        super().__init__(
            "The configuration is not valid, so nothing was changed: "
            + "; ".join(str(p) for p in found),
            param="text",
            code="invalid_configuration",
        )
        self.problems = found
