"""The served Triton model: TensorRT-LLM's `ensemble` (preprocessing -> tensorrt_llm ->
postprocessing), as its inputs, outputs, metadata and config look to clients. Pure.

Both Triton fronts (HTTP and gRPC) turn a request into a TritonCall here, so
they validate alike and raise the same TritonError.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from engines.sim.engine import GenRequest
from engines.sim.text import count_prompt_tokens
from engines.sim.triton_tensors import Tensor, as_values

MODEL_VERSION = "1"
PLATFORM = "ensemble"
SERVER_NAME = "triton"
SERVER_VERSION = "2.41.0"
# The protocol extensions this simulator implements (real Triton lists more).
SERVER_EXTENSIONS = ("model_configuration", "binary_tensor_data", "parameters", "generate")
# Shape of every input and output with the batch dimension: [batch, -1].
SHAPE = [-1, -1]

TEXT_OUTPUT = "text_output"


class TritonError(Exception):
    """An error as Triton reports it: `kind` picks the HTTP status and gRPC code."""

    INVALID = "invalid"  # 400 / INVALID_ARGUMENT
    NOT_FOUND = "not_found"  # 404 / NOT_FOUND
    UNAVAILABLE = "unavailable"  # 503 / UNAVAILABLE

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str
    optional: bool = True
    many: bool = False  # a list per request (stop words), else one element


# The ensemble's inputs in TensorRT-LLM's triton backend (all_models/inflight_batcher_llm).
# Besides text_input, max_tokens, stream and stop_words the simulator accepts, type-checks
# and otherwise ignores the common sampling inputs, as a real ensemble would accept them.
INPUTS: tuple[InputSpec, ...] = (
    InputSpec("text_input", "BYTES", optional=False),
    InputSpec("max_tokens", "INT32", optional=False),
    InputSpec("stream", "BOOL"),
    InputSpec("stop_words", "BYTES", many=True),
    InputSpec("bad_words", "BYTES", many=True),
    InputSpec("end_id", "INT32"),
    InputSpec("pad_id", "INT32"),
    InputSpec("top_k", "INT32"),
    InputSpec("top_p", "FP32"),
    InputSpec("temperature", "FP32"),
    InputSpec("length_penalty", "FP32"),
    InputSpec("repetition_penalty", "FP32"),
    InputSpec("min_length", "INT32"),
    InputSpec("presence_penalty", "FP32"),
    InputSpec("frequency_penalty", "FP32"),
    InputSpec("random_seed", "UINT64"),
    InputSpec("beam_width", "INT32"),
    InputSpec("return_log_probs", "BOOL"),
)
_BY_NAME = {spec.name: spec for spec in INPUTS}
OUTPUTS: tuple[tuple[str, str], ...] = ((TEXT_OUTPUT, "BYTES"),)

# model_config.proto's names of the datatypes above.
_CONFIG_TYPES = {
    "BYTES": "TYPE_STRING",
    "INT32": "TYPE_INT32",
    "UINT64": "TYPE_UINT64",
    "FP32": "TYPE_FP32",
    "BOOL": "TYPE_BOOL",
}


@dataclass(frozen=True)
class TritonCall:
    """One validated inference request."""

    gen: GenRequest
    stream: bool  # the `stream` input: decoupled, one response per token


def check_model(served: str, name: str, version: str = "") -> None:
    """Raises NOT_FOUND unless `name` (and `version`, if given) is the served model.

    Triton's message is kept; its status for an unknown name differs between
    releases (core's model repository manager has answered INVALID_ARG, i.e. 400,
    as well as NOT_FOUND), the simulator answers 404 / NOT_FOUND.
    """
    if name != served:
        raise TritonError(
            TritonError.NOT_FOUND, f"Request for unknown model: '{name}' is not found"
        )
    if version not in ("", MODEL_VERSION):
        raise TritonError(
            TritonError.NOT_FOUND,
            f"Request for unknown model: '{name}' version {version} is not found",
        )


def record_body(model: str, inputs: Iterable[Tensor] | None, error: str = "") -> dict[str, Any]:
    """What /sim/requests shows of a tensor request (HTTP /infer, gRPC), whatever the
    wire format: its decoded inputs, or null inputs and the error if decoding failed."""
    if inputs is None:
        return {"model_name": model, "inputs": None, "error": error}
    return {"model_name": model, "inputs": as_values(inputs)}


def tensor_output(text: str) -> Tensor:
    """text_output as the ensemble returns it: BYTES [1,1]."""
    return Tensor(TEXT_OUTPUT, "BYTES", (1, 1), (text.encode(),))


# --- metadata and config --------------------------------------------------------------


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(SERVER_EXTENSIONS)}


def model_metadata(name: str) -> dict[str, Any]:
    """GET /v2/models/{m}; the gRPC ModelMetadataResponse has the same fields."""
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": [
            {"name": s.name, "datatype": s.datatype, "shape": SHAPE} for s in INPUTS
        ],
        "outputs": [{"name": n, "datatype": d, "shape": SHAPE} for n, d in OUTPUTS],
    }


def model_config(name: str, max_batch_size: int) -> dict[str, Any]:
    """GET /v2/models/{m}/config: model_config.proto as JSON, a small subset of it.

    Decoupled, as the ensemble is when its tensorrt_llm step streams. A real
    Triton then refuses the unary ModelInfer RPC and HTTP /infer for the model
    ("doesn't support models with decoupled transaction policy"); the simulator
    serves them anyway, with one response holding the whole text.
    """
    return {
        "name": name,
        "platform": PLATFORM,
        "max_batch_size": max_batch_size,
        "input": [
            {
                "name": s.name,
                "data_type": _CONFIG_TYPES[s.datatype],
                "dims": [-1],
                "optional": s.optional,
            }
            for s in INPUTS
        ],
        "output": [{"name": n, "data_type": _CONFIG_TYPES[d], "dims": [-1]} for n, d in OUTPUTS],
        "model_transaction_policy": {"decoupled": True},
    }


# --- requests -------------------------------------------------------------------------


def call_from_tensors(model: str, tensors: Iterable[Tensor]) -> TritonCall:
    """Validates KServe v2 input tensors (HTTP /infer, gRPC) as Triton and the ensemble do."""
    values: dict[str, Any] = {}
    for tensor in tensors:
        spec = _BY_NAME.get(tensor.name)
        if spec is None:
            raise _invalid(f"unexpected inference input '{tensor.name}' for model '{model}'")
        if tensor.name in values:
            raise _invalid(f"input '{tensor.name}' is given more than once")
        if tensor.datatype != spec.datatype:
            raise _invalid(
                f"inference input '{tensor.name}' data-type is '{tensor.datatype}', "
                f"but model '{model}' expects '{spec.datatype}'"
            )
        if len(tensor.shape) != len(SHAPE):
            raise _invalid(
                f"unexpected shape for input '{tensor.name}' for model '{model}'. "
                f"Expected [-1,-1], got [{','.join(map(str, tensor.shape))}]"
            )
        if tensor.shape[0] != 1:
            raise _invalid(
                f"input '{tensor.name}': the simulator serves batch size 1, got {tensor.shape[0]}"
            )
        items = [d.decode(errors="replace") if isinstance(d, bytes) else d for d in tensor.data]
        if spec.many:
            values[tensor.name] = items
        elif len(items) != 1:
            raise _invalid(f"input '{tensor.name}' must hold one element, got {len(items)}")
        else:
            values[tensor.name] = items[0]
    return _call(model, values)


def call_from_generate(model: str, body: Any) -> TritonCall:
    """Validates a generate-extension body: input names as keys, JSON values.

    Keys that name no input are request parameters to Triton; they are ignored.
    """
    if not isinstance(body, dict):
        raise _invalid("the generate request must be a JSON object")
    values: dict[str, Any] = {}
    for name, value in body.items():
        spec = _BY_NAME.get(name)
        if spec is None or value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if not spec.many and len(items) != 1:
            raise _invalid(f"input '{name}' must hold one element, got {len(items)}")
        if not all(_json_matches(spec.datatype, v) for v in items):
            raise _invalid(f"unable to parse '{name}': expected {spec.datatype} data")
        values[name] = items if spec.many else items[0]
    return _call(model, values)


def _json_matches(datatype: str, value: Any) -> bool:
    if datatype == "BYTES":
        return isinstance(value, str)
    if datatype == "BOOL":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if datatype in ("INT32", "UINT64"):
        return isinstance(value, int)
    return isinstance(value, int | float)


def _call(model: str, values: Mapping[str, Any]) -> TritonCall:
    missing = [s.name for s in INPUTS if not s.optional and s.name not in values]
    if missing:
        required = sum(not s.optional for s in INPUTS)
        given = sum(not _BY_NAME[n].optional for n in values)
        raise _invalid(
            f"expected {required} inputs but got {given} inputs for model '{model}'. "
            f"Got input(s) {sorted(values)}, but missing required input(s) {missing}. "
            "Please provide all required input(s)."
        )
    text = values["text_input"]
    max_tokens = values["max_tokens"]
    if max_tokens < 1:
        raise _invalid(f"max_tokens must be at least 1, got {max_tokens}")
    stop = tuple(s for s in values.get("stop_words", ()) if s)
    return TritonCall(
        gen=GenRequest(count_prompt_tokens(text), max_tokens, stop, key=text),
        stream=bool(values.get("stream", False)),
    )


def _invalid(message: str) -> TritonError:
    return TritonError(TritonError.INVALID, message)
