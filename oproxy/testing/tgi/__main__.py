"""
``python -m oproxy.testing.tgi --port N``: serve the fake text-generation-inference.
"""

from oproxy.testing.tgi.tap import main

main()
