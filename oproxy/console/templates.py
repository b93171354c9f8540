"""
The console's pages, rendered on the server with ``twisted.web.template``.

Every page is the layout (``templates/layout.xml``: header, navigation,
who is signed in, the ``Sign out`` button) around one page's content
(``templates/<page>.xml``).  Pages carry no data a script has to trust:
figures come from the JSON under ``/ui/api/`` and are drawn by the
packaged scripts; the configuration text and a request's record, which a
reader wants at once, are rendered here.  Values are escaped by the
flattener; nothing is written into a script or a ``style``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import orjson
from twisted.web.iweb import IRequest, ITemplateLoader
from twisted.web.template import Element, Tag, XMLString, flattenString, renderer, tags

from oproxy import __version__
from oproxy.console.static import asset_url

#: The navigation, in order: the link's text, its path, its page name.
NAVIGATION = (
    ("Dashboard", "/ui/", "dashboard"),
    ("Models", "/ui/models", "models"),
    ("Keys", "/ui/keys", "keys"),
    ("Configuration", "/ui/configuration", "configuration"),
    ("Requests", "/ui/requests", "requests"),
)

_LOADERS: dict[str, ITemplateLoader] = {}


def loader(name: str) -> ITemplateLoader:
    """A packaged template, read once."""
    found = _LOADERS.get(name)
    if found is None:
        text = resources.files("oproxy.console").joinpath("templates", f"{name}.xml").read_text()
        found = _LOADERS[name] = XMLString(text)
    return found


class Content(Element):
    """A page's content: its template, and the values its slots take."""

    def __init__(self, name: str, slots: Mapping[str, Any] | None = None) -> None:
        super().__init__(loader(name))
        self.slots = dict(slots or {})

    @renderer
    def fill(self, request: IRequest | None, tag: Tag) -> Tag:
        return tag.fillSlots(**{k: v for k, v in self.slots.items() if isinstance(v, str)})

    @renderer
    def message(self, request: IRequest | None, tag: Tag) -> Tag | str:
        return ""

    @renderer
    def note(self, request: IRequest | None, tag: Tag) -> Tag | str:
        note = self.slots.get("note_text")
        return tags.div(note, class_="notice", role="note") if note else ""

    @renderer
    def fields(self, request: IRequest | None, tag: Tag) -> Tag:
        record: Mapping[str, Any] = self.slots.get("fields", {})
        for name, value in record.items():
            shown = "\u2013" if value is None else value if isinstance(value, str) else _json(value)
            tag(tags.dt(name), tags.dd(tags.code(shown)))
        return tag

    @renderer
    def bodies(self, request: IRequest | None, tag: Tag) -> Tag | list[Tag]:
        bodies: Sequence[tuple[str, str | None]] = self.slots.get("bodies", ())
        if not bodies:
            return tags.p(
                "Bodies are not logged: set ",
                tags.code("access_log.bodies: true"),
                " in the configuration to keep them (redacted and capped) for new requests.",
                class_="muted",
            )
        shown = []
        for title, body in bodies:
            shown.append(tags.h3(title))
            shown.append(tags.pre(_pretty(body) if body is not None else "\u2013", class_="body"))
        return shown

    @renderer
    def no_admin(self, request: IRequest | None, tag: Tag) -> Tag | str:
        if not self.slots.get("no_admin_key"):
            return ""
        return tags.div(
            tags.h2("No admin key exists yet"),
            tags.p("Make one on the host the daemon runs on, then sign in with it:"),
            tags.pre(tags.code("oproxy keys create NAME --admin")),
            tags.p(
                "or give a key ",
                tags.code("admin: true"),
                " under ",
                tags.code("auth.keys"),
                " in the configuration file.",
                class_="small muted",
            ),
            class_="notice",
            role="note",
        )


class LoginContent(Content):
    """The sign-in form, with what went wrong last time, if anything."""

    @renderer
    def message(self, request: IRequest | None, tag: Tag) -> Tag | str:
        text = self.slots.get("error")
        if text:
            return tags.p(text, class_="error", role="alert")
        notice = self.slots.get("notice")
        if notice:
            return tags.p(notice, class_="notice", role="status")
        return ""


class Layout(Element):
    """
    The frame of every page.

    :param page: the page's name (``dashboard``...), which the scripts read
        from ``<body data-page>`` and the navigation marks as current.
    :param who: the name of the key signed in (``None``: nobody).
    :param section: the navigation entry the page belongs to (its own, by default).
    :param csrf: the session's CSRF token, for the scripts and forms.
    """

    def __init__(
        self,
        page: str,
        title: str,
        content: Element,
        who: str | None,
        csrf: str,
        *,
        section: str | None = None,
    ) -> None:
        super().__init__(loader("layout"))
        self.page_name, self.title, self.inner = page, title, content
        self.who_name, self.csrf = who, csrf
        self.section = section or page

    @renderer
    def page(self, request: IRequest | None, tag: Tag) -> Tag:
        return tag.fillSlots(
            title=self.title,
            csrf=self.csrf,
            css=asset_url("console.css"),
            charts=asset_url("charts.js"),
            script=asset_url("console.js"),
            page=self.page_name,
            version=__version__,
            host=f"{socket.gethostname()} (pid {os.getpid()})",
        )

    @renderer
    def navigation(self, request: IRequest | None, tag: Tag) -> Tag | str:
        if self.who_name is None:
            return ""
        links = []
        for text, href, page in NAVIGATION:
            link = tags.a(text, href=href)
            if page == self.section:
                link(**{"aria-current": "page"})
            links.append(tags.li(link))
        return tags.nav(tags.ul(*links), class_="nav", **{"aria-label": "Console"})

    @renderer
    def who(self, request: IRequest | None, tag: Tag) -> Tag | str:
        if self.who_name is None:
            return ""
        return tags.div(
            tags.span("Signed in as ", tags.strong(self.who_name), class_="small"),
            tags.form(
                tags.input(type="hidden", name="csrf_token", value=self.csrf),
                tags.button("Sign out", type="submit", class_="ghost"),
                method="post",
                action="/ui/logout",
            ),
            class_="who",
        )

    @renderer
    def content(self, request: IRequest | None, tag: Tag) -> Tag:
        return tag(self.inner)


async def render(layout: Layout) -> bytes:
    """The whole page, as bytes."""
    body: bytes = await flattenString(None, layout)
    return b"<!DOCTYPE html>\n" + body


def _json(value: Any) -> str:
    return orjson.dumps(value).decode("utf-8")


def _pretty(body: str) -> str:
    """A logged body (JSON text, maybe cut short) indented when it parses."""
    try:
        return orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode("utf-8")
    except orjson.JSONDecodeError:
        return body
