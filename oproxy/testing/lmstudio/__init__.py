"""
A fake LM Studio (:class:`FakeLMStudio`, see
:mod:`oproxy.testing.lmstudio.server`); ``python -m oproxy.testing.lmstudio
--port N`` or ``twistd oproxy-fake-lmstudio`` runs it as a process.
"""

from oproxy.testing.lmstudio.server import DEFAULT_LMSTUDIO_MODELS, FakeLMStudio, LMStudioModel

__all__ = ["DEFAULT_LMSTUDIO_MODELS", "FakeLMStudio", "LMStudioModel"]
