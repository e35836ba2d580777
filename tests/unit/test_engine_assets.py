"""engines/engine_settings.py, trtllm_serve.py, triton_repo.py and assets.py: what `kvgate engines
render` gives the GPU engines of a catalog, and that it matches the catalog's KV budget.

No GPU and no NVIDIA image here: Triton's templates are stand-ins written below with the placeholders
NVIDIA's inflight_batcher_llm templates use, in the same places (parameters, data types, batch size).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from engines import assets, trtllm_serve, triton_repo
from engines.engine_settings import (
    EngineAssetError,
    EngineLimits,
    EngineSettings,
    PathMap,
    built_engine,
    engine_settings,
)
from kvgate.catalog import Model, parse_catalog

REPO = Path(__file__).resolve().parents[2]
HF_CONFIG = REPO / "kvgate" / "examples" / "llama-3-8b.config.json"
GIB = 2**30
ROOT = PurePosixPath("/kvgate")


# --- fixtures: a deployment folder as docs/deploy.md lays it out -------------------------------------

def engine_config(*, tokens_per_block: int = 32, tp: int = 1, kv_quant: str | None = None,
                  **build: Any) -> dict[str, Any]:
    """What trtllm-build writes for Llama-3-8B in bf16 (the fields kvgate reads)."""
    return {
        "version": "1.1.0",
        "pretrained_config": {
            "architecture": "LlamaForCausalLM", "dtype": "bfloat16", "vocab_size": 128256,
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_size": 128, "hidden_act": "silu",
            "quantization": {"quant_algo": None, "kv_cache_quant_algo": kv_quant},
            "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        },
        "build_config": {"max_batch_size": 64, "max_num_tokens": 8192, "max_seq_len": 8192,
                         "plugin_config": {"tokens_per_block": tokens_per_block}, **build},
    }


def _parameter(key: str) -> str:
    return f'parameters: {{\n  key: "{key}"\n  value: {{\n    string_value: "${{{key}}}"\n  }}\n}}\n'


def _named_parameter(key: str, placeholder: str) -> str:
    return f'parameters: {{\n  key: "{key}"\n  value: {{\n    string_value: "${{{placeholder}}}"\n  }}\n}}\n'


_QUEUE = ("dynamic_batching {\n  max_queue_delay_microseconds: ${max_queue_delay_microseconds}\n"
          "  default_queue_policy: { max_queue_size: ${max_queue_size} }\n}\n")


def triton_templates() -> dict[str, str]:
    """Stand-ins for NVIDIA's inflight_batcher_llm folder: its placeholders, in the same positions."""
    return {
        "ensemble/config.pbtxt": (
            'name: "ensemble"\nplatform: "ensemble"\nmax_batch_size: ${triton_max_batch_size}\n'
            'output [ { name: "generation_logits" data_type: ${logits_datatype} dims: [ -1, -1, -1 ] } ]\n'),
        "ensemble/1/.tmp": "",
        "preprocessing/config.pbtxt": (
            'name: "preprocessing"\nbackend: "python"\nmax_batch_size: ${triton_max_batch_size}\n' + _QUEUE
            + _parameter("tokenizer_dir") + _parameter("add_special_tokens")
            + _named_parameter("gpt_model_path", "engine_dir")
            + "instance_group [ { count: ${preprocessing_instance_count} kind: KIND_CPU } ]\n"),
        "preprocessing/1/model.py": "# NVIDIA's tokenizing model\n",
        "tensorrt_llm/config.pbtxt": (
            'name: "tensorrt_llm"\nbackend: "${triton_backend}"\nmax_batch_size: ${triton_max_batch_size}\n'
            "model_transaction_policy {\n  decoupled: ${decoupled_mode}\n}\n" + _QUEUE
            + 'input [ { name: "encoder_input_features" data_type: ${encoder_input_features_data_type} } ]\n'
            + 'output [ { name: "context_logits" data_type: ${logits_datatype} } ]\n'
            + _parameter("max_beam_width") + _named_parameter("gpt_model_type", "batching_strategy")
            + _named_parameter("gpt_model_path", "engine_dir")
            + _named_parameter("encoder_model_path", "encoder_engine_dir")
            + _parameter("max_tokens_in_paged_kv_cache") + _parameter("batch_scheduler_policy")
            + _parameter("kv_cache_free_gpu_mem_fraction") + _parameter("exclude_input_in_output")
            + _parameter("enable_kv_cache_reuse")),
        "tensorrt_llm/1/model.py": "# NVIDIA's Python stand-in of the C++ backend\n",
        "postprocessing/config.pbtxt": (
            'name: "postprocessing"\nbackend: "python"\nmax_batch_size: ${triton_max_batch_size}\n' + _QUEUE
            + _parameter("tokenizer_dir") + _parameter("skip_special_tokens")
            + "instance_group [ { count: ${postprocessing_instance_count} kind: KIND_CPU } ]\n"),
        "postprocessing/1/model.py": "# NVIDIA's detokenizing model\n",
        "tensorrt_llm_bls/config.pbtxt": "name: \"tensorrt_llm_bls\"\n",
    }


