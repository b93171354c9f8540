"""
OpenAI's Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE
/v1/responses/{id}``, ``GET /v1/responses/{id}/input_items``.

A response is made as a chat completion (:mod:`oproxy.translate.responses`
translates both ways), through the same admission, cache, routes and relay
as ``/v1/chat/completions``, so keys, limits, metrics, logs and the cache
apply as they do there.

With ``store: true`` (OpenAI's default) the finished response, its input
items and the ids of the responses it continues are kept in the state
store, for ``responses.ttl``, under the caller that made it: another key
cannot read, continue or delete it (it is a 404 to them, as a response that
never was).  ``previous_response_id`` puts the stored conversation before
the new input, reading every response of the chain in one step, and keeps
that chain alive as long as the new response.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager
from typing import Any, Final

import orjson
from twisted.logger import Logger

from oproxy.api.answer import Shape
from oproxy.api.scope import Scope
from oproxy.api.through_chat import answer_through_chat
from oproxy.errors import InvalidRequest, NotFound, StoreUnavailable
from oproxy.state.base import StateUnavailable, StoredResponse
from oproxy.streaming import Framing, typed_sse_event
from oproxy.translate import responses
from oproxy.translate.chat import remote_image_urls
from oproxy.translate.common import optional_boolean, optional_string

log = Logger()

#: ``GET .../input_items``: the page size OpenAI uses by default, and its bound.
DEFAULT_PAGE: Final = 20
LARGEST_PAGE: Final = 100


def _owner(scope: Scope) -> str:
    """Whose responses these are: the caller's key (or address, for anonymous callers)."""
    return scope.caller.subject if scope.caller is not None else "anonymous"


def _not_found(response_id: str, param: str | None = None) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param=param)


@contextmanager
def _store_answers() -> Iterator[None]:
    """
    Around a read or a deletion the client waits for: a store that cannot
    answer is the client's 503, to try again shortly.
    """
    try:
        yield
    except StateUnavailable:
        raise StoreUnavailable(
            "The response store is unavailable. Please try again shortly.",
            headers={"retry-after": "1"},
        ) from None


async def _stored(scope: Scope, ids: Sequence[str]) -> dict[str, StoredResponse]:
    """The caller's stored responses among ``ids``."""
    with _store_answers():
        return await scope.services.state.get_responses(
            ids, _owner(scope), scope.services.clock.seconds()
        )


def _document(record: StoredResponse) -> dict[str, Any]:
    document: dict[str, Any] = orjson.loads(record.document)
    return document


