"""
``python -m oproxy.testing.lmstudio --port N``: serve the fake LM Studio.
"""

from oproxy.testing.lmstudio.tap import main

main()
