"""
``python -m oproxy.testing.openai --port N``: serve the fake OpenAI-compatible server.
"""

from oproxy.testing.openai.tap import main

main()
