"""
``python -m oproxy.testing.ollama --port N``: serve the fake Ollama.
"""

from oproxy.testing.ollama.tap import main

main()