def write_files(folder: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)


def gpu_deployment(root: Path) -> Path:
    """A deployment folder for deploy/catalog.gpu.yaml, with stand-ins of the model files docs/deploy.md
    puts there (tokenizer.json only needs to exist for the catalog). Returns the catalog's path."""
    write_files(root / "models" / "llama-3-8b", {
        "hf/config.json": HF_CONFIG.read_text(), "hf/tokenizer.json": "{}",
        "engine/config.json": json.dumps(engine_config())})
    write_files(root / "models" / "triton-templates" / "inflight_batcher_llm", triton_templates())
    return Path(shutil.copy(REPO / "deploy" / "catalog.gpu.yaml", root / "catalog.gpu.yaml"))


def templates_of(root: Path) -> Path:
    return root / "models" / "triton-templates" / "inflight_batcher_llm"


def model_at(root: Path, **fields: Any) -> Model:
    """One Llama-3-8B model whose files live under `root` (written by gpu_deployment)."""
    raw = {"name": "m", "endpoints": ["10.0.0.1:8000"], "max_context_tokens": 8192,
           "kv": {"config_json": "models/llama-3-8b/hf/config.json", "gpu_memory": "80GiB"}, **fields}
    return parse_catalog({"models": [raw]}, base_dir=root).models[0]


def settings(root: Path, model: Model, limits: EngineLimits = EngineLimits()) -> EngineSettings:
    assert model.kv.config_json is not None
    return engine_settings(model, json.loads(model.kv.config_json.read_text()), PathMap(root), limits)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    gpu_deployment(tmp_path)
    return tmp_path


TRITON_FIELDS: dict[str, Any] = {
    "protocol": "triton", "backend_model": "ensemble", "tokenizer": "models/llama-3-8b/hf/tokenizer.json",
    "endpoints": [{"host": "10.0.0.2", "port": 8000, "grpc_port": 8001}],
    "kv": {"config_json": "models/llama-3-8b/engine/config.json", "gpu_memory": "80GiB"}}


# --- engine settings: the KV pool, block size, limits, paths ----------------------------------------

def test_the_engine_pool_is_the_catalog_budget_in_whole_blocks(root: Path) -> None:
    model = model_at(root)
    s = settings(root, model)
    block = model.block_tokens * model.kv_bytes_per_token
    # docs/catalog.md's worked example: 14,524 blocks of 32 tokens of 128 KiB on an 80 GiB GPU.
    assert s.max_kv_tokens == 14_524 * 32 == model.kv_budget_bytes // model.kv_bytes_per_token
    assert s.max_kv_tokens * model.kv_bytes_per_token == model.kv_budget_bytes
    assert model.kv_budget_bytes % block == 0
    assert s.free_gpu_memory_fraction == model.kv.free_memory_fraction == 0.9


