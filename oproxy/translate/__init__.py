"""
Pure translation between the OpenAI API and Ollama's native API.

Nothing in this package does I/O, reads a clock or holds a connection: every
function takes already-parsed JSON and returns plain dicts ready for
``orjson.dumps``.  A client mistake raises :class:`oproxy.errors.InvalidRequest`
naming the ``param``; an ``{"error": ...}`` from upstream raises
:class:`oproxy.errors.UpstreamError`.  That keeps the subtle part of the
gateway, the field-by-field mapping, testable without a reactor.

Modules: :mod:`.common` (ids, timestamps, usage, sampling options, field
validation), :mod:`.tools` (function tools and response formats),
:mod:`.chat`, :mod:`.completions`, :mod:`.embeddings`,
:mod:`.models`; :mod:`.responses` and :mod:`.messages` (OpenAI's Responses
API and Anthropic's Messages API by way of chat), whose stream translators
share :mod:`.chunks`.
"""
