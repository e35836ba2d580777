"""Simulator settings, shared by the CLI and by tests that build the app directly."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace

ON_FULL_CHOICES = ("queue", "fail")
PROTOCOL_CHOICES = ("openai", "triton")
FLAVOR_CHOICES = ("trtllm", "vllm")


@dataclass(frozen=True)
class SimConfig:
    protocol: str = field(
        default="openai",
        metadata={
            "help": "API to serve: trtllm-serve's OpenAI API, or Triton's HTTP and gRPC APIs",
            "choices": PROTOCOL_CHOICES,
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "bind address"})
    port: int = field(default=8000, metadata={"help": "bind port (HTTP)"})
    grpc_port: int | None = field(
        default=None,
        metadata={
            "help": "gRPC bind port, required with --protocol triton (0: any free port)",
            "type": int,
        },
    )
    model: str = field(
        default="sim-model",
        metadata={"help": "served model name (with triton: the model name, e.g. ensemble)"},
    )
    flavor: str = field(
        default="trtllm",
        metadata={
            "help": "whose scheduling and metrics: TensorRT-LLM's (a sequence's blocks held from the start, "
                    "no preemption; trtllm-serve's metrics) or vLLM's (blocks as tokens are computed, one "
                    "null block, the newest request preempted when the cache runs out; vLLM's metrics)",
            "choices": FLAVOR_CHOICES,
        },
    )
    tokenizer: str = field(
        default="",
        metadata={"help": "a tokenizer.json to count prompt tokens with, as vLLM does (chats rendered with the "
                          "chat template beside it); default: a token per word"},
    )
    kv_blocks: int = field(default=2048, metadata={"help": "KV cache capacity in blocks"})
    tokens_per_block: int = field(default=32, metadata={"help": "tokens held by one KV block"})
    ttft_base_ms: float = field(default=20.0, metadata={"help": "fixed time to first token"})
    ttft_per_token_ms: float = field(
        default=0.1, metadata={"help": "prefill time per prompt token"}
    )
    itl_ms: float = field(
        default=10.0, metadata={"help": "inter-token latency with one running request"}
    )
    batch_slowdown: float = field(
        default=0.02, metadata={"help": "fractional ITL increase per extra running request"}
    )
    max_batch: int = field(default=256, metadata={"help": "max concurrently running requests"})
    prefix_caching: bool = field(
        default=False,
        metadata={"help": "share and keep the KV blocks of prompt prefixes, as vLLM's automatic prefix caching "
                          "does: cached leading blocks skip prefill"},
    )
    prefill_lanes: int = field(
        default=0,
        metadata={"help": "prefills computed at once, the others waiting their turn (0: no limit); 1 models a "
                          "GPU's one prefill batch at a time"},
    )
    on_full: str = field(
        default="queue",
        metadata={
            "help": "when a request cannot be scheduled: wait FIFO or answer 503",
            "choices": ON_FULL_CHOICES,
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the generated text"})
    record_limit: int = field(
        default=1000, metadata={"help": "how many received request bodies /sim/requests keeps"}
    )

    def __post_init__(self) -> None:
        if self.on_full not in ON_FULL_CHOICES:
            raise ValueError(f"on_full must be one of {ON_FULL_CHOICES}, got {self.on_full!r}")
        if self.protocol not in PROTOCOL_CHOICES:
            raise ValueError(
                f"protocol must be one of {PROTOCOL_CHOICES}, got {self.protocol!r}"
            )
        if self.flavor not in FLAVOR_CHOICES:
            raise ValueError(f"flavor must be one of {FLAVOR_CHOICES}, got {self.flavor!r}")
        if self.protocol == "triton" and self.grpc_port is None:
            raise ValueError("--grpc-port is required with --protocol triton")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ValueError("grpc_port must be in 0..65535")
        for name in ("kv_blocks", "tokens_per_block", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.flavor == "vllm" and self.kv_blocks < 2:
            raise ValueError("kv_blocks must be >= 2 with flavor vllm (one is its null block)")
        for name in (
            "prefill_lanes",
            "ttft_base_ms",
            "ttft_per_token_ms",
            "itl_ms",
            "batch_slowdown",
            "record_limit",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    @classmethod
    def zero_latency(cls, **overrides: object) -> SimConfig:
        """A config whose requests finish as fast as the event loop allows (for tests)."""
        fast = cls(ttft_base_ms=0.0, ttft_per_token_ms=0.0, itl_ms=0.0, batch_slowdown=0.0)
        return replace(fast, **overrides)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per SimConfig field, derived from the fields so the two cannot drift apart."""
    for f in fields(SimConfig):
        extra: dict[str, object] = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        # --flag / --no-flag for a switch: type=bool would read "--flag false" as true.
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(f.default, bool) else {
            "type": f.metadata.get("type", type(f.default))}
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            default=f.default,
            help=f"{f.metadata['help']} (default: %(default)s)",
            **kind,
            **extra,
        )


def from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(**{f.name: getattr(args, f.name) for f in fields(SimConfig)})