def test_a_given_budget_is_rounded_down_to_whole_blocks(root: Path) -> None:
    model = model_at(root, kv={"config_json": "models/llama-3-8b/hf/config.json",
                               "budget_per_endpoint": 20 * GIB + 12345})
    s = settings(root, model)
    assert s.max_kv_tokens == 20 * GIB // (32 * 128 * 1024) * 32  # 5120 blocks of 32 tokens
    assert s.max_kv_tokens * model.kv_bytes_per_token <= model.kv_budget_bytes


def test_catalog_fraction_and_token_cap_reach_the_engine(root: Path) -> None:
    model = model_at(root, kv={"config_json": "models/llama-3-8b/hf/config.json", "gpu_memory": "80GiB",
                               "free_memory_fraction": 0.5, "max_tokens_in_paged_kv_cache": 100_000})
    s = settings(root, model)
    assert s.free_gpu_memory_fraction == 0.5
    assert s.max_kv_tokens == 3125 * 32  # the cap, rounded up to whole blocks as TensorRT-LLM does


def test_hf_checkpoint_runs_on_the_pytorch_backend_with_catalog_limits(root: Path) -> None:
    s = settings(root, model_at(root, max_context_tokens=4096, tokens_per_block=64),
                 EngineLimits(max_batch_size=16, max_num_tokens=4096))
    assert (s.backend, s.checkpoint, s.tokenizer_dir) == ("pytorch", ROOT / "models/llama-3-8b/hf", None)
    assert (s.max_batch_size, s.max_num_tokens, s.max_seq_len, s.tokens_per_block) == (16, 4096, 4096, 64)
    assert (s.tensor_parallel, s.pipeline_parallel, s.kv_cache_dtype) == (1, 1, None)


def test_pytorch_kv_dtype_follows_the_catalog(root: Path) -> None:
    fp8 = model_at(root, kv={"config_json": "models/llama-3-8b/hf/config.json", "gpu_memory": "80GiB",
                             "kv_dtype": "fp8", "tensor_parallel": 2})
    s = settings(root, fp8)
    assert (s.kv_cache_dtype, s.tensor_parallel) == ("fp8", 2)
    int8 = model_at(root, kv={"config_json": "models/llama-3-8b/hf/config.json", "gpu_memory": "80GiB",
                              "kv_dtype": "int8"})
    with pytest.raises(EngineAssetError, match="int8 cannot be asked"):
        settings(root, int8)


def test_tensorrt_engine_keeps_its_build(root: Path) -> None:
    s = settings(root, model_at(root, **TRITON_FIELDS))
    assert (s.backend, s.checkpoint) == ("tensorrt", ROOT / "models/llama-3-8b/engine")
    assert s.tokenizer_dir == ROOT / "models/llama-3-8b/hf"
    assert (s.max_batch_size, s.max_num_tokens, s.max_seq_len, s.tokens_per_block) == (64, 8192, 8192, 32)
    assert (s.port, s.grpc_port, s.metrics_port) == (8000, 8001, 8002)  # Triton's default metrics port


def _engine(root: Path, config: dict[str, Any]) -> None:
    (root / "models/llama-3-8b/engine/config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("config", "fields", "problem"), [
    (engine_config(tokens_per_block=64), {"tokens_per_block": 32}, "tokens_per_block 32 differs"),
    (engine_config(kv_quant="FP8"), {}, "differs from the engine's KV cache dtype fp8"),
    (engine_config(), {"tokenizer": None}, "holds no tokenizer"),
])
def test_a_catalog_the_engine_cannot_be_is_refused(root: Path, config: dict[str, Any], fields: dict[str, Any],
                                                   problem: str) -> None:
    _engine(root, config)
    model = model_at(root, **{**TRITON_FIELDS, "kv": {**TRITON_FIELDS["kv"], "kv_dtype": "bf16"}, **fields})
    with pytest.raises(EngineAssetError, match=problem):
        settings(root, model)


def test_tensor_parallel_override_must_match_the_engine(root: Path) -> None:
    model = model_at(root, **{**TRITON_FIELDS, "kv": {**TRITON_FIELDS["kv"], "tensor_parallel": 2}})
    with pytest.raises(EngineAssetError, match="mapping.tp_size 1"):
        settings(root, model)


