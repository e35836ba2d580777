"""kvgate/catalog.py: the YAML catalog validated into frozen objects, errors naming model and field."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvgate import kv_math
from ext_proc.server import ExtProcServicer
from kvgate.catalog import (
    MAX_REQUEST_TIMEOUT_S,
    MAX_WAIT_S,
    SIM,
    Address,
    Catalog,
    CatalogError,
    bundled_catalog_path,
    load_catalog,
    parse_catalog,
    parse_size,
)

from xds_server.settings import GatewaySettings

GiB = 2**30

# Llama-3-8B's shape: 32 layers x 8 KV heads x 128 head_dim x bf16 = 128 KiB per token.
LLAMA3_HF = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "hidden_size": 4096, "torch_dtype": "bfloat16"}

# The same model as a TensorRT-LLM engine config: no tensor parallelism, 64 tokens per block.
LLAMA3_TRTLLM = {
    "pretrained_config": {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                          "hidden_size": 4096, "head_size": 128, "dtype": "bfloat16",
                          "mapping": {"tp_size": 1}},
    "build_config": {"max_seq_len": 8192, "plugin_config": {"tokens_per_block": 64}},
}


def model_dict(name: str = "m1", **overrides: Any) -> dict[str, Any]:
    """A valid catalog entry with bytes_per_token given directly."""
    m: dict[str, Any] = {"name": name, "endpoints": ["10.0.0.1:8000"], "max_context_tokens": 4096,
                         "kv": {"bytes_per_token": 1000, "budget_per_endpoint": "1GiB"}}
    m.update(overrides)
    return m


def catalog_dict(*models: dict[str, Any]) -> dict[str, Any]:
    return {"models": list(models) or [model_dict()]}


def problems_of(mutate: Callable[[dict[str, Any]], None]) -> list[str]:
    """The problems parse_catalog reports for model_dict() after `mutate` changed it."""
    m = copy.deepcopy(model_dict())
    mutate(m)
    with pytest.raises(CatalogError) as e:
        parse_catalog(catalog_dict(m))
    return e.value.problems


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def config_json_catalog(config_json: str, **kv: Any) -> dict[str, Any]:
    return catalog_dict(model_dict(kv={"config_json": config_json, "budget_per_endpoint": "20GiB", **kv}))


# --- the bundled catalog ---------------------------------------------------------------------

def test_bundled_catalog_has_openai_and_triton_models_of_128_kib_per_token() -> None:
    cat = load_catalog(bundled_catalog_path())
    assert [(m.name, m.protocol) for m in cat.models] == [
        ("llama-3-8b", "openai"), ("mistral-7b", "openai"), ("llama-3-8b-triton", "triton")]
    assert [m.kv_bytes_per_token for m in cat.models] == [131072] * 3
    assert cat.models[2].engine_model == "ensemble"


def test_bundled_catalog_limits_and_budgets() -> None:
    cat = load_catalog(bundled_catalog_path())
    llama, mistral, triton = cat.models
    assert (llama.max_context_tokens, mistral.max_context_tokens) == (8192, 32768)
    assert (llama.kv.budget_per_endpoint, mistral.kv.budget_per_endpoint) == (20 * GiB, 21 * GiB)
    assert triton.kv.budget_per_endpoint == llama.kv.budget_per_endpoint
    assert llama.block_tokens == mistral.block_tokens == triton.block_tokens == 32
    assert all(m.endpoints == [SIM] for m in cat.models)


def test_catalog_model_lookup_by_name() -> None:
    cat = load_catalog(bundled_catalog_path())
    assert cat.model("mistral-7b") is cat.models[1]
    assert cat.model("gpt-4") is None


# --- parse_size ------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("20GiB", 20 * GiB),
    ("512MB", 512 * 10**6),
    ("512 MB", 512 * 10**6),
    ("1.5KiB", 1536),
    ("2kib", 2048),
    ("1TB", 10**12),
    ("64B", 64),
    ("4096", 4096),
    (21474836480, 21474836480),
])
def test_parse_size_accepts(value: Any, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("2.01KB", 2010),
    ("2.01GB", 2_010_000_000),
    ("9007199254740993", 9007199254740993),
])
def test_parse_size_is_exact(value: str, expected: int) -> None:
    """No float rounding: a decimal size or a long byte count means exactly what it says."""
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["twenty GiB", "20 GiB extra", "", "-5GiB", "20XB", "GiB", True, None])
def test_parse_size_rejects_junk(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


def test_budget_junk_is_a_catalog_error_naming_the_field() -> None:
    (problem,) = problems_of(lambda m: m["kv"].update(budget_per_endpoint="lots"))
    assert "'m1'" in problem and "kv.budget_per_endpoint" in problem


def test_budget_zero_rejected() -> None:
    (problem,) = problems_of(lambda m: m["kv"].update(budget_per_endpoint=0))
    assert "'m1'" in problem and "kv.budget_per_endpoint" in problem


# --- errors name the model and the field -----------------------------------------------------

@pytest.mark.parametrize(("mutate", "field"), [
    (lambda m: m.pop("max_context_tokens"), "max_context_tokens"),
    (lambda m: m.update(endpoints=["no-port-here"]), "endpoints"),
    (lambda m: m.update(endpoints=["10.0.0.1:http"]), "endpoints"),
    (lambda m: m.update(endpoints=["10.0.0.1:70000"]), "endpoints"),
    (lambda m: m.update(endpoints=[]), "endpoints"),
    (lambda m: m["kv"].update(config_json="x.json"), "kv"),
    (lambda m: m["kv"].pop("bytes_per_token"), "kv"),
    (lambda m: m["kv"].update(budget_per_endpoint="1MB"), "kv.budget_per_endpoint"),
    (lambda m: m.update(max_output_tokens=4096), "max_output_tokens"),
    (lambda m: m.update(max_output_tokens=5000), "max_output_tokens"),
    (lambda m: m.update(colour="blue"), "colour"),
    (lambda m: m["kv"].update(colour="blue"), "kv.colour"),
    (lambda m: m.update(protocol="vllm-grpc"), "protocol"),
], ids=["missing-context", "endpoint-no-port", "endpoint-port-not-digits", "endpoint-port-range",
        "no-endpoints", "both-kv-sources", "no-kv-source", "budget-below-one-request",
        "output-equals-context", "output-above-context", "extra-field", "extra-kv-field", "bad-protocol"])
def test_error_names_model_and_field(mutate: Callable[[dict[str, Any]], None], field: str) -> None:
    problems = problems_of(mutate)
    assert len(problems) == 1
    assert "'m1'" in problems[0] and field in problems[0]


def test_both_and_neither_kv_sources_say_exactly_one() -> None:
    both = problems_of(lambda m: m["kv"].update(config_json="x.json"))
    neither = problems_of(lambda m: m["kv"].pop("bytes_per_token"))
    assert "exactly one" in both[0] and "exactly one" in neither[0]


def test_error_names_the_model_by_position_too() -> None:
    bad = model_dict("second", max_output_tokens=9000)
    with pytest.raises(CatalogError) as e:
        parse_catalog(catalog_dict(model_dict("first"), bad))
    assert e.value.problems[0].startswith("model 'second' (models[1])")


def test_every_problem_is_reported() -> None:
    m = model_dict(endpoints=["bad"], colour="blue")
    del m["max_context_tokens"]
    with pytest.raises(CatalogError) as e:
        parse_catalog(catalog_dict(m))
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 3
    assert "endpoints" in text and "colour" in text and "max_context_tokens" in text


def test_error_message_lists_problems() -> None:
    with pytest.raises(CatalogError) as e:
        parse_catalog(catalog_dict(model_dict(colour="blue")))
    assert str(e.value).startswith("invalid catalog:")
    assert e.value.problems[0] in str(e.value)


def test_budget_of_exactly_one_full_context_request_is_enough() -> None:
    one_request = kv_math.reservation_bytes(4096, 32, 1000)
    ok = parse_catalog(catalog_dict(model_dict(kv={"bytes_per_token": 1000, "budget_per_endpoint": one_request})))
    assert ok.models[0].kv.budget_per_endpoint == one_request
    with pytest.raises(CatalogError):
        parse_catalog(catalog_dict(model_dict(kv={"bytes_per_token": 1000, "budget_per_endpoint": one_request - 1})))


def test_duplicate_names_rejected_naming_the_name() -> None:
    with pytest.raises(CatalogError) as e:
        parse_catalog(catalog_dict(model_dict("twin"), model_dict("other"), model_dict("twin")))
    (problem,) = e.value.problems
    assert "twin" in problem and "unique" in problem and "other" not in problem


@pytest.mark.parametrize("raw", [None, "models", [], {"models": []}, {}])
def test_not_a_catalog(raw: Any) -> None:
    with pytest.raises(CatalogError):
        parse_catalog(raw)


def test_invalid_model_name_rejected() -> None:
    (problem,) = problems_of(lambda m: m.update(name="has space"))
    assert "name" in problem


def test_load_catalog_reports_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text("models: [\n")
    with pytest.raises(CatalogError) as e:
        load_catalog(path)
    assert str(path) in e.value.problems[0]


def test_load_catalog_reports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError):
        load_catalog(tmp_path / "nope.yaml")


# --- endpoints -------------------------------------------------------------------------------

def test_endpoints_parse_host_port_and_sim() -> None:
    cat = parse_catalog(catalog_dict(model_dict(endpoints=["10.0.0.7:8000", SIM, "[::1]:9000"])))
    assert cat.models[0].endpoints == [Address(host="10.0.0.7", port=8000), SIM, Address(host="::1", port=9000)]


def test_addresses_returns_real_endpoints() -> None:
    cat = parse_catalog(catalog_dict(model_dict(endpoints=["10.0.0.1:1", "10.0.0.2:2"])))
    assert [str(a) for a in cat.models[0].addresses()] == ["10.0.0.1:1", "10.0.0.2:2"]


def test_addresses_raises_on_unresolved_sim() -> None:
    cat = parse_catalog(catalog_dict(model_dict(endpoints=["10.0.0.1:1", SIM])))
    with pytest.raises(CatalogError) as e:
        cat.models[0].addresses()
    assert "'m1'" in e.value.problems[0] and "sim" in e.value.problems[0]


def test_with_endpoints_replaces_sims_in_order() -> None:
    cat = parse_catalog(catalog_dict(model_dict(endpoints=[SIM, "10.0.0.8:8000", SIM])))
    started = [Address(host="127.0.0.1", port=18001), Address(host="127.0.0.1", port=18002)]
    resolved = cat.with_endpoints({"m1": started})
    assert resolved.models[0].endpoints == [started[0], Address(host="10.0.0.8", port=8000), started[1]]
    assert [str(a) for a in resolved.models[0].addresses()] == ["127.0.0.1:18001", "10.0.0.8:8000", "127.0.0.1:18002"]


def test_with_endpoints_leaves_the_original_unchanged() -> None:
    cat = parse_catalog(catalog_dict(model_dict(endpoints=[SIM])))
    cat.with_endpoints({"m1": [Address(host="h", port=1)]})
    assert cat.models[0].endpoints == [SIM]


def test_with_endpoints_leaves_models_not_named_alone() -> None:
    """Docstring: 'each named model's sim endpoints replaced'; the others keep theirs."""
    cat = parse_catalog(catalog_dict(model_dict("a", endpoints=[SIM]), model_dict("b", endpoints=[SIM])))
    resolved = cat.with_endpoints({"a": [Address(host="h", port=1)]})
    assert resolved.models[0].endpoints == [Address(host="h", port=1)]
    assert resolved.models[1].endpoints == [SIM]


