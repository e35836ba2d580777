"""Latency model: prefill grows with the prompt, decode slows as the batch grows."""

from __future__ import annotations

from dataclasses import dataclass

from engines.sim.config import SimConfig


@dataclass(frozen=True)
class LatencyModel:
    ttft_base_ms: float
    ttft_per_token_ms: float
    itl_ms: float
    batch_slowdown: float

    @classmethod
    def from_config(cls, config: SimConfig) -> LatencyModel:
        return cls(
            config.ttft_base_ms, config.ttft_per_token_ms, config.itl_ms, config.batch_slowdown
        )

    def ttft(self, prompt_tokens: int) -> float:
        """Seconds from scheduling to the first token."""
        return (self.ttft_base_ms + self.ttft_per_token_ms * prompt_tokens) / 1000

    def itl(self, running: int) -> float:
        """Seconds between two tokens of one request while `running` requests share the GPU."""
        return self.itl_ms * (1 + self.batch_slowdown * (max(running, 1) - 1)) / 1000