async def _history(scope: Scope, previous_id: str) -> tuple[list[str], list[dict[str, Any]]]:
    """
    The chain ``previous_id`` ends (its ids, oldest first) and the items of
    its conversation: each response's input, then its output.
    """
    found = await _stored(scope, [previous_id])
    if previous_id not in found:
        raise _not_found(previous_id, "previous_response_id")
    previous = _document(found[previous_id])
    chain = [*previous["history"], previous_id]
    records = {**found, **await _stored(scope, previous["history"])}
    items: list[dict[str, Any]] = []
    for response_id in chain:
        record = records.get(response_id)
        if record is None:
            raise InvalidRequest(
                f"Response '{response_id}', which '{previous_id}' continues, is no longer "
                "stored (deleted or expired): the conversation cannot be rebuilt.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        document = _document(record)
        items += document["input"]
        items += document["response"]["output"]
    return chain, items


class _Keeper:
    """Keeps a finished response in the state store, when it is to be kept."""

    def __init__(
        self, scope: Scope, items: list[dict[str, Any]], chain: list[str], wanted: bool
    ) -> None:
        self._scope = scope
        self._items = items
        self._chain = chain
        self.wanted = wanted

    async def keep(self, response: dict[str, Any]) -> None:
        """
        Store ``response``; one that is too large, or that the store would
        not take, is answered all the same, saying ``store: false``.
        """
        if not self.wanted:
            return
        scope = self._scope
        config = scope.config.responses
        document = orjson.dumps(
            {"response": response, "input": self._items, "history": self._chain}
        ).decode()
        if len(document) > config.max_bytes:
            self._not_kept(
                response,
                "Response {response_id} not stored: {size} bytes, over responses.max_bytes",
                size=len(document),
            )
            return
        now = scope.services.clock.seconds()
        record = StoredResponse(response["id"], _owner(scope), now + config.ttl, document)
        try:
            await scope.services.state.put_response(record, self._chain, now)
        except StateUnavailable as e:
            self._not_kept(response, "Response {response_id} not stored: {reason}", reason=str(e))

    def _not_kept(self, response: dict[str, Any], line: str, **why: object) -> None:
        """Say why ``response`` was not stored, and that it says ``store: false``."""
        log.warn(line, response_id=response["id"], **why, request_id=self._scope.request_id)
        response["store"] = False


async def create(scope: Scope) -> bytes | None:
    body = scope.body
    scope.model()
    wanted = optional_boolean(body, "store", "store") is not False
    previous_id = optional_string(body, "previous_response_id", "previous_response_id")
    items = responses.input_items(body)
    chain: list[str] = []
    history: list[dict[str, Any]] = []
    if previous_id:
        responses.chat_request(body, [], items)  # refuse a bad request before reading the store
        chain, history = await _history(scope, previous_id)
    chat = responses.chat_request(body, history, items)
    stream = scope.stream()
    model, routes = await scope.admitted_routes("chat", chat)
    clock = scope.services.clock
    keeper = _Keeper(scope, items, chain, wanted and scope.config.responses.store)
    template = responses.response_template(
        body,
        response_id=responses.new_response_id(),
        created_at=int(clock.seconds()),
        store=keeper.wanted,
    )
    image_urls = remote_image_urls(chat)

    async def render(completion: dict[str, Any]) -> dict[str, Any]:
        response = responses.response_from_chat(
            template, completion, completed_at=int(clock.seconds())
        )
        await keeper.keep(response)
        return response

    translator = responses.ResponseStream(template, lambda: int(clock.seconds()))

    async def events(
        chunks: AsyncGenerator[dict[str, Any], None],
    ) -> AsyncGenerator[dict[str, Any], None]:
        async with aclosing(translator.events(chunks)) as translated:
            async for event in translated:
                if event["type"] in ("response.completed", "response.incomplete"):
                    # Kept before the client hears of it, so that a
                    # request chained onto it at once finds it.
                    await keeper.keep(event["response"])
                yield event

    def failure(error: Any) -> bytes:
        return b"".join(typed_sse_event(event) for event in translator.failure(error))

    shape = Shape(
        label="responses",
        render=render,
        events=events,
        framing=Framing(event=typed_sse_event, failure=failure, ending=b""),
    )
    return await answer_through_chat(
        scope,
        chat,
        model,
        routes,
        shape,
        stream=stream,
        image_urls=image_urls,
        body_for=lambda route: route.body(chat),
    )


async def retrieve(scope: Scope) -> bytes | None:
    """``GET /v1/responses/{id}``: the caller's stored response."""
    response_id = scope.params["response_id"]
    if _query(scope, "stream") in ("true", "1"):
        raise InvalidRequest(
            "Streaming a stored response again is not supported by this server.",
            param="stream",
            code="unsupported_value",
        )
    found = await _stored(scope, [response_id])
    if response_id not in found:
        raise _not_found(response_id)
    return scope.json(_document(found[response_id])["response"])


async def delete(scope: Scope) -> bytes | None:
    """``DELETE /v1/responses/{id}``: forget the caller's stored response."""
    response_id = scope.params["response_id"]
    with _store_answers():
        deleted = await scope.services.state.delete_response(
            response_id, _owner(scope), scope.services.clock.seconds()
        )
    if not deleted:
        raise _not_found(response_id)
    return scope.json({"id": response_id, "object": "response", "deleted": True})


async def input_items(scope: Scope) -> bytes | None:
    """
    ``GET /v1/responses/{id}/input_items``: the response's own input items,
    a page at a time (``limit``, ``order``, ``after``), as OpenAI pages them.
    """
    response_id = scope.params["response_id"]
    limit = _page_size(_query(scope, "limit"))
    order = _query(scope, "order") or "desc"
    if order not in ("asc", "desc"):
        raise InvalidRequest("Invalid value for 'order': expected 'asc' or 'desc'.", param="order")
    after = _query(scope, "after")
    found = await _stored(scope, [response_id])
    if response_id not in found:
        raise _not_found(response_id)
    items = list(_document(found[response_id])["input"])
    return scope.json(page(items, limit=limit, descending=order == "desc", after=after))


def page(
    items: list[Mapping[str, Any]], *, limit: int, descending: bool, after: str | None
) -> dict[str, Any]:
    """One page of ``items``: those after the item ``after``, in order."""
    ordered = list(reversed(items)) if descending else list(items)
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise InvalidRequest(
                f"Invalid value for 'after': no input item with id '{after}'.", param="after"
            )
        ordered = ordered[ids.index(after) + 1 :]
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > limit,
    }


def _query(scope: Scope, name: str) -> str | None:
    args = getattr(scope.request, "args", None) or {}
    values = args.get(name.encode("ascii"))
    return values[0].decode("utf-8", "replace") if values else None


def _page_size(value: str | None) -> int:
    if value is None:
        return DEFAULT_PAGE
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if not 1 <= limit <= LARGEST_PAGE:
        raise InvalidRequest(
            f"Invalid value for 'limit': expected a whole number from 1 to {LARGEST_PAGE}.",
            param="limit",
        )
    return limit
