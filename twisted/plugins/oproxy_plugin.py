"""
Register ``twistd oproxy``, ``twistd oproxy-fake-ollama`` and
``twistd oproxy-fake-openai``.

Twisted finds this module through the ``twisted/plugins/`` directories on
``sys.path``; the makers themselves live in :mod:`oproxy.service_makers`,
where ``oproxy serve`` finds them without that search.
"""

from oproxy.service_makers import oproxy, oproxyFakeOllama, oproxyFakeOpenAI

__all__ = ["oproxy", "oproxyFakeOllama", "oproxyFakeOpenAI"]
