"""
What a plugin is, for the people who write one.

A plugin module exposes a *factory* (:class:`IPluginFactory`, most simply
a :class:`PluginFactory`): the name the configuration uses, the class of
its options, and a way to build the plugin from them.  The plugin it
builds provides one or more of the four hooks, each a small interface of
its own, so it implements only what it needs:

* :class:`IRequestHook` -- ``on_request(exchange, body)``: after the
  caller's key is checked and before anything is routed; may change the
  parsed body or refuse the request;
* :class:`IResponseHook` -- ``on_response(exchange, answer)``: a whole
  (not streamed) JSON answer, which it may change or refuse;
* :class:`IChunkHook` -- ``on_chunk(exchange, chunk)``: every chunk of a
  stream, which it may change, drop, multiply, or end the stream at with
  an error; called once more with ``None`` when the stream has ended;
* :class:`ICompletionHook` -- ``on_complete(exchange, outcome)``: after the
  answer has been sent (usage, timing, status); it never delays an answer.

Each hook may return its result, a Deferred, or be a coroutine (``async
def``); awaited results are bounded by the plugin's ``timeout``.  A hook
refuses by raising any :class:`oproxy.errors.OProxyError` (``InvalidRequest``
for a 400, ``PermissionDenied`` for a 403...), which the client gets in the
dialect of its route: OpenAI's error object, or Ollama's ``{"error": ...}``
on the native ``/api/*`` routes.  Any other exception, or a timeout, is the
plugin failing: logged (and sent to Sentry when configured), then the
request is refused or the hook skipped, as the plugin's ``on_error`` says.

The shapes a hook sees are the route's own: on the OpenAI routes the
request body, the answer and the chunks are OpenAI's (``chat.completion``,
``chat.completion.chunk``, ``text_completion``...); on the native routes
they are Ollama's (``/api/chat`` lines with ``message`` and ``done``...).
:attr:`Exchange.api` says which (``"openai"`` or ``"ollama"``) and
:attr:`Exchange.route` which route (``/v1/chat/completions``, ``/api/chat``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface, implementer

from oproxy.metrics import Metrics

#: A JSON object, as parsed: what bodies, answers and chunks are.
JSON = dict[str, Any]


class Exchange:
    """
    What a plugin knows about one request.

    Each plugin gets an exchange of its own for each request it applies to,
    the same one in every hook, so :attr:`state` is where it keeps what it
    must remember from one chunk to the next.

    :ivar route: the route, as the metrics label it (``/v1/chat/completions``,
        ``/api/chat``).
    :ivar api: ``"openai"`` or ``"ollama"``: the shapes of the body, the
        answer and the chunks.
    :ivar key: the name of the caller's key (``None``: anonymous).
    :ivar model: the model the body asks for, once every request hook has
        run (``None`` when the body names none).
    :ivar request_id: the request's id, as the answer's ``x-request-id``
        and the logs give it.
    :ivar started: when the request arrived, in the reactor's seconds.
    :ivar state: the plugin's own, for this request.
    """

    __slots__ = ("api", "key", "model", "request_id", "route", "started", "state")

    def __init__(
        self,
        route: str,
        api: str,
        key: str | None,
        model: str | None,
        request_id: str,
        started: float,
    ) -> None:
        self.route = route
        self.api = api
        self.key = key
        self.model = model
        self.request_id = request_id
        self.started = started
        self.state: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"Exchange(route={self.route!r}, api={self.api!r}, key={self.key!r}, "
            f"model={self.model!r}, request_id={self.request_id!r})"
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """
    How a request ended, for :class:`ICompletionHook`.

    :ivar status: the HTTP status sent (499: the client hung up first).
    :ivar error: the error's code (or type) when it failed, else ``None``.
    :ivar seconds: from the request's arrival to the end of its answer.
    :ivar first_token_seconds: to the first streamed chunk, for a stream.
    :ivar prompt_tokens: as the backend counted them, when it did.
    :ivar completion_tokens: likewise.
    :ivar model: the model that answered, as the backend knows it.
    :ivar backend: the backend that answered (or was tried last).
    :ivar cache: ``HIT``, ``MISS`` or ``BYPASS`` when the cache was asked.
    :ivar streamed: whether the answer was a stream.
    """

    status: int
    error: str | None = None
    seconds: float = 0.0
    first_token_seconds: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None
    backend: str | None = None
    cache: str | None = None
    streamed: bool = False


@dataclass(frozen=True)
class Environment:
    """
    What a factory may build its plugin with.

    :ivar clock: the reactor's time and timed calls (never ``time.time()``).
    :ivar http: a ``treq`` client over the process's pooled upstream
        connections, for plugins that call out.
    :ivar metrics: the process's metrics.
    """

    clock: IReactorTime
    http: Any
    metrics: Metrics


class IPluginFactory(Interface):
    """
    What a plugin module exposes: found by Twisted's plugin system in an
    ``oproxy/plugins/`` directory, or through the ``oproxy.plugins`` entry
    point group.  (It must also provide ``twisted.plugin.IPlugin``, which
    :class:`PluginFactory` does, for Twisted to find it.)
    """

    name = Attribute("The name the configuration enables it by, such as 'pii-redact'.")
    options = Attribute(
        "The attrs class its 'config:' mapping is read into (strictly, by the "
        "configuration's own reader), or None when it takes no options."
    )
    description = Attribute("One line saying what it does.")

    def build(options: Any, environment: Environment) -> object:
        """
        The plugin, from its options (an instance of :attr:`options`, or
        ``None``): an object providing one or more of the hook interfaces.

        It does no I/O: a plugin that needs a connection, a file or a timer
        provides ``twisted.application.service.IService`` and opens them when
        started; the process starts it with its other services, stops it
        (waiting for the Deferred its ``stopService`` returns) after the last
        answer, and keeps it across reloads that leave its options alone.
        """


class IRequestHook(Interface):
    def on_request(exchange: Exchange, body: JSON) -> JSON | Awaitable[JSON | None] | None:
        """
        See (and change) a request before it is routed.

        :param body: the parsed JSON body, the plugin's to change in place.
        :return: ``None`` to go on with ``body`` (changed or not), or a new
            body to go on with.  Raise an
            :class:`~oproxy.errors.OProxyError` to refuse the request.

        The response cache sees the body after every request hook: the key
        of a cached answer is made from what was changed.
        """


class IResponseHook(Interface):
    def on_response(exchange: Exchange, answer: JSON) -> JSON | Awaitable[JSON | None] | None:
        """
        See (and change) a whole answer before it is sent.

        :param answer: the parsed JSON answer, the plugin's to change in place.
        :return: ``None`` for ``answer`` (changed or not), or a new answer.
            Raise an :class:`~oproxy.errors.OProxyError` to send that error
            instead.

        Answers from the response cache pass here too: the cache stores
        what the backend said, not what the plugins made of it.
        """


class IChunkHook(Interface):
    def on_chunk(
        exchange: Exchange, chunk: JSON | None
    ) -> JSON | list[JSON] | Awaitable[JSON | list[JSON] | None] | None:
        """
        See (and change) each chunk of a stream, in order.

        :param chunk: an OpenAI chunk (``chat.completion.chunk``,
            ``text_completion``) on the OpenAI routes, an Ollama line on the
            native ones, the plugin's to change in place; ``None`` once the
            stream has ended normally, for the plugin to add what it held
            back (the chunks returned then go out before OpenAI's
            ``[DONE]``; on the native routes, after the ``done`` line, which
            is why a plugin should flush at ``done`` instead).
        :return: ``None`` to send ``chunk`` (changed or not), a new chunk,
            or a list of chunks to send instead (``[]`` drops it).  Raise an
            :class:`~oproxy.errors.OProxyError` to end the stream with that
            error: an error event on the OpenAI routes, an ``{"error": ...}``
            line on the native ones (or an HTTP error before the first byte).
        """


class ICompletionHook(Interface):
    def on_complete(exchange: Exchange, outcome: Outcome) -> object:
        """
        Learn how a request ended, once its answer has been sent.

        Runs after the answer has left, and is never awaited by anything a
        client waits for; a Deferred or coroutine it returns is bounded by
        the plugin's ``timeout`` and waited for when the process stops.
        """


#: What a factory's build function is.
Build = Callable[[Any, Environment], object]


def from_options(plugin: Callable[[Any], object]) -> Build:
    """
    The build of a plugin made from its options alone, which needs nothing
    of the environment (the shipped ``block-words``, ``max-tokens-cap``...).
    """
    return lambda options, environment: plugin(options)


@implementer(IPlugin, IPluginFactory)
@dataclass(frozen=True)
class PluginFactory:
    """
    A plugin factory from a name, a build function and an options class.

    ::

        factory = PluginFactory("footer", Footer, options=FooterOptions)

    :ivar build: called as ``build(options, environment)``.
    """

    name: str
    build: Build
    options: type[Any] | None = None
    description: str = ""