# --- config_json -----------------------------------------------------------------------------

def test_config_json_resolved_relative_to_the_catalog_file(tmp_path: Path) -> None:
    write_json(tmp_path / "shapes" / "llama.json", LLAMA3_HF)
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(config_json_catalog("shapes/llama.json")))
    cat = load_catalog(catalog)
    assert cat.models[0].kv.config_json == tmp_path / "shapes" / "llama.json"
    assert cat.models[0].kv_bytes_per_token == 131072


def test_config_json_resolved_against_base_dir(tmp_path: Path) -> None:
    write_json(tmp_path / "llama.json", LLAMA3_HF)
    cat = parse_catalog(config_json_catalog("llama.json"), base_dir=tmp_path)
    assert cat.models[0].kv_bytes_per_token == 131072


def test_config_json_absolute_path_kept(tmp_path: Path) -> None:
    path = write_json(tmp_path / "llama.json", LLAMA3_HF)
    cat = parse_catalog(config_json_catalog(str(path)), base_dir=tmp_path / "elsewhere")
    assert cat.models[0].kv.config_json == path


def test_config_json_missing_file_names_model_and_kv(tmp_path: Path) -> None:
    with pytest.raises(CatalogError) as e:
        parse_catalog(config_json_catalog("missing.json"), base_dir=tmp_path)
    (problem,) = e.value.problems
    assert "'m1'" in problem and "kv" in problem and "missing.json" in problem


