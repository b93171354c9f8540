"""
The handlers: one module per API family (OpenAI's, Ollama's native API, key
management, status).  Each gets a :class:`~oproxy.api.scope.Scope` and
parses, delegates and renders; the steps around it are the pipeline's
(:mod:`oproxy.web.pipeline`).
"""
