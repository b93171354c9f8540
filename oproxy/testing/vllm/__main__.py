"""
``python -m oproxy.testing.vllm --port N``: serve the fake vLLM.
"""

from oproxy.testing.vllm.tap import main

main()
