"""The model catalog: the YAML a platform team writes, validated into frozen objects.

Everything downstream (Envoy resources, ModelPolicy resources, simulated engines) is rendered from a
`Catalog`; nothing else reads the YAML. Errors name the model and the field (docs/catalog.md).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kvgate import kv_math
from kvgate.chat_template import ChatTemplate, TemplateError, TemplateSource, read_template

SIM = "sim"  # endpoint placeholder: `kvgate up` starts a simulated engine and fills in its address
TRITON_METRICS_PORT = 8002
# A request may wait for KV budget at most this long: Envoy's ext_proc max_message_timeout is 60 s.
MAX_WAIT_S = 55.0
# The longest request timeout a model may have. ext_proc releases a reservation whose stream end never
# came after its TTL (ext_proc/server.py, reservation_ttl_s, 900 s): that must stay above the longest
# request, its wait for budget plus this (tests/unit/test_catalog.py holds the two together).
MAX_REQUEST_TIMEOUT_S = 780.0

# Catalog names: models, and the engine-side models whose metrics count.
_MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as '20GiB' or '512 MB'."""
    if isinstance(value, bool):
        raise ValueError("expected a byte size such as 20GiB")
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a byte size (examples: 21474836480, 20GiB, 512MB)")
    return int(Decimal(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


ByteSize = Annotated[int, BeforeValidator(parse_size), Field(gt=0)]


class CatalogError(ValueError):
    """A catalog that must not be served; `problems` are 'where: what' lines."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid catalog:\n  " + "\n  ".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Address(_Strict):
    host: str
    port: int = Field(gt=0, lt=65536)
    # Triton serves gRPC on a second port of the same server.
    grpc_port: int | None = Field(default=None, gt=0, lt=65536)
    # Where the engine publishes Prometheus metrics: trtllm-serve on its HTTP port, Triton on 8002.
    metrics_port: int | None = Field(default=None, gt=0, lt=65536)
    # The path of those metrics, when the engine is not trtllm-serve (/prometheus/metrics) or Triton
    # (/metrics): vLLM serves /metrics on its HTTP port.
    metrics_path: str | None = Field(default=None, pattern=r"^/")
    # Failover level: 0 primary GPUs, 1 overflow, ...; Envoy and admission use a level only when the
    # ones above it are unhealthy or full.
    priority: int = Field(default=0, ge=0, le=7)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    def metrics_url(self, protocol: str, engine: str = "trtllm") -> str:
        if protocol == "triton":
            return f"http://{self.host}:{self.metrics_port or TRITON_METRICS_PORT}{self.metrics_path or '/metrics'}"
        default_path = "/metrics" if engine == "vllm" else "/prometheus/metrics"
        return f"http://{self.host}:{self.metrics_port or self.port}{self.metrics_path or default_path}"

    def grpc(self) -> Address:
        if self.grpc_port is None:
            raise ValueError(f"endpoint {self} has no grpc_port")
        return Address(host=self.host, port=self.grpc_port, priority=self.priority)


def parse_endpoint(value: Any) -> str | Address | dict[str, Any]:
    """'host:port', 'sim', or a mapping {host, port, grpc_port} (validated as an Address)."""
    if isinstance(value, (Address, dict)) or value == SIM:
        return value
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint {value!r} must be 'host:port' or 'sim'")
    return Address(host=host.strip("[]"), port=int(port))


Endpoint = Annotated[str | Address, BeforeValidator(parse_endpoint)]


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _resolve(path: Path | None, info: ValidationInfo) -> Path | None:
    """A path relative to the catalog file; absolute, so the catalog still finds it when re-written
    elsewhere (kvgate up's run dir)."""
    base = (info.context or {}).get("base_dir")
    return (Path(base) / path).resolve() if path is not None and base and not path.is_absolute() else path


class KVSpec(_Strict):
    """KV bytes per token given directly, or derived from a config.json (HF or TensorRT-LLM); the
    budget of one endpoint given directly, or derived from its GPU's memory as TensorRT-LLM sizes its
    KV pool (docs/catalog.md)."""

    bytes_per_token: int | None = Field(default=None, gt=0)
    config_json: Path | None = None
    kv_dtype: str | None = None  # overrides the config's dtype, e.g. fp8 KV on a bf16 model
    tensor_parallel: int | None = Field(default=None, gt=0)
    budget_per_endpoint: ByteSize | None = None
    gpu_memory: ByteSize | None = None  # of one GPU of the endpoint
    weights: ByteSize | None = None  # on one GPU; default: estimated from config_json
    free_memory_fraction: float = Field(default=kv_math.DEFAULT_FREE_FRACTION, gt=0, le=1)
    # Runtime buffers, activations, CUDA context: see kv_math.DEFAULT_RESERVED_BYTES. 0 is allowed.
    reserved: Annotated[int, BeforeValidator(parse_size), Field(ge=0)] = kv_math.DEFAULT_RESERVED_BYTES
    max_tokens_in_paged_kv_cache: int | None = Field(default=None, gt=0)
    # The engine's KV pool this model draws on, when one endpoint holds several (a Triton serving two
    # TensorRT-LLM engines). Default: the endpoint's one pool, shared by every model served there.
    pool: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

    @field_validator("config_json")
    @classmethod
    def _relative_to_catalog(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return _resolve(path, info)

    @model_validator(mode="after")
    def _one_source(self) -> KVSpec:
        if (self.bytes_per_token is None) == (self.config_json is None):
            raise ValueError("give exactly one of bytes_per_token and config_json")
        if self.config_json is not None and not self.config_json.is_file():
            raise ValueError(f"config_json {str(self.config_json)!r} is not a file")
        return self

    @model_validator(mode="after")
    def _one_budget(self) -> KVSpec:
        if (self.budget_per_endpoint is None) == (self.gpu_memory is None):
            raise ValueError("give exactly one of budget_per_endpoint and gpu_memory")
        gpu_only = [f for f in ("weights", "free_memory_fraction", "reserved", "max_tokens_in_paged_kv_cache")
                    if f in self.model_fields_set]
        if self.budget_per_endpoint is not None and gpu_only:
            # Ignoring them would let a catalog believe it sized its budget from the GPU.
            raise ValueError(f"without gpu_memory, {', '.join(gpu_only)} would do nothing "
                             "(budget_per_endpoint is taken as given)")
        if self.gpu_memory is not None:
            _ = self.weight_bytes  # a weight estimate that cannot be made is this catalog's error
        return self

    @cached_property
    def shape(self) -> kv_math.ModelShape | None:
        if self.config_json is None:
            return None
        shape = kv_math.load_model_shape(self.config_json)
        overrides = {k: v for k, v in (("kv_dtype", self.kv_dtype),
                                       ("tensor_parallel", self.tensor_parallel)) if v is not None}
        return shape.__class__(**{**shape.__dict__, **overrides})

    @cached_property
    def weight_bytes(self) -> int:
        """Weights on one GPU: `weights`, else estimated from config_json in the weights' own dtype
        (kv_dtype does not apply) at the tensor parallelism the KV math uses."""
        if self.weights is not None:
            return self.weights
        if self.config_json is None:
            raise ValueError("gpu_memory needs weights (bytes of weights on one GPU): "
                             "there is no config_json to estimate them from")
        try:
            est = kv_math.load_weight_shape(self.config_json)
            tp = {"tensor_parallel": self.tensor_parallel} if self.tensor_parallel else {}
            return est.__class__(**{**est.__dict__, **tp}).bytes_per_gpu()
        except kv_math.ModelShapeError as e:
            raise ValueError(f"cannot estimate weights from config_json ({e}); give weights") from None


class PromptEstimate(_Strict):
    """Upper bound on prompt tokens without the model's tokenizer (docs/catalog.md)."""

    bytes_per_token: float = Field(default=1.0, gt=0)
    per_message_tokens: int = Field(default=8, ge=0)
    per_request_tokens: int = Field(default=8, ge=0)


class EngineMetrics(_Strict):
    """How ext_proc reads the engines' own KV metrics, to correct its ledger (docs/catalog.md)."""

    scrape: bool = True
    interval_s: float = Field(default=1.0, gt=0, le=60)
    # Older metrics make the endpoint count as full: an engine we cannot see is not an empty one.
    stale_after_s: float = Field(default=5.0, gt=0)
    # Triton: the model (its `model` label) whose KV series describe this model's pool, e.g. the
    # TensorRT-LLM model `tensorrt_llm` behind `ensemble`. Default: the one model with non-zero series.
    model: str | None = Field(default=None, pattern=_MODEL_NAME)

    @model_validator(mode="after")
    def _stale_after_interval(self) -> EngineMetrics:
        # A scrape may take up to ~1 s (its timeout) on top of the interval: anything tighter would
        # count a healthy engine as full between two scrapes.
        if self.stale_after_s < self.interval_s + 1.0:
            raise ValueError(f"stale_after_s ({self.stale_after_s}) must be at least interval_s + 1 "
                             f"({self.interval_s + 1.0:g})")
        return self


class LongRequests(_Strict):
    """The sequence-length spike: requests that claim a big part of an engine's KV cache (thousands
    of output tokens) may together hold only part of it, so short requests keep flowing."""

    # A request claiming more than this fraction of an endpoint's budget is long.
    threshold: float = Field(default=0.125, gt=0, le=1)
    # Long requests together hold at most this fraction of it; one alone may hold more, or it could
    # never run. 1.0 turns the rule off.
    max_share: float = Field(default=0.5, gt=0, le=1)
    # The cap protects short requests: it applies while one holds budget on the endpoint or did less
    # than this long ago. A flood of long requests alone may fill the engine (docs/catalog.md).
    short_window_s: float = Field(default=60.0, ge=0, le=3600)


class Timeouts(_Strict):
    """How long Envoy lets one request of the model run (docs/catalog.md, "Timeouts"); past either,
    the client gets a 504 in its convention."""

    # The whole response, from the end of the request to its last byte, streams included: the
    # longest generation the model may legitimately make.
    request_s: float = Field(default=600.0, gt=0, le=MAX_REQUEST_TIMEOUT_S)
    # No byte either way for this long: the engine is stuck. A non-streaming response sends nothing
    # until it is complete, so this also bounds a non-streaming generation (120 s: 4,096 tokens at
    # 30 ms each).
    idle_s: float = Field(default=120.0, gt=0, le=MAX_REQUEST_TIMEOUT_S)


class PriorityClass(_Strict):
    """Requests that do not fit yet wait up to max_wait_s for budget; higher classes go first."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    max_wait_s: float = Field(ge=0, le=MAX_WAIT_S)


DEFAULT_PRIORITY_CLASSES = (PriorityClass(name="interactive", max_wait_s=5.0),
                            PriorityClass(name="batch", max_wait_s=30.0))


class SimSettings(_Strict):
    """Latency model of simulated engines (used by `kvgate up` for `sim` endpoints only)."""

    ttft_base_ms: float = Field(default=20.0, ge=0)
    ttft_per_token_ms: float = Field(default=0.05, ge=0)
    itl_ms: float = Field(default=10.0, ge=0)
    batch_slowdown: float = Field(default=0.02, ge=0)
    on_full: Literal["queue", "fail"] = "queue"
    seed: int = 0

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _key_hashes(values: list[str], where: str) -> list[str]:
    """sha256 hex digests of API keys, with or without a 'sha256:' prefix; anything else is a
    mistake (most likely a key pasted in clear, which must never sit in a catalog)."""
    out = [v.strip().lower().removeprefix("sha256:") for v in values]
    bad = [i for i, v in enumerate(out) if not _SHA256.match(v)]
    if bad:
        raise ValueError(f"{where}: entry {bad[0]} is not a sha256 hex digest of an API key "
                         "(store hashes, not keys: `kvgate keys new` prints both)")
    return out


class Tenant(_Strict):
    """Who may call: API keys (stored hashed), which models, and how much per minute."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    api_key_sha256: tuple[str, ...] = ()
    # A file of sha256 digests, one per line ('#' comments), read whenever the catalog is (re)loaded:
    # after editing it, reload the catalog (save it, or `kvgate models apply`).
    api_keys_file: Path | None = None
    models: tuple[str, ...] = ("*",)  # model names, or "*" for all
    requests_per_minute: int | None = Field(default=None, gt=0)
    # Charged at admission with the tokens the request may use (prompt + max_tokens after the clamp).
    tokens_per_minute: int | None = Field(default=None, gt=0)
    priority_class: str | None = None  # the class of this tenant's requests that name none

    @field_validator("api_key_sha256")
    @classmethod
    def _hashes(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_key_hashes(list(values), "api_key_sha256"))

    @field_validator("api_keys_file")
    @classmethod
    def _keys_file(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        path = _resolve(path, info)
        if path is not None and not path.is_file():
            raise ValueError(f"api_keys_file {str(path)!r} is not a file")
        return path

    @cached_property
    def key_hashes(self) -> frozenset[str]:
        lines = self.api_keys_file.read_text().splitlines() if self.api_keys_file else []
        listed = [ln.split("#", 1)[0].strip() for ln in lines]
        return frozenset(self.api_key_sha256) | frozenset(
            _key_hashes([ln for ln in listed if ln], f"api_keys_file {self.api_keys_file}"))

    @model_validator(mode="after")
    def _has_keys(self) -> Tenant:
        if not self.key_hashes:
            raise ValueError("a tenant needs at least one key: api_key_sha256 or api_keys_file")
        return self


class Model(_Strict):
    name: str = Field(pattern=_MODEL_NAME)
    # openai: trtllm-serve, vLLM. triton: Triton with the TensorRT-LLM backend (HTTP and gRPC ports).
    protocol: Literal["openai", "triton"] = "openai"
    # The engine's name for the model when it differs (Triton's TRT-LLM ensemble is often `ensemble`).
    backend_model: str | None = Field(default=None, pattern=_MODEL_NAME)
    endpoints: list[Endpoint] = Field(min_length=1)
    max_context_tokens: int = Field(gt=1)
    max_output_tokens: int = Field(default=1024, gt=0)
    tokens_per_block: int | None = Field(default=None, gt=0)
    kv: KVSpec
    prompt_estimate: PromptEstimate = PromptEstimate()
    # The model's tokenizer.json (HF `tokenizers` format): exact prompt counts instead of the estimate.
    tokenizer: Path | None = None
    # Its chat template: a Jinja file or a tokenizer_config.json; default: chat_template.jinja or
    # tokenizer_config.json beside the tokenizer (kvgate/chat_template.py).
    chat_template: Path | None = None
    # Whose KV rules admission follows: TensorRT-LLM's (trtllm-serve, Triton's backend) or vLLM's: how
    # many blocks a sequence takes, where the engine's metrics are.
    engine: Literal["trtllm", "vllm"] = "trtllm"
    engine_metrics: EngineMetrics = EngineMetrics()
    long_requests: LongRequests = LongRequests()
    timeouts: Timeouts = Timeouts()
    # The priority class of this model's requests that name none; default: the catalog's.
    priority_class: str | None = None
    # How admission picks among the endpoints a request fits: where its prompt's prefix is expected in
    # the engine's prefix cache, weighed against KV headroom; or by headroom alone (docs/catalog.md).
    routing: Literal["prefix", "headroom"] = "prefix"
    sim: SimSettings = SimSettings()

    @field_validator("tokenizer", "chat_template")
    @classmethod
    def _model_file(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        path = _resolve(path, info)
        if path is not None and not path.is_file():
            raise ValueError(f"{info.field_name} {str(path)!r} is not a file")
        return path

    @cached_property
    def tokenizer_sha256(self) -> str:
        """Lets every ext_proc replica check it reads the same file the catalog named."""
        return hashlib.sha256(self.tokenizer.read_bytes()).hexdigest() if self.tokenizer else ""

    @cached_property
    def chat_template_source(self) -> TemplateSource | None:
        """The template ext_proc renders chat prompts with (read and compiled when the catalog loads)."""
        return read_template(self.tokenizer, self.chat_template) if self.tokenizer else None

    @model_validator(mode="after")
    def _template_renders(self) -> Model:
        if self.chat_template is not None and self.tokenizer is None:
            raise ValueError("chat_template needs a tokenizer: the rendered prompt is counted with it")
        try:
            source = self.chat_template_source
            if source is not None:
                ChatTemplate(source)
        except TemplateError as e:
            raise ValueError(f"chat template: {e}") from None
        return self

    @model_validator(mode="after")
    def _ports_match_protocol(self) -> Model:
        addrs = [e for e in self.endpoints if isinstance(e, Address)]
        if self.protocol == "triton" and any(a.grpc_port is None for a in addrs):
            raise ValueError("triton endpoints need both ports: {host: ..., port: HTTP, grpc_port: GRPC}")
        if self.protocol == "openai" and any(a.grpc_port is not None for a in addrs):
            raise ValueError("grpc_port is for triton endpoints only")
        if self.engine_metrics.model is not None and self.protocol != "triton":
            # trtllm-serve and vLLM serve one model per process and label their series with no model.
            raise ValueError("engine_metrics.model is for triton models only (other engines serve one model)")
        return self

    @model_validator(mode="after")
    def _endpoints_are_ips(self) -> Model:
        # Envoy's EDS does not resolve names: one named endpoint made Envoy reject every model's
        # endpoints (seen on 1.40), a silent outage. ext_proc's choice is matched by IP too.
        named = [a.host for a in self.endpoints if isinstance(a, Address) and not is_ip_address(a.host)]
        if named:
            raise ValueError(f"endpoint host {named[0]!r} is not an IP address: engines are given to Envoy "
                             "by address (EDS does not resolve names); use the engine's IP")
        return self

    @model_validator(mode="after")
    def _priorities_contiguous(self) -> Model:
        levels = sorted({a.priority for a in self.endpoints if isinstance(a, Address)} | (
            {0} if SIM in self.endpoints else set()))
        if levels and levels != list(range(len(levels))):
            raise ValueError(f"endpoint priorities must run 0, 1, ... without gaps; got {levels}")
        return self

    def metrics_urls(self) -> list[str]:
        return [a.metrics_url(self.protocol, self.engine) for a in self.addresses()]

    @model_validator(mode="after")
    def _fits(self) -> Model:
        if self.max_output_tokens >= self.max_context_tokens:
            raise ValueError(f"max_output_tokens ({self.max_output_tokens}) must be below "
                             f"max_context_tokens ({self.max_context_tokens})")
        max_seq_len = self.kv.shape and self.kv.shape.max_seq_len
        if max_seq_len and self.max_context_tokens > max_seq_len:
            # The engine was built for shorter sequences and would reject what the gateway admits.
            raise ValueError(f"max_context_tokens ({self.max_context_tokens}) exceeds the engine config's "
                             f"build_config.max_seq_len ({max_seq_len})")
        one_request = self.full_context_bytes
        budget, kv = self.kv_budget_bytes, self.kv
        if budget < one_request:
            # An engine that cannot hold one full-context request would refuse it forever.
            source = f"kv.budget_per_endpoint ({budget} B)" if kv.budget_per_endpoint is not None else (
                f"the KV budget derived from kv.gpu_memory ({budget} B = {kv.free_memory_fraction} x "
                f"(gpu_memory {kv.gpu_memory} - weights {kv.weight_bytes} - reserved {kv.reserved}) in whole "
                f"blocks" + (f", at most max_tokens_in_paged_kv_cache {kv.max_tokens_in_paged_kv_cache}"
                             if kv.max_tokens_in_paged_kv_cache else "") + ")")
            raise ValueError(f"{source} holds less than one max_context_tokens request ({one_request} B)")
        return self

    @property
    def full_context_bytes(self) -> int:
        """What the largest request the model admits reserves: max_context_tokens in whole blocks."""
        return kv_math.reservation_bytes(self.max_context_tokens, self.block_tokens, self.kv_bytes_per_token)

    @property
    def kv_budget_bytes(self) -> int:
        """KV bytes one endpoint may hand out: kv.budget_per_endpoint, else the KV pool TensorRT-LLM
        would allocate on one GPU of kv.gpu_memory (kv_math.kv_pool_bytes)."""
        kv = self.kv
        if kv.budget_per_endpoint is not None:
            return kv.budget_per_endpoint
        return kv_math.kv_pool_bytes(
            kv.gpu_memory or 0, kv.weight_bytes, bytes_per_token=self.kv_bytes_per_token,
            tokens_per_block=self.block_tokens, free_fraction=kv.free_memory_fraction, reserved=kv.reserved,
            max_tokens=kv.max_tokens_in_paged_kv_cache)

    @property
    def kv_bytes_per_token(self) -> int:
        shape = self.kv.shape
        return shape.bytes_per_token() if shape else int(self.kv.bytes_per_token or 0)

    @property
    def block_tokens(self) -> int:
        """Catalog value, else the engine config's, else TensorRT-LLM's common 32."""
        shape = self.kv.shape
        return self.tokens_per_block or (shape and shape.tokens_per_block) or 32

    def kv_pool_key(self, addr: Address) -> str:
        """The identity of the KV pool this model draws on at `addr`: the address, or the address and
        the pool's name. Models with the same key share one ledger in ext_proc."""
        return f"{addr}/{self.kv.pool}" if self.kv.pool else str(addr)

    def pool_terms(self, addr: Address) -> dict[str, Any]:
        """What models sharing a KV pool must agree on for one ledger to hold them: its size, how a
        request's blocks are counted, and where and how the engine's own metrics are read."""
        return {"KV budget (kv.budget_per_endpoint or the one derived from kv.gpu_memory)": self.kv_budget_bytes,
                "KV bytes per token": self.kv_bytes_per_token, "tokens_per_block": self.block_tokens,
                "engine": self.engine, "metrics URL": addr.metrics_url(self.protocol, self.engine),
                "engine_metrics": self.engine_metrics.model_dump()}

    @property
    def engine_model(self) -> str:
        return self.backend_model or self.name

    @property
    def cluster_name(self) -> str:
        return f"kvgate_model/{self.name}"

    @property
    def grpc_cluster_name(self) -> str:
        return f"kvgate_model/{self.name}/grpc"

    def addresses(self) -> list[Address]:
        """Endpoints as Envoy reaches them; a `sim` left unresolved here is a caller's bug."""
        if any(e == SIM for e in self.endpoints):
            raise CatalogError([f"model {self.name!r}: endpoint 'sim' not started (use `kvgate up`)"])
        return [e for e in self.endpoints if isinstance(e, Address)]


class Catalog(_Strict):
    models: list[Model] = Field(min_length=1)
    # Highest priority first; a request names its class with the x-kvgate-priority header.
    priority_classes: tuple[PriorityClass, ...] = Field(default=DEFAULT_PRIORITY_CLASSES, min_length=1)
    default_priority_class: str | None = None  # default: the first class
    # With tenants, every request needs one of their API keys; without, the gateway is open.
    tenants: tuple[Tenant, ...] = ()

    @model_validator(mode="after")
    def _classes_exist(self) -> Catalog:
        names = [c.name for c in self.priority_classes]
        if len(set(names)) != len(names):
            raise ValueError(f"priority class names must be unique: {', '.join(names)}")
        named = [("default_priority_class", self.default_priority_class)] + [
            (f"model {m.name!r}: priority_class", m.priority_class) for m in self.models] + [
            (f"tenant {t.name!r}: priority_class", t.priority_class) for t in self.tenants]
        for where, name in named:
            if name is not None and name not in names:
                raise ValueError(f"{where} {name!r} is not a priority class ({', '.join(names)})")
        return self

    @model_validator(mode="after")
    def _tenants_consistent(self) -> Catalog:
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError(f"tenant names must be unique: {', '.join(names)}")
        seen: dict[str, str] = {}
        for t in self.tenants:
            unknown = [m for m in t.models if m != "*" and self.model(m) is None]
            if unknown:
                raise ValueError(f"tenant {t.name!r}: models {', '.join(unknown)} not in the catalog")
            for h in t.key_hashes:
                if h in seen:
                    raise ValueError(f"tenants {seen[h]!r} and {t.name!r} share an API key")
                seen[h] = t.name
        return self

    @model_validator(mode="after")
    def _pools_agree(self) -> Catalog:
        """Models served at one address share its KV pool (kv.pool names pools when it holds several):
        they must agree on what the shared ledger is, and pools told apart must be told apart by
        their metrics too."""
        first: dict[str, tuple[Model, Address]] = {}  # pool key -> the first model drawing on it
        at: dict[str, list[Model]] = {}  # address -> the first model of each pool there
        for m in self.models:
            for a in (e for e in m.endpoints if isinstance(e, Address)):
                key = m.kv_pool_key(a)
                if key not in first:
                    first[key] = (m, a)
                    at.setdefault(str(a), []).append(m)
                    continue
                other, other_addr = first[key]
                mine, theirs = m.pool_terms(a), other.pool_terms(other_addr)
                if differ := [f"{k} ({theirs[k]} vs {mine[k]})" for k in mine if mine[k] != theirs[k]]:
                    raise ValueError(f"models {other.name!r} and {m.name!r} share the KV pool at {key} but differ "
                                     f"in {'; '.join(differ)}: one ledger holds both, so give them the same values "
                                     "(or, for separate engines on one server, name their pools: kv.pool)")
        for address, models in at.items():
            _separate_pools(address, models)
        return self

    def priority_class_of(self, model: Model) -> str:
        return model.priority_class or self.default_priority_class or self.priority_classes[0].name

    @model_validator(mode="after")
    def _unique(self) -> Catalog:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        return self

    def model(self, name: str) -> Model | None:
        return next((m for m in self.models if m.name == name), None)

    def with_endpoints(self, endpoints: dict[str, list[Address]]) -> Catalog:
        """The same catalog with each named model's `sim` endpoints replaced, in order."""
        def resolve(m: Model) -> Model:
            started = iter(endpoints.get(m.name, []))
            return m.model_copy(update={"endpoints": [next(started, e) if e == SIM else e for e in m.endpoints]})
        return self.model_copy(update={"models": [resolve(m) for m in self.models]})

    def to_data(self) -> dict[str, Any]:
        """Plain data in the catalog's own schema: parse_catalog(c.to_data()) == c."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        for m in data["models"]:
            m["endpoints"] = [e if e == SIM or len(e) > 2 else f"{e['host']}:{e['port']}"
                              for e in m["endpoints"]]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_data(), sort_keys=False)


def _separate_pools(address: str, models: list[Model]) -> None:
    """Several KV pools at one address (one model of each): each named, and each read from its own
    engine model's metrics, or one engine's use would count against another's pool."""
    if len(models) < 2:
        return
    unnamed = next((m for m in models if m.kv.pool is None), None)
    if unnamed is not None:
        named = next(m for m in models if m.kv.pool is not None)
        raise ValueError(f"models {named.name!r} and {unnamed.name!r} are served at {address}; {named.name!r} "
                         f"names KV pool {named.kv.pool!r} and {unnamed.name!r} none: at an endpoint with several "
                         "pools, every model names its pool (models sharing one name the same)")
    scraped = [m for m in models if m.engine_metrics.scrape]
    if blind := next((m for m in scraped if m.engine_metrics.model is None), None):
        raise ValueError(f"model {blind.name!r}: {address} holds several KV pools ("
                         f"{', '.join(repr(m.kv.pool) for m in models)}): engine_metrics.model must say whose "
                         "metrics describe pool " + repr(blind.kv.pool))
    readers: dict[str | None, Model] = {}
    for m in scraped:
        if (other := readers.setdefault(m.engine_metrics.model, m)) is not m:
            raise ValueError(f"models {other.name!r} and {m.name!r} read engine model "
                             f"{m.engine_metrics.model!r} at {address} for different KV pools "
                             f"({other.kv.pool!r}, {m.kv.pool!r}): one engine model has one pool")


def _describe(loc: tuple[Any, ...], raw: Any, models_at: str) -> str:
    """'model "x" (models[1]): kv.budget_per_endpoint' from a pydantic error location; `models_at`
    is where the model list sits in the document the user wrote."""
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        models = raw.get("models") if isinstance(raw, dict) else None
        name = models[loc[1]].get("name") if isinstance(models, list) and loc[1] < len(models) \
            and isinstance(models[loc[1]], dict) else None
        field = ".".join(str(p) for p in loc[2:] if not str(p).startswith(("function-", "str", "Address")))
        return f"model {name!r} ({models_at}[{loc[1]}])" + (f": {field}" if field else "")
    return ".".join(str(p) for p in loc) or "catalog"


def parse_catalog(raw: Any, base_dir: Path | None = None, *, models_at: str = "models") -> Catalog:
    """`models_at`: how errors name the model list, when the user wrote it elsewhere than at `models`
    (an applied document that is a bare list: "")."""
    try:
        return Catalog.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as e:
        raise CatalogError([f"{_describe(err['loc'], raw, models_at)}: {err['msg']}" for err in e.errors()]) from None
    except (kv_math.ModelShapeError, OSError, ValueError) as e:
        raise CatalogError([str(e)]) from None


def load_catalog(path: Path) -> Catalog:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CatalogError([f"{path}: {e}"]) from None
    return parse_catalog(raw, base_dir=path.parent)


def bundled_catalog_path() -> Path:
    """The example catalog of simulated models that `kvgate up` serves with no arguments."""
    return Path(__file__).parent / "examples" / "catalog.yaml"
