"""Triton's model repository for the TensorRT-LLM ensemble of one catalog model.

The four models (ensemble, preprocessing, tensorrt_llm, postprocessing) come from NVIDIA's templates,
`all_models/inflight_batcher_llm` of the TensorRT-LLM version in the Triton image (the image ships
them in /app/all_models/inflight_batcher_llm). They change between versions, so they are not copied
into kvgate: `render_repository` fills the ones it is given, as NVIDIA's `tools/fill_template.py`
does (`${name}` placeholders, `string.Template.safe_substitute`), with values that make the engine
match the catalog:

- `max_tokens_in_paged_kv_cache` = the catalog's budget in tokens and `kv_cache_free_gpu_mem_fraction`
  = kv.free_memory_fraction: the pool is at most what the gateway hands out;
- `batching_strategy: inflight_fused_batching`, `batch_scheduler_policy: guaranteed_no_evict`: the
  engine schedules a request only when its whole KV fits, the same promise the gateway's
  reservations make;
- `triton_max_batch_size` = the engine's build max_batch_size; `decoupled_mode` only for token
  streaming (a decoupled model refuses Triton's unary infer over HTTP and gRPC).

Pure: template texts in, filled texts out. A template without a value kvgate must set (another
template version) or with a placeholder left where Triton needs a value (a data type, a batch
size) is an error, not a config that fails at load time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from string import Template

from engines.engine_settings import EngineAssetError, EngineSettings

SUBMODELS = ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing")
# What clients call: NVIDIA's ensemble is named by its folder.
ENSEMBLE = "ensemble"
CONFIG = "config.pbtxt"
# A placeholder may stay unfilled only as a parameter's value: the backend reads "${...}" as unset.
_PARAMETER_PLACEHOLDER = re.compile(r'^\s*string_value:\s*"\$\{\w+\}"\s*$')
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


@dataclass(frozen=True)
class TritonOptions:
    # Token streaming (generate_stream, ModelStreamInfer): a decoupled tensorrt_llm model. Triton then
    # refuses unary infer (KServe /infer, gRPC ModelInfer) for it, so it is off by default.
    decoupled: bool = False
    preprocessing_instances: int = 1
    postprocessing_instances: int = 1


@dataclass(frozen=True)
class Fill:
    """One template's values: `required` must have a placeholder in it, `optional` are filled where
    they have one (keys that exist only in some template versions)."""

    required: dict[str, str]
    optional: dict[str, str]


def _flag(value: bool) -> str:
    return "True" if value else "False"


def fills(s: EngineSettings, options: TritonOptions = TritonOptions()) -> dict[str, Fill]:
    """The values of each of the four templates, by model folder."""
    batch = str(s.max_batch_size)
    # fill_template.py's own defaults: Triton needs numbers there.
    queue = {"max_queue_size": "0", "max_queue_delay_microseconds": "0"}
    return {
        ENSEMBLE: Fill({"triton_max_batch_size": batch}, {"logits_datatype": "TYPE_FP32", **queue}),
        "preprocessing": Fill(
            {"tokenizer_dir": str(s.tokenizer_dir), "triton_max_batch_size": batch,
             "preprocessing_instance_count": str(options.preprocessing_instances)},
            {"engine_dir": str(s.checkpoint), **queue}),
        "tensorrt_llm": Fill(
            {"triton_backend": "tensorrtllm", "triton_max_batch_size": batch,
             "decoupled_mode": _flag(options.decoupled), "engine_dir": str(s.checkpoint),
             "max_tokens_in_paged_kv_cache": str(s.max_kv_tokens),
             "kv_cache_free_gpu_mem_fraction": str(s.free_gpu_memory_fraction),
             "batching_strategy": "inflight_fused_batching"},
            {"batch_scheduler_policy": "guaranteed_no_evict", "max_beam_width": "1",
             "exclude_input_in_output": "True", "enable_kv_cache_reuse": "False",
             "encoder_input_features_data_type": "TYPE_FP16", "logits_datatype": "TYPE_FP32",
             "prompt_embedding_table_data_type": "TYPE_FP16", **queue}),
        "postprocessing": Fill(
            {"tokenizer_dir": str(s.tokenizer_dir), "triton_max_batch_size": batch,
             "postprocessing_instance_count": str(options.postprocessing_instances)},
            dict(queue)),
    }


def _names(names: list[str]) -> str:
    return ", ".join(f"${{{n}}}" for n in names)


def fill_template(text: str, fill: Fill, where: str) -> str:
    """`text` with its placeholders replaced; raises EngineAssetError when a required one is missing or
    a placeholder stays where Triton needs a value."""
    present = set(_PLACEHOLDER.findall(text))
    missing = sorted(set(fill.required) - present)
    if missing:
        raise EngineAssetError(f"{where}: the template has no {_names(missing)}: not the "
                               "inflight_batcher_llm templates of a TensorRT-LLM version kvgate knows")
    values = {**{k: v for k, v in fill.optional.items() if k in present}, **fill.required}
    filled = Template(text).safe_substitute(values)
    left = sorted({name for line in filled.splitlines() if not _PARAMETER_PLACEHOLDER.match(line)
                   for name in _PLACEHOLDER.findall(line)})
    if left:
        raise EngineAssetError(f"{where}: no value for {_names(left)}, which Triton needs")
    return filled


def render_repository(templates: Mapping[str, str], s: EngineSettings,
                      options: TritonOptions = TritonOptions()) -> dict[str, str]:
    """The model repository: `templates` maps paths under inflight_batcher_llm ("tensorrt_llm/config.pbtxt",
    "preprocessing/1/model.py", ...) to their text; the four models' files come back, each
    config.pbtxt filled, the rest (the Python models) as they are. Other models of the template folder
    (tensorrt_llm_bls, ...) are left out: clients call the ensemble."""
    _check(s)
    out: dict[str, str] = {}
    for submodel, fill in fills(s, options).items():
        config = f"{submodel}/{CONFIG}"
        if config not in templates:
            raise EngineAssetError(f"model {s.model!r}: the templates have no {config}")
        for path, text in templates.items():
            if path.startswith(f"{submodel}/"):
                out[path] = fill_template(text, fill, f"model {s.model!r}: {config}") if path == config else text
    return out


def _check(s: EngineSettings) -> None:
    if s.backend != "tensorrt":
        raise EngineAssetError(f"model {s.model!r}: Triton's TensorRT-LLM backend runs a trtllm-build engine; "
                               "kv.config_json is an HF config.json, not the engine's")
    if s.served_model != ENSEMBLE:
        raise EngineAssetError(f"model {s.model!r}: NVIDIA's ensemble is named {ENSEMBLE!r}: set "
                               f"backend_model: {ENSEMBLE}")
    if s.tensor_parallel * s.pipeline_parallel > 1:
        # Triton runs such an engine as one MPI rank per GPU (NVIDIA's scripts/launch_triton_server.py
        # --world_size); this renderer starts one process.
        raise EngineAssetError(f"model {s.model!r}: an engine of {s.tensor_parallel * s.pipeline_parallel} "
                               "GPUs needs one tritonserver rank per GPU (launch_triton_server.py), not rendered")


def tritonserver_argv(s: EngineSettings, repository: PurePosixPath) -> list[str]:
    """`tritonserver` as the engine's container runs it, on the catalog endpoint's ports."""
    return ["tritonserver", f"--model-repository={repository}", f"--http-port={s.port}",
            f"--grpc-port={s.grpc_port}", f"--metrics-port={s.metrics_port}",
            # As NVIDIA's launcher: the configs are complete; don't let the Python models rewrite them.
            "--disable-auto-complete-config"]
