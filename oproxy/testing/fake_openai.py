"""
The earlier name of :mod:`oproxy.testing.openai`, kept so that old imports
and ``python -m oproxy.testing.fake_openai`` keep working.
"""

from oproxy.testing.openai import BROKEN_MESSAGE as BROKEN_MESSAGE
from oproxy.testing.openai import DEFAULT_OPENAI_MODELS as DEFAULT_OPENAI_MODELS
from oproxy.testing.openai import FakeOpenAI as FakeOpenAI
from oproxy.testing.openai import FakeOpenAIModel as FakeOpenAIModel
from oproxy.testing.openai import FakeOpenAIStats as FakeOpenAIStats
from oproxy.testing.openai.tap import main

if __name__ == "__main__":
    main()
