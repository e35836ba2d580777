"""CPU simulator of TensorRT-LLM's trtllm-serve with a paged KV cache.

Serves the OpenAI API on a real socket so the gateway can be run and tested
without GPUs: `python -m engines.sim --help`.
"""

from engines.sim.config import SimConfig
from engines.sim.openai_server import create_app

__all__ = ["SimConfig", "create_app"]