def test_config_json_lacking_a_field_is_a_catalog_error(tmp_path: Path) -> None:
    write_json(tmp_path / "bad.json", {k: v for k, v in LLAMA3_HF.items() if k != "num_hidden_layers"})
    with pytest.raises(CatalogError) as e:
        parse_catalog(config_json_catalog("bad.json"), base_dir=tmp_path)
    assert "num_hidden_layers" in e.value.problems[0]


def test_config_json_not_json_is_a_catalog_error(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CatalogError):
        parse_catalog(config_json_catalog("bad.json"), base_dir=tmp_path)


def test_unknown_kv_dtype_is_a_catalog_error(tmp_path: Path) -> None:
    write_json(tmp_path / "llama.json", LLAMA3_HF)
    with pytest.raises(CatalogError) as e:
        parse_catalog(config_json_catalog("llama.json", kv_dtype="fp3"), base_dir=tmp_path)
    assert "'m1'" in e.value.problems[0] and "fp3" in e.value.problems[0]


@pytest.mark.parametrize(("overrides", "bytes_per_token"), [
    ({}, 131072),
    ({"kv_dtype": "fp8"}, 65536),
    ({"tensor_parallel": 2}, 65536),
    ({"kv_dtype": "fp8", "tensor_parallel": 4}, 16384),
    ({"kv_dtype": "float32"}, 262144),
])
def test_kv_dtype_and_tensor_parallel_override_the_config(tmp_path: Path, overrides: dict[str, Any],
                                                          bytes_per_token: int) -> None:
    write_json(tmp_path / "llama.json", LLAMA3_HF)
    cat = parse_catalog(config_json_catalog("llama.json", **overrides), base_dir=tmp_path)
    assert cat.models[0].kv_bytes_per_token == bytes_per_token


