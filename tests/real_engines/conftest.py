"""The real engines, one of each per test session: started by the first test that needs one."""

from tests.real_engines.triton_fixture import triton_engine, triton_unary_engine
from tests.real_engines.triton_gateway_fixture import triton_gateway
from tests.real_engines.vllm_fixture import vllm_engine
from tests.real_engines.vllm_gateway_fixture import vllm_gateway

__all__ = ["triton_engine", "triton_gateway", "triton_unary_engine", "vllm_engine", "vllm_gateway"]
