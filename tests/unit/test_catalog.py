"""kvgate/catalog.py: the YAML catalog validated into frozen objects, errors naming model and field."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from engines import kv_math
from kvgate.catalog import (
    SIM,
    Address,
    Catalog,
    CatalogError,
    bundled_catalog_path,
    load_catalog,
    parse_catalog,
    parse_size,
)

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
    cat = parse_catalog(catalog_dict(model_dict(endpoints=["engine-a:8000", SIM, "[::1]:9000"])))
    assert cat.models[0].endpoints == [Address(host="engine-a", port=8000), SIM, Address(host="::1", port=9000)]


def test_addresses_returns_real_endpoints() -> None:
    cat = parse_catalog(catalog_dict(model_dict(endpoints=["a:1", "b:2"])))
    assert [str(a) for a in cat.models[0].addresses()] == ["a:1", "b:2"]


def test_addresses_raises_on_unresolved_sim() -> None:
    cat = parse_catalog(catalog_dict(model_dict(endpoints=["a:1", SIM])))
    with pytest.raises(CatalogError) as e:
        cat.models[0].addresses()
    assert "'m1'" in e.value.problems[0] and "sim" in e.value.problems[0]


def test_with_endpoints_replaces_sims_in_order() -> None:
    cat = parse_catalog(catalog_dict(model_dict(endpoints=[SIM, "real:8000", SIM])))
    started = [Address(host="127.0.0.1", port=18001), Address(host="127.0.0.1", port=18002)]
    resolved = cat.with_endpoints({"m1": started})
    assert resolved.models[0].endpoints == [started[0], Address(host="real", port=8000), started[1]]
    assert [str(a) for a in resolved.models[0].addresses()] == ["127.0.0.1:18001", "real:8000", "127.0.0.1:18002"]


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
        model_dict("a", endpoints=["10.0.0.1:8000", "engine-b:9000", "[::1]:9001"],
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