def test_trtllm_engine_config_gives_tokens_per_block(tmp_path: Path) -> None:
    write_json(tmp_path / "engine.json", LLAMA3_TRTLLM)
    cat = parse_catalog(config_json_catalog("engine.json"), base_dir=tmp_path)
    assert cat.models[0].block_tokens == 64
    assert cat.models[0].kv_bytes_per_token == 131072


def test_catalog_tokens_per_block_beats_the_engine_config(tmp_path: Path) -> None:
    write_json(tmp_path / "engine.json", LLAMA3_TRTLLM)
    raw = config_json_catalog("engine.json")
    raw["models"][0]["tokens_per_block"] = 16
    assert parse_catalog(raw, base_dir=tmp_path).models[0].block_tokens == 16


def test_tokens_per_block_defaults_to_32() -> None:
    assert parse_catalog(catalog_dict()).models[0].block_tokens == 32


# --- to_yaml ---------------------------------------------------------------------------------

def round_trip(cat: Catalog) -> Catalog:
    return parse_catalog(yaml.safe_load(cat.to_yaml()))


def test_to_yaml_round_trips() -> None:
    cat = parse_catalog(catalog_dict(
        model_dict("a", endpoints=["10.0.0.1:8000", "10.0.0.2:9000", "[::1]:9001"],
                   max_output_tokens=512, tokens_per_block=64,
                   prompt_estimate={"bytes_per_token": 2.5, "per_message_tokens": 4},
                   sim={"itl_ms": 3.0, "on_full": "fail"}),
        model_dict("b", endpoints=[SIM])))
    assert round_trip(cat) == cat


def test_to_yaml_writes_endpoints_as_strings() -> None:
    cat = parse_catalog(catalog_dict(model_dict(endpoints=["10.0.0.1:8000", SIM])))
    assert yaml.safe_load(cat.to_yaml())["models"][0]["endpoints"] == ["10.0.0.1:8000", SIM]


def test_to_yaml_round_trips_resolved_sims() -> None:
    cat = parse_catalog(catalog_dict(model_dict(endpoints=[SIM])))
    resolved = cat.with_endpoints({"m1": [Address(host="127.0.0.1", port=18001)]})
    again = round_trip(resolved)
    assert again == resolved
    assert [str(a) for a in again.models[0].addresses()] == ["127.0.0.1:18001"]


def test_to_yaml_round_trips_config_json(tmp_path: Path) -> None:
    write_json(tmp_path / "llama.json", LLAMA3_HF)
    cat = parse_catalog(config_json_catalog("llama.json", kv_dtype="fp8"), base_dir=tmp_path)
    again = round_trip(cat)
    assert again.models[0].kv_bytes_per_token == 65536


