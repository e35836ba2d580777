"""What a GPU engine must be told so that it is the engine the catalog describes.

kvgate admits requests against a KV budget, in blocks of `tokens_per_block`, for requests of at most
`max_context_tokens`, at KV bytes per token that depend on the engine's KV dtype and tensor
parallelism. An engine started with other numbers makes the gateway's ledger wrong: a bigger KV
pool wastes GPU memory the gateway never hands out, a smaller one queues requests the gateway
admitted. `engine_settings` derives one `EngineSettings` per catalog model; trtllm_serve.py and
triton_repo.py spell it in each engine's own options.

Pure: a catalog `Model` and the parsed config.json it names in, `EngineSettings` out. Paths are
rewritten from the host (where `kvgate engines render` runs) to the containers (where the engines
run), which mount the same folder: see `PathMap`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from kvgate import kv_math
from kvgate.catalog import TRITON_METRICS_PORT, Address, Model

# Where docker-compose.yml mounts the deployment folder (catalog, models, rendered assets) in every
# container: xds_server and ext_proc read the catalog's files there, the engines their weights.
CONTAINER_ROOT = PurePosixPath("/kvgate")
# TensorRT-LLM's KvCacheConfig.tokens_per_block default (PyTorch backend).
DEFAULT_TOKENS_PER_BLOCK = 32

Backend = Literal["pytorch", "tensorrt"]


class EngineAssetError(ValueError):
    """A catalog model no engine can be started for so that it matches the catalog."""


@dataclass(frozen=True)
class PathMap:
    """Host paths under `host_root` are seen by every container under `container_root`: the same
    folder is mounted in all of them, so one path works for xds_server, ext_proc and the engine."""

    host_root: Path
    container_root: PurePosixPath = CONTAINER_ROOT

    def __call__(self, path: Path) -> PurePosixPath:
        try:
            relative = path.resolve().relative_to(self.host_root.resolve())
        except ValueError:
            raise EngineAssetError(f"{path} is outside {self.host_root}, the folder the containers mount "
                                   f"at {self.container_root}: they could not see it") from None
        return self.container_root.joinpath(*relative.parts)


@dataclass(frozen=True)
class EngineLimits:
    """What the catalog does not say and a PyTorch-backend engine needs. A TensorRT engine was built
    with its own, which win. kvgate's default `kv.reserved` (2 GiB of runtime buffers) assumes a
    modest batch: raise `reserved` in the catalog with these."""

    max_batch_size: int = 64
    max_num_tokens: int = 8192


@dataclass(frozen=True)
class EngineSettings:
    model: str  # the catalog's name
    served_model: str  # the engine's name for it (backend_model)
    protocol: Literal["openai", "triton"]
    backend: Backend  # tensorrt: a trtllm-build engine dir; pytorch: an HF checkpoint dir
    checkpoint: PurePosixPath  # that dir, as the containers see it
    tokenizer_dir: PurePosixPath | None  # HF tokenizer files; None: inside the checkpoint
    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    tensor_parallel: int
    pipeline_parallel: int
    tokens_per_block: int
    # The KV pool: this fraction of the memory left after weights and buffers, at most max_kv_tokens.
    free_gpu_memory_fraction: float
    max_kv_tokens: int
    kv_cache_dtype: str | None  # PyTorch backend only: "fp8" when the catalog stores KV in fp8
    port: int  # HTTP
    grpc_port: int | None  # Triton
    metrics_port: int | None  # Triton; trtllm-serve publishes on its HTTP port


@dataclass(frozen=True)
class BuiltEngine:
    """What a TensorRT-LLM engine config.json fixes at build time."""

    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    tokens_per_block: int | None
    tensor_parallel: int
    pipeline_parallel: int
    kv_dtype: str


def built_engine(config: dict[str, Any]) -> BuiltEngine | None:
    """The build of a TensorRT-LLM engine config.json; None for an HF config.json."""
    if "pretrained_config" not in config:
        return None
    build, mapping = config.get("build_config") or {}, config["pretrained_config"].get("mapping") or {}
    missing = [k for k in ("max_batch_size", "max_num_tokens", "max_seq_len") if build.get(k) is None]
    if missing:
        raise EngineAssetError(f"engine config.json has no build_config.{', build_config.'.join(missing)}")
    shape = kv_math.shape_from_trtllm(config)
    return BuiltEngine(max_batch_size=int(build["max_batch_size"]), max_num_tokens=int(build["max_num_tokens"]),
                       max_seq_len=int(build["max_seq_len"]), tokens_per_block=shape.tokens_per_block,
                       tensor_parallel=shape.tensor_parallel, pipeline_parallel=int(mapping.get("pp_size", 1)),
                       kv_dtype=shape.kv_dtype)


def engine_settings(model: Model, config: dict[str, Any], paths: PathMap,
                    limits: EngineLimits = EngineLimits()) -> EngineSettings:
    """The engine of `model`, whose kv.config_json parsed is `config`. Raises EngineAssetError when the
    catalog asks for something the engine cannot be (a block size or KV dtype other than the
    engine's build, endpoints on different ports, no tokenizer for a TensorRT engine)."""
    where = f"model {model.name!r}"
    if model.kv.config_json is None:
        raise EngineAssetError(f"{where}: kv.config_json is needed: its folder is the engine (or HF checkpoint)")
    port, grpc_port, metrics_port = _ports(model)
    engine, shape = built_engine(config), model.kv.shape
    assert shape is not None  # config_json is set
    if engine is None:
        # An HF checkpoint: trtllm-serve's PyTorch backend takes the catalog's numbers at run time.
        backend: Backend = "pytorch"
        max_batch_size, max_num_tokens = limits.max_batch_size, limits.max_num_tokens
        max_seq_len, tp, pp = model.max_context_tokens, shape.tensor_parallel, 1
        kv_cache_dtype = _pytorch_kv_dtype(where, shape.kv_dtype, kv_math.shape_from_hf(config).kv_dtype)
    else:
        backend = "tensorrt"
        _check_build(where, model, engine)
        max_batch_size, max_num_tokens, max_seq_len = engine.max_batch_size, engine.max_num_tokens, engine.max_seq_len
        tp, pp, kv_cache_dtype = engine.tensor_parallel, engine.pipeline_parallel, None
    if model.tokenizer is None and backend == "tensorrt":
        raise EngineAssetError(f"{where}: a TensorRT engine folder holds no tokenizer: set `tokenizer` "
                               "(its tokenizer.json, next to the HF tokenizer files) in the catalog")
    block = model.block_tokens
    return EngineSettings(
        model=model.name, served_model=model.engine_model, protocol=model.protocol, backend=backend,
        checkpoint=paths(model.kv.config_json.parent),
        tokenizer_dir=paths(model.tokenizer.parent) if model.tokenizer else None,
        max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, max_seq_len=max_seq_len,
        tensor_parallel=tp, pipeline_parallel=pp, tokens_per_block=block,
        free_gpu_memory_fraction=model.kv.free_memory_fraction,
        # The ledger's budget in whole blocks of tokens: the engine's pool is never larger, so no GPU
        # memory sits in a pool the gateway never hands out. It is smaller when the GPU has less free
        # memory than the catalog assumed: the engine logs the tokens it got; compare (docs/deploy.md).
        max_kv_tokens=model.kv_budget_bytes // (model.kv_bytes_per_token * block) * block,
        kv_cache_dtype=kv_cache_dtype, port=port, grpc_port=grpc_port, metrics_port=metrics_port)


def _ports(model: Model) -> tuple[int, int | None, int | None]:
    """One engine setup serves every endpoint of a model (each on its own host), so they share ports."""
    addrs = [e for e in model.endpoints if isinstance(e, Address)]
    if len(addrs) != len(model.endpoints):
        raise EngineAssetError(f"model {model.name!r}: `sim` endpoints have no engine to render")
    ports = {(a.port, a.grpc_port, a.metrics_port) for a in addrs}
    if len(ports) > 1:
        raise EngineAssetError(f"model {model.name!r}: endpoints use different ports; one engine setup per "
                               "model needs the same ports on every host")
    port, grpc_port, metrics_port = ports.pop()
    if model.protocol == "triton":
        return port, grpc_port, metrics_port or TRITON_METRICS_PORT
    if metrics_port not in (None, port):
        raise EngineAssetError(f"model {model.name!r}: trtllm-serve publishes its metrics on its HTTP port "
                               f"({port}), not on metrics_port {metrics_port}")
    return port, None, None


def _check_build(where: str, model: Model, engine: BuiltEngine) -> None:
    """A TensorRT engine's block size, KV dtype and parallelism are fixed at build: the catalog may
    not assume others (it defaults to the engine's own)."""
    shape = model.kv.shape
    assert shape is not None
    if engine.tokens_per_block is not None and model.block_tokens != engine.tokens_per_block:
        raise EngineAssetError(f"{where}: tokens_per_block {model.block_tokens} differs from the engine's "
                               f"plugin_config.tokens_per_block {engine.tokens_per_block}")
    if kv_math.dtype_bytes(shape.kv_dtype) != kv_math.dtype_bytes(engine.kv_dtype):
        raise EngineAssetError(f"{where}: kv.kv_dtype {shape.kv_dtype} differs from the engine's KV cache "
                               f"dtype {engine.kv_dtype}; rebuild the engine or drop the override")
    if shape.tensor_parallel != engine.tensor_parallel:
        raise EngineAssetError(f"{where}: kv.tensor_parallel {shape.tensor_parallel} differs from the engine's "
                               f"mapping.tp_size {engine.tensor_parallel}")


def _pytorch_kv_dtype(where: str, kv_dtype: str, model_dtype: str) -> str | None:
    """KvCacheConfig.dtype for the PyTorch backend: none when the KV cache is as wide as the model's
    dtype ("auto"), "fp8" for a catalog that budgets an fp8 KV cache; nothing else can be asked."""
    if kv_math.dtype_bytes(kv_dtype) == kv_math.dtype_bytes(model_dtype):
        return None
    if kv_dtype.lower() in ("fp8", "float8"):
        return "fp8"
    raise EngineAssetError(f"{where}: kv.kv_dtype {kv_dtype} cannot be asked of trtllm-serve's PyTorch "
                           f"backend (its KV cache is {model_dtype} or fp8)")
