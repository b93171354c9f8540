"""
The earlier name of :mod:`oproxy.testing.ollama`, kept so that old imports
and ``python -m oproxy.testing.fake_ollama`` keep working.
"""

from oproxy.testing.ollama import FakeModel as FakeModel
from oproxy.testing.ollama import FakeOllama as FakeOllama
from oproxy.testing.ollama import GenerationStats as GenerationStats
from oproxy.testing.ollama.tap import main

if __name__ == "__main__":
    main()
