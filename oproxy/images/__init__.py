"""
Images on the client's behalf: fetched (:mod:`oproxy.images.fetch`, through
:mod:`oproxy.fetch_guard`) and converted (:mod:`oproxy.images.formats`) so
that Ollama can read them.

Ollama only takes inline base64 images and rejects URLs; OpenAI clients send
URLs all the time.  The proxy fetches them, with a size cap, a timeout and a
guard against server-side request forgery, and converts the formats Ollama
cannot read.  The package's modules import nothing until asked: the
translators need only :mod:`~oproxy.images.formats`.
"""
