"""
``python -m oproxy.testing.huggingface --port N``: serve the fake
Inference Providers router.
"""

from oproxy.testing.huggingface.tap import main

main()
