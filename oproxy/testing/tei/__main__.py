"""
``python -m oproxy.testing.tei --port N``: serve the fake text-embeddings-inference.
"""

from oproxy.testing.tei.tap import main

main()
