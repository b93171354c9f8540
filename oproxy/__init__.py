"""
oproxy: an OpenAI-compatible gateway for the models you run yourself.
"""

__version__ = "0.1.0"