def test_engine_config_without_build_limits_is_refused() -> None:
    config = engine_config()
    del config["build_config"]["max_num_tokens"]
    with pytest.raises(EngineAssetError, match="build_config.max_num_tokens"):
        built_engine(config)
    assert built_engine(json.loads(HF_CONFIG.read_text())) is None


@pytest.mark.parametrize(("endpoints", "problem"), [
    (["10.0.0.1:8000", "10.0.0.2:9000"], "different ports"),
    (["sim"], "no engine to render"),
    ([{"host": "10.0.0.1", "port": 8000, "metrics_port": 9000}], "not on metrics_port 9000"),
])
def test_endpoints_an_engine_setup_cannot_serve(root: Path, endpoints: list[Any], problem: str) -> None:
    with pytest.raises(EngineAssetError, match=problem):
        settings(root, model_at(root, endpoints=endpoints))


def test_paths_must_be_inside_the_mounted_folder(root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    paths = PathMap(root / "models")
    assert paths(root / "models" / "a" / "b") == ROOT / "a" / "b"
    with pytest.raises(EngineAssetError, match="outside"):
        paths(tmp_path_factory.mktemp("elsewhere"))


# --- trtllm-serve ------------------------------------------------------------------------------------

def _options(argv: list[str]) -> dict[str, str]:
    return dict(zip(argv[2::2], argv[3::2]))


def test_trtllm_serve_command_line(root: Path) -> None:
    s = settings(root, model_at(root))
    argv = trtllm_serve.argv(s, ROOT / "assets/m/opts.yaml")
    assert argv[:2] == ["trtllm-serve", "/kvgate/models/llama-3-8b/hf"]
    assert _options(argv) == {
        "--backend": "pytorch", "--host": "0.0.0.0", "--port": "8000", "--max_batch_size": "64",
        "--max_num_tokens": "8192", "--max_seq_len": "8192", "--tp_size": "1", "--pp_size": "1",
        "--kv_cache_free_gpu_memory_fraction": "0.9", "--extra_llm_api_options": "/kvgate/assets/m/opts.yaml"}


def test_trtllm_serve_options_bound_the_pool_and_publish_kv_metrics(root: Path) -> None:
    s = settings(root, model_at(root))
    assert trtllm_serve.extra_llm_api_options(s) == {
        "kv_cache_config": {"free_gpu_memory_fraction": 0.9, "max_tokens": s.max_kv_tokens},
        "return_perf_metrics": True, "enable_iter_perf_stats": True}


def test_pytorch_block_size_and_fp8_are_told_to_the_engine(root: Path) -> None:
    s = settings(root, model_at(root, tokens_per_block=64, kv={
        "config_json": "models/llama-3-8b/hf/config.json", "gpu_memory": "80GiB", "kv_dtype": "fp8"}))
    kv = trtllm_serve.extra_llm_api_options(s)["kv_cache_config"]
    assert (kv["tokens_per_block"], kv["dtype"]) == (64, "fp8")


def test_tensorrt_backend_takes_the_tokenizer_and_no_pytorch_only_keys(root: Path) -> None:
    s = settings(root, model_at(root, tokenizer="models/llama-3-8b/hf/tokenizer.json",
                                kv={"config_json": "models/llama-3-8b/engine/config.json", "gpu_memory": "80GiB"}))
    assert _options(trtllm_serve.argv(s, ROOT / "o.yaml"))["--tokenizer"] == "/kvgate/models/llama-3-8b/hf"
    options = trtllm_serve.extra_llm_api_options(s)
    assert "enable_iter_perf_stats" not in options  # TrtLlmArgs rejects it; the backend always collects
    assert set(options["kv_cache_config"]) == {"free_gpu_memory_fraction", "max_tokens"}


# --- Triton model repository -------------------------------------------------------------------------

def test_triton_repository_is_filled_to_match_the_catalog(root: Path) -> None:
    model = model_at(root, **TRITON_FIELDS)
    s = settings(root, model)
    repo = triton_repo.render_repository(triton_templates(), s)
    assert set(repo) == {"ensemble/config.pbtxt", "ensemble/1/.tmp", "preprocessing/config.pbtxt",
                         "preprocessing/1/model.py", "tensorrt_llm/config.pbtxt", "tensorrt_llm/1/model.py",
                         "postprocessing/config.pbtxt", "postprocessing/1/model.py"}  # no tensorrt_llm_bls
    trt = repo["tensorrt_llm/config.pbtxt"]
    for line in ['backend: "tensorrtllm"', "max_batch_size: 64", "decoupled: False",
                 'string_value: "/kvgate/models/llama-3-8b/engine"', 'string_value: "inflight_fused_batching"',
                 f'string_value: "{model.kv_budget_bytes // model.kv_bytes_per_token}"',
                 'string_value: "0.9"', 'string_value: "guaranteed_no_evict"',
                 "data_type: TYPE_FP16", "data_type: TYPE_FP32", "max_queue_size: 0"]:
        assert line in trt
    assert 'string_value: "${encoder_engine_dir}"' in trt  # unset parameters stay for the backend to skip
    for name in ("preprocessing", "postprocessing"):
        assert 'string_value: "/kvgate/models/llama-3-8b/hf"' in repo[f"{name}/config.pbtxt"]
        assert "count: 1" in repo[f"{name}/config.pbtxt"]
    assert repo["preprocessing/1/model.py"] == triton_templates()["preprocessing/1/model.py"]


def test_streaming_makes_the_tensorrt_llm_model_decoupled(root: Path) -> None:
    s = settings(root, model_at(root, **TRITON_FIELDS))
    repo = triton_repo.render_repository(triton_templates(), s, triton_repo.TritonOptions(decoupled=True))
    assert "decoupled: True" in repo["tensorrt_llm/config.pbtxt"]


def test_templates_of_another_version_are_refused(root: Path) -> None:
    s = settings(root, model_at(root, **TRITON_FIELDS))
    templates = triton_templates()
    no_pool = {**templates, "tensorrt_llm/config.pbtxt": templates["tensorrt_llm/config.pbtxt"].replace(
        "max_tokens_in_paged_kv_cache}", "renamed}")}
    with pytest.raises(EngineAssetError, match=r"no \$\{max_tokens_in_paged_kv_cache\}"):
        triton_repo.render_repository(no_pool, s)
    unknown_type = {**templates, "ensemble/config.pbtxt": templates["ensemble/config.pbtxt"]
                    + "input [ { data_type: ${new_datatype} } ]\n"}
    with pytest.raises(EngineAssetError, match=r"no value for \$\{new_datatype\}"):
        triton_repo.render_repository(unknown_type, s)
    with pytest.raises(EngineAssetError, match="no postprocessing/config.pbtxt"):
        triton_repo.render_repository({k: v for k, v in templates.items() if "postprocessing" not in k}, s)


@pytest.mark.parametrize(("fields", "problem"), [
    ({"kv": {"config_json": "models/llama-3-8b/hf/config.json", "gpu_memory": "80GiB"}}, "HF config.json"),
    ({"backend_model": "llama"}, "backend_model: ensemble"),
])
def test_triton_needs_an_engine_named_ensemble(root: Path, fields: dict[str, Any], problem: str) -> None:
    s = settings(root, model_at(root, **{**TRITON_FIELDS, **fields}))
    with pytest.raises(EngineAssetError, match=problem):
        triton_repo.render_repository(triton_templates(), s)


def test_multi_gpu_triton_engines_are_not_rendered(root: Path) -> None:
    _engine(root, engine_config(tp=2))
    s = settings(root, model_at(root, **TRITON_FIELDS))
    with pytest.raises(EngineAssetError, match="one tritonserver rank per GPU"):
        triton_repo.render_repository(triton_templates(), s)


def test_tritonserver_runs_on_the_endpoint_ports(root: Path) -> None:
    s = settings(root, model_at(root, **{**TRITON_FIELDS, "endpoints": [
        {"host": "10.0.0.2", "port": 9000, "grpc_port": 9001, "metrics_port": 9002}]}))
    assert triton_repo.tritonserver_argv(s, ROOT / "assets/m/triton") == [
        "tritonserver", "--model-repository=/kvgate/assets/m/triton", "--http-port=9000", "--grpc-port=9001",
        "--metrics-port=9002", "--disable-auto-complete-config"]


# --- render_assets: the files, as `kvgate engines render` writes them -------------------------------

def test_render_writes_each_engine_its_files(root: Path) -> None:
    catalog = root / "catalog.gpu.yaml"
    out = root / "assets"
    written = assets.render_assets(catalog, out, assets.RenderOptions(triton_templates=templates_of(root)))
    assert sorted(p.relative_to(out).as_posix() for p in written) == [
        "llama-3-8b-triton/serve.sh", *(f"llama-3-8b-triton/triton/{p}" for p in sorted([
            "ensemble/1/.tmp", "ensemble/config.pbtxt", "postprocessing/1/model.py",
            "postprocessing/config.pbtxt", "preprocessing/1/model.py", "preprocessing/config.pbtxt",
            "tensorrt_llm/1/model.py", "tensorrt_llm/config.pbtxt"])),
        "llama-3-8b/extra-llm-api-options.yaml", "llama-3-8b/serve.sh"]
    serve = (out / "llama-3-8b" / "serve.sh").read_text()
    assert serve.startswith("#!/bin/sh\n") and "\nexec trtllm-serve /kvgate/models/llama-3-8b/hf " in serve
    assert "--extra_llm_api_options /kvgate/assets/llama-3-8b/extra-llm-api-options.yaml" in serve
    options = yaml.safe_load((out / "llama-3-8b" / "extra-llm-api-options.yaml").read_text())
    assert options["return_perf_metrics"] is True
    triton = (out / "llama-3-8b-triton" / "serve.sh").read_text()
    assert "exec tritonserver --model-repository=/kvgate/assets/llama-3-8b-triton/triton --http-port=8000" in triton


def test_render_again_replaces_what_the_last_render_wrote(root: Path) -> None:
    catalog, out = root / "catalog.gpu.yaml", root / "assets"
    options = assets.RenderOptions(triton_templates=templates_of(root))
    assets.render_assets(catalog, out, options)
    stale = out / "llama-3-8b" / "old.yaml"
    stale.write_text("left from an earlier render")
    assets.render_assets(catalog, out, options)
    assert not stale.exists()


def test_render_names_every_model_it_cannot_render_and_writes_nothing(root: Path) -> None:
    catalog, out = root / "catalog.gpu.yaml", root / "assets"
    with pytest.raises(EngineAssetError, match="needs --triton-templates"):
        assets.render_assets(catalog, out)
    assert not out.exists()
    with pytest.raises(EngineAssetError, match="outside"):
        assets.render_assets(catalog, root.parent / "elsewhere", assets.RenderOptions(triton_templates=templates_of(root)))


def test_simulated_models_are_skipped() -> None:
    catalog = parse_catalog({"models": [
        {"name": "a", "endpoints": ["sim"], "max_context_tokens": 4096,
         "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "1GiB"}}]})
    assert assets.engine_models(catalog.models) == []


def test_model_folder_names_are_safe() -> None:
    assert assets.model_dir_name("org/llama:3@8b") == "org_llama_3_8b"


def test_main_renders_and_reports_errors(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(root / "catalog.gpu.yaml"), str(root / "assets")]
    assert assets.main(args) == 2
    assert "needs --triton-templates" in capsys.readouterr().err
    assert assets.main([*args, "--triton-templates", str(templates_of(root)), "--triton-streaming"]) == 0
    assert "llama-3-8b/serve.sh" in capsys.readouterr().out
    assert "decoupled: True" in (root / "assets/llama-3-8b-triton/triton/tensorrt_llm/config.pbtxt").read_text()
