"""CPU simulator of an LLM engine with a paged KV cache, in two personalities.

`--protocol openai` (default) serves TensorRT-LLM's trtllm-serve OpenAI API;
`--protocol triton` serves Triton Inference Server with the TensorRT-LLM
backend's ensemble model, over HTTP and gRPC, both fronts on one engine. Both
run on a real socket so the gateway can be run and tested without GPUs:
`python -m engines.sim --help`.
"""

from engines.sim.config import SimConfig
from engines.sim.openai_server import create_app

__all__ = ["SimConfig", "create_app"]
