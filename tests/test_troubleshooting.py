"""
``docs/troubleshooting.rst`` lists every error ``code`` the proxy emits, and no other.

The codes are read from the source, so a new error cannot be added without
its entry on the page, and an entry cannot outlive its error:

* the ``default_code`` of every error class (``OProxyError`` and the
  classes deriving from it, wherever they are defined);
* every ``code="..."`` given where an error is raised;
* every ``code = "..."`` set for a stream's error event (either side of
  a conditional);
* ``null``, the code of an error class without a default (``ServerError``,
  a backend's own refusal passed on).

The fakes (``oproxy/testing``) are left out: their codes are OpenAI's and
Ollama's, not the proxy's.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "troubleshooting.rst"
SOURCE = ROOT / "oproxy"

#: An entry: a definition-list term at the start of a line, one code or
#: several joined by "and", a status in brackets allowed after.
_TERM = re.compile(r"^``([a-z_]+)``((?: and ``[a-z_]+``)*)(?: \(\d{3}\))?$", re.MULTILINE)


def emitted_codes(root: Path = SOURCE) -> dict[str, list[str]]:
    """Every code in the source, with where it is set (``path:line``)."""
    found: dict[str, list[str]] = {}

    def note(value: ast.expr, where: str) -> None:
        if isinstance(value, ast.IfExp):  # code = "a" if ... else "b"
            note(value.body, where)
            note(value.orelse, where)
        elif isinstance(value, ast.Constant):
            code = "null" if value.value is None else value.value
            if isinstance(code, str):
                found.setdefault(code, []).append(where)

    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent)
        if relative.parts[:2] == ("oproxy", "testing"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{relative}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "code":
                        note(keyword.value, where)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = {t.id for t in targets if isinstance(t, ast.Name)}
                if names & {"default_code", "code"} and node.value is not None:
                    note(node.value, where)
    return found


def documented_codes(text: str) -> set[str]:
    codes = set()
    for match in _TERM.finditer(text):
        codes.add(match.group(1))
        codes.update(re.findall(r"``([a-z_]+)``", match.group(2)))
    return codes


def test_the_scan_finds_what_it_should() -> None:
    """The scan itself: codes from a class, from a raise, and the null default."""
    found = emitted_codes()
    assert "model_not_found" in found  # default_code of ModelNotFound
    assert "invalid_json" in found  # code="invalid_json" where the body is read
    assert "null" in found  # ServerError's default, None
    assert not [code for code in found if not re.fullmatch(r"[a-z_]+", code)], found


def test_every_emitted_code_is_on_the_page() -> None:
    missing = {
        code: where
        for code, where in emitted_codes().items()
        if code not in documented_codes(PAGE.read_text())
    }
    assert not missing, f"add these codes to docs/troubleshooting.rst: {missing}"


def test_the_page_lists_no_code_the_proxy_does_not_emit() -> None:
    stale = documented_codes(PAGE.read_text()) - set(emitted_codes())
    assert not stale, f"docs/troubleshooting.rst lists codes nothing emits: {stale}"


def test_a_new_code_would_be_noticed(tmp_path: Path) -> None:
    """An error raised with a code the page lacks is caught by the scan."""
    package = tmp_path / "oproxy"
    package.mkdir()
    (package / "new.py").write_text(
        "from oproxy.errors import InvalidRequest\n"
        "def refuse():\n"
        "    raise InvalidRequest('no', code='brand_new_code')\n"
    )
    found = emitted_codes(package)
    assert found == {"brand_new_code": ["oproxy/new.py:3"]}
    assert "brand_new_code" not in documented_codes(PAGE.read_text())