def test_to_yaml_written_elsewhere_still_finds_config_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kvgate up` writes to_yaml() into its run dir and xds_server load_catalog()s it from there;
    a catalog loaded by a relative path must still point at its config.json from the new place."""
    write_json(tmp_path / "src" / "llama.json", LLAMA3_HF)
    (tmp_path / "src" / "catalog.yaml").write_text(yaml.safe_dump(config_json_catalog("llama.json")))
    monkeypatch.chdir(tmp_path)
    cat = load_catalog(Path("src") / "catalog.yaml")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "catalog.yaml").write_text(cat.to_yaml())
    assert load_catalog(run_dir / "catalog.yaml").models[0].kv_bytes_per_token == 131072


# --- a KV budget derived from the GPU --------------------------------------------------------

# LLAMA3_HF with the fields the weight estimate reads, as in Meta-Llama-3-8B's config.json.
LLAMA3_HF_FULL = {**LLAMA3_HF, "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
                  "intermediate_size": 14336, "tie_word_embeddings": False}
LLAMA3_WEIGHTS = 16_060_522_496  # 8,030,261,248 parameters x 2 bytes
BLOCK = 131072 * 32  # bytes of one 32-token block of Llama-3-8B in bf16


def gpu_model(tmp_path: Path, config: dict[str, Any] | None = None, **kv: Any) -> Any:
    """The model of a one-model catalog whose budget comes from an 80 GiB GPU."""
    write_json(tmp_path / "llama.json", config or LLAMA3_HF_FULL)
    raw = catalog_dict(model_dict(kv={"config_json": "llama.json", "gpu_memory": "80GiB", **kv}))
    return parse_catalog(raw, base_dir=tmp_path).models[0]


def gpu_problems(tmp_path: Path, config: dict[str, Any] | None = None, **kv: Any) -> list[str]:
    with pytest.raises(CatalogError) as e:
        gpu_model(tmp_path, config, **kv)
    return e.value.problems


def test_gpu_budget_of_llama_3_8b_on_80_gib(tmp_path: Path) -> None:
    m = gpu_model(tmp_path)
    assert m.kv.weight_bytes == LLAMA3_WEIGHTS
    expected = int(0.9 * (80 * GiB - LLAMA3_WEIGHTS - 2 * GiB)) // BLOCK * BLOCK
    assert m.kv_budget_bytes == expected == 60_918_071_296
    assert m.kv.budget_per_endpoint is None


def test_bundled_gpu_budget_example_yields_the_documented_number() -> None:
    """docs/catalog.md quotes this number; kvgate/examples/gpu-budget.yaml is its catalog."""
    (m,) = load_catalog(bundled_catalog_path().parent / "gpu-budget.yaml").models
    assert (m.kv.gpu_memory, m.kv.weight_bytes, m.kv_budget_bytes) == (80 * GiB, LLAMA3_WEIGHTS, 60_918_071_296)
    assert m.kv_budget_bytes // m.kv_bytes_per_token == 464_768  # tokens


def test_given_budget_is_the_kv_budget() -> None:
    assert parse_catalog(catalog_dict()).models[0].kv_budget_bytes == GiB


@pytest.mark.parametrize(("kv", "budget"), [
    ({"weights": "20GiB"}, int(0.9 * (60 * GiB - 2 * GiB)) // BLOCK * BLOCK),
    ({"free_memory_fraction": 0.5}, int(0.5 * (80 * GiB - LLAMA3_WEIGHTS - 2 * GiB)) // BLOCK * BLOCK),
    ({"free_memory_fraction": 1}, (80 * GiB - LLAMA3_WEIGHTS - 2 * GiB) // BLOCK * BLOCK),
    ({"reserved": 0}, int(0.9 * (80 * GiB - LLAMA3_WEIGHTS)) // BLOCK * BLOCK),
    ({"reserved": "6GiB"}, int(0.9 * (80 * GiB - LLAMA3_WEIGHTS - 6 * GiB)) // BLOCK * BLOCK),
    ({"max_tokens_in_paged_kv_cache": 100_000}, 3125 * BLOCK),   # 100,000 tokens = 3,125 blocks
    ({"max_tokens_in_paged_kv_cache": 100_001}, 3126 * BLOCK),   # rounded up to whole blocks
    ({"max_tokens_in_paged_kv_cache": 10**7}, 60_918_071_296),   # the fraction is the smaller
], ids=["weights", "fraction", "fraction-1", "reserved-0", "reserved", "max-tokens", "max-tokens-up",
        "max-tokens-above"])
def test_gpu_budget_knobs(tmp_path: Path, kv: dict[str, Any], budget: int) -> None:
    assert gpu_model(tmp_path, **kv).kv_budget_bytes == budget


def test_gpu_budget_with_bytes_per_token_needs_weights() -> None:
    raw = catalog_dict(model_dict(kv={"bytes_per_token": 131072, "gpu_memory": "80GiB"}))
    with pytest.raises(CatalogError) as e:
        parse_catalog(raw)
    (problem,) = e.value.problems
    assert "'m1'" in problem and "kv" in problem and "weights" in problem and "config_json" in problem
    raw["models"][0]["kv"]["weights"] = "16GB"
    assert parse_catalog(raw).models[0].kv_budget_bytes == int(0.9 * (80 * GiB - 16 * 10**9 - 2 * GiB)) // BLOCK * BLOCK


def test_gpu_budget_tensor_parallel_halves_weights_and_kv(tmp_path: Path) -> None:
    m = gpu_model(tmp_path, tensor_parallel=2)
    assert m.kv_bytes_per_token == 65536
    # Attention and MLP split; the embedding table stays whole on each GPU (TensorRT-LLM's default).
    assert LLAMA3_WEIGHTS // 2 < m.kv.weight_bytes < LLAMA3_WEIGHTS // 2 + 128256 * 4096 * 2
    assert m.kv_budget_bytes == int(0.9 * (80 * GiB - m.kv.weight_bytes - 2 * GiB)) // (BLOCK // 2) * (BLOCK // 2)


def test_fp8_kv_leaves_the_weights_at_bf16(tmp_path: Path) -> None:
    m = gpu_model(tmp_path, kv_dtype="fp8")
    assert m.kv.weight_bytes == LLAMA3_WEIGHTS
    assert m.kv_bytes_per_token == 65536
    # The same bytes (to the half-size block) hold twice the tokens.
    assert m.kv_budget_bytes == int(0.9 * (80 * GiB - LLAMA3_WEIGHTS - 2 * GiB)) // (BLOCK // 2) * (BLOCK // 2)
    assert m.kv_budget_bytes // m.kv_bytes_per_token == 2 * 464_768 + 32


def test_gpu_budget_from_a_trtllm_engine_config(tmp_path: Path) -> None:
    engine = copy.deepcopy(LLAMA3_TRTLLM)
    engine["pretrained_config"].update(vocab_size=128256, intermediate_size=14336, architecture="LlamaForCausalLM",
                                       quantization={"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"})
    m = gpu_model(tmp_path, engine)
    assert m.block_tokens == 64 and m.kv_bytes_per_token == 65536
    linear = 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336)  # FP8: 1 byte each
    assert m.kv.weight_bytes == linear + 2 * (8_030_261_248 - linear)
    assert m.kv_budget_bytes == int(0.9 * (80 * GiB - m.kv.weight_bytes - 2 * GiB)) // (65536 * 64) * (65536 * 64)


@pytest.mark.parametrize(("kv", "field"), [
    ({"budget_per_endpoint": "20GiB"}, "exactly one of budget_per_endpoint and gpu_memory"),
    ({"gpu_memory": None}, "exactly one of budget_per_endpoint and gpu_memory"),
    ({"gpu_memory": "lots"}, "kv.gpu_memory"),
    ({"gpu_memory": 0}, "kv.gpu_memory"),
    ({"weights": 0}, "kv.weights"),
    ({"free_memory_fraction": 0}, "kv.free_memory_fraction"),
    ({"free_memory_fraction": 1.5}, "kv.free_memory_fraction"),
    ({"reserved": -1}, "kv.reserved"),
    ({"reserved": "lots"}, "kv.reserved"),
    ({"max_tokens_in_paged_kv_cache": 0}, "kv.max_tokens_in_paged_kv_cache"),
], ids=["both-budgets", "no-budget", "gpu-junk", "gpu-zero", "weights-zero", "fraction-zero", "fraction-above-1",
        "reserved-negative", "reserved-junk", "max-tokens-zero"])
def test_gpu_budget_errors_name_model_and_field(tmp_path: Path, kv: dict[str, Any], field: str) -> None:
    (problem,) = gpu_problems(tmp_path, **kv)
    assert "'m1'" in problem and field in problem


@pytest.mark.parametrize("knob", [{"weights": "16GiB"}, {"free_memory_fraction": 0.8}, {"reserved": "1GiB"},
                                  {"max_tokens_in_paged_kv_cache": 1000}])
def test_gpu_knobs_without_gpu_memory_are_errors(knob: dict[str, Any]) -> None:
    """A knob that would silently do nothing with budget_per_endpoint is refused."""
    (name,) = knob
    (problem,) = problems_of(lambda m: m["kv"].update(knob))
    assert "'m1'" in problem and name in problem and "gpu_memory" in problem


def test_config_json_without_weight_fields_names_them_and_weights(tmp_path: Path) -> None:
    (problem,) = gpu_problems(tmp_path, LLAMA3_HF)  # no vocab_size, no intermediate_size
    assert "'m1'" in problem and "kv" in problem and "vocab_size" in problem and "give weights" in problem
    assert gpu_model(tmp_path, LLAMA3_HF, weights="16GiB").kv.weight_bytes == 16 * GiB


def test_mixture_of_experts_config_needs_weights(tmp_path: Path) -> None:
    mixtral = {**LLAMA3_HF_FULL, "architectures": ["MixtralForCausalLM"], "num_local_experts": 8}
    (problem,) = gpu_problems(tmp_path, mixtral)
    assert "mixture-of-experts" in problem and "give weights" in problem
    assert gpu_model(tmp_path, mixtral, weights="87GiB", **{"gpu_memory": "2TiB"}).kv_budget_bytes > 0


def test_derived_budget_below_one_request_is_refused_with_its_derivation(tmp_path: Path) -> None:
    # 4096 tokens x 128 KiB = 512 MiB per request; 0.9 x (16.5 GiB - weights - 1 GiB) is 124 blocks of 4 MiB.
    (problem,) = gpu_problems(tmp_path, gpu_memory="16.5GiB", reserved="1GiB")
    assert "'m1'" in problem and "(520093696 B = 0.9 x (gpu_memory 17716740096" in problem
    assert "weights 16060522496 - reserved 1073741824" in problem
    assert "less than one max_context_tokens request (536870912 B)" in problem


def test_weights_larger_than_the_gpu_are_refused(tmp_path: Path) -> None:
    (problem,) = gpu_problems(tmp_path, gpu_memory="16GB")
    assert "'m1'" in problem and "(0 B" in problem and "max_context_tokens request" in problem


def test_max_tokens_cap_below_one_request_is_refused(tmp_path: Path) -> None:
    (problem,) = gpu_problems(tmp_path, max_tokens_in_paged_kv_cache=4000)
    assert "max_tokens_in_paged_kv_cache 4000" in problem and "max_context_tokens request" in problem


def test_max_context_beyond_the_engines_max_seq_len_is_refused(tmp_path: Path) -> None:
    write_json(tmp_path / "engine.json", LLAMA3_TRTLLM)  # max_seq_len 8192
    raw = config_json_catalog("engine.json")
    raw["models"][0]["max_context_tokens"] = 8193
    with pytest.raises(CatalogError) as e:
        parse_catalog(raw, base_dir=tmp_path)
    (problem,) = e.value.problems
    assert "'m1'" in problem and "max_context_tokens (8193)" in problem and "max_seq_len (8192)" in problem
    raw["models"][0]["max_context_tokens"] = 8192
    assert parse_catalog(raw, base_dir=tmp_path).models[0].max_context_tokens == 8192


def test_to_yaml_round_trips_gpu_budget(tmp_path: Path) -> None:
    m = gpu_model(tmp_path, free_memory_fraction=0.85, reserved=0, max_tokens_in_paged_kv_cache=200_000)
    cat = Catalog(models=[m])
    again = round_trip(cat)
    assert again == cat
    assert again.models[0].kv_budget_bytes == m.kv_budget_bytes
    assert parse_catalog(cat.to_data()) == cat


def test_to_yaml_round_trips_default_gpu_knobs(tmp_path: Path) -> None:
    m = gpu_model(tmp_path)
    data = Catalog(models=[m]).to_data()
    assert set(data["models"][0]["kv"]) == {"config_json", "gpu_memory"}
    assert parse_catalog(data).models[0].kv_budget_bytes == 60_918_071_296


# --- admission settings: priority classes, engine metrics, long requests, tokenizer -------------

def test_default_priority_classes_and_the_model_default() -> None:
    cat = parse_catalog(catalog_dict(model_dict(), model_dict("m2", priority_class="batch")))
    assert [(c.name, c.max_wait_s) for c in cat.priority_classes] == [("interactive", 5.0), ("batch", 30.0)]
    assert [cat.priority_class_of(m) for m in cat.models] == ["interactive", "batch"]


@pytest.mark.parametrize(("data", "needle"), [
    ({"priority_classes": [{"name": "a", "max_wait_s": 1}, {"name": "a", "max_wait_s": 2}]}, "unique"),
    ({"default_priority_class": "gold"}, "'gold' is not a priority class"),
    ({"priority_classes": [{"name": "a", "max_wait_s": 56}]}, "max_wait_s"),
    ({"priority_classes": []}, "priority_classes"),
])
def test_bad_priority_classes_are_refused(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(CatalogError) as e:
        parse_catalog({**catalog_dict(), **data})
    assert needle in str(e.value)


def test_a_model_naming_an_unknown_class_is_refused_naming_it() -> None:
    with pytest.raises(CatalogError) as e:
        parse_catalog(catalog_dict(model_dict(priority_class="vip")))
    assert "model 'm1': priority_class 'vip'" in str(e.value)


def test_engine_metrics_staleness_must_exceed_the_interval() -> None:
    problems = problems_of(lambda m: m.update(engine_metrics={"interval_s": 2, "stale_after_s": 2}))
    assert any("stale_after_s" in p for p in problems)


def test_long_requests_shares_are_fractions() -> None:
    assert any("long_requests.max_share" in p for p in problems_of(lambda m: m.update(long_requests={"max_share": 1.5})))


def test_timeouts_default_to_minutes_for_a_response_and_two_for_silence() -> None:
    m = parse_catalog(catalog_dict(model_dict())).models[0]
    assert (m.timeouts.request_s, m.timeouts.idle_s) == (600.0, 120.0)
    m = parse_catalog(catalog_dict(model_dict(timeouts={"request_s": 30, "idle_s": 5}))).models[0]
    assert (m.timeouts.request_s, m.timeouts.idle_s) == (30.0, 5.0)


@pytest.mark.parametrize("timeouts, field", [
    ({"request_s": MAX_REQUEST_TIMEOUT_S + 1}, "timeouts.request_s"),
    ({"idle_s": 0}, "timeouts.idle_s"),
    ({"request": 5}, "timeouts.request"),
])
def test_bad_timeouts_are_refused_naming_the_field(timeouts: dict[str, Any], field: str) -> None:
    assert any(field in p for p in problems_of(lambda m: m.update(timeouts=timeouts)))


def test_the_longest_request_ends_before_ext_procs_reservation_ttl() -> None:
    """ext_proc's TTL sweep must never release a reservation a request still holds: the longest wait
    for budget plus the longest request timeout (and Envoy's wait for ext_proc's answer) stay below it."""
    ttl = ExtProcServicer.__dataclass_fields__["reservation_ttl_s"].default
    assert MAX_WAIT_S + GatewaySettings().ext_proc_message_timeout_s + MAX_REQUEST_TIMEOUT_S < ttl


def test_tokenizer_path_is_relative_to_the_catalog_and_hashed(tmp_path: Path) -> None:
    (tmp_path / "tok.json").write_text('{"model": {}}')
    cat = parse_catalog(catalog_dict(model_dict(tokenizer="tok.json")), base_dir=tmp_path)
    (m,) = cat.models
    assert m.tokenizer == (tmp_path / "tok.json").resolve()
    assert m.tokenizer_sha256 == hashlib.sha256(b'{"model": {}}').hexdigest()
    assert any("tokenizer" in p and "not a file" in p for p in problems_of(lambda m: m.update(tokenizer="/no/such.json")))


def test_admission_settings_round_trip() -> None:
    cat = parse_catalog({**catalog_dict(model_dict(priority_class="batch", long_requests={"max_share": 0.7},
                                                   engine_metrics={"scrape": False})),
                         "priority_classes": [{"name": "interactive", "max_wait_s": 1}, {"name": "batch", "max_wait_s": 9}]})
    assert parse_catalog(cat.to_data()) == cat


# --- tenants -------------------------------------------------------------------------------------

H1, H2 = "a" * 64, "b" * 64


def tenants_catalog(*tenants: dict[str, Any]) -> dict[str, Any]:
    return {**catalog_dict(), "tenants": list(tenants)}


def test_tenant_keys_from_the_catalog_and_a_keys_file(tmp_path: Path) -> None:
    (tmp_path / "keys.txt").write_text(f"# rotated weekly\n{H2}  # laptop\n\nsha256:{'c' * 64}\n")
    cat = parse_catalog(tenants_catalog({"name": "t", "api_key_sha256": [f"sha256:{H1.upper()}"],
                                         "api_keys_file": "keys.txt"}), base_dir=tmp_path)
    (t,) = cat.tenants
    assert t.key_hashes == {H1, H2, "c" * 64} and t.models == ("*",)
    assert parse_catalog(cat.to_data()) == cat


@pytest.mark.parametrize(("tenant", "needle"), [
    ({"name": "t"}, "at least one key"),
    ({"name": "t", "api_key_sha256": ["kvg-plain-key"]}, "not a sha256"),
    ({"name": "t", "api_key_sha256": [H1], "models": ["nope"]}, "models nope not in the catalog"),
    ({"name": "t", "api_key_sha256": [H1], "priority_class": "gold"}, "'gold' is not a priority class"),
    ({"name": "t", "api_key_sha256": [H1], "tokens_per_minute": 0}, "tokens_per_minute"),
])
def test_bad_tenants_are_refused_saying_why(tenant: dict[str, Any], needle: str) -> None:
    with pytest.raises(CatalogError) as e:
        parse_catalog(tenants_catalog(tenant))
    assert needle in str(e.value)


def test_two_tenants_may_not_share_a_key() -> None:
    with pytest.raises(CatalogError, match="share an API key"):
        parse_catalog(tenants_catalog({"name": "a", "api_key_sha256": [H1]}, {"name": "b", "api_key_sha256": [H1]}))


def test_keys_new_prints_a_key_and_its_digest() -> None:
    from typer.testing import CliRunner

    from kvgate.api_keys import key_hash
    from kvgate.cli.app import app

    out = CliRunner().invoke(app, ["keys", "new"]).output
    key = out.split("key:")[1].split()[0]
    digest = out.split("sha256:")[1].split()[0]
    assert key.startswith("kvg-") and len(key) > 40 and key_hash(key) == digest


def test_engine_hosts_must_be_ip_addresses() -> None:
    """Envoy's EDS does not resolve names; one named endpoint would empty every model's cluster."""
    problems = problems_of(lambda m: m.update(endpoints=["10.0.0.1:8000", "engine-b:9000"]))
    assert any("'engine-b' is not an IP address" in p for p in problems)
