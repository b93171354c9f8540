"""
``python -m oproxy.testing.llamacpp --port N``: serve the fake llama.cpp's server.
"""

from oproxy.testing.llamacpp.tap import main

main()
