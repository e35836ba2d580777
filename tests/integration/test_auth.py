"""Tenants through the real Envoy: API keys checked before the body is read, per-tenant model lists,
and tokens/requests per minute, each refused in the client's own convention (openai SDK, tritonclient
gRPC, plain HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from kvgate.api_keys import key_hash
from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import start_gateway

ALICE, BOB = "kvg-alice-key-0123456789", "kvg-bob-key-9876543210"
QUICK = {"ttft_base_ms": 0, "ttft_per_token_ms": 0, "itl_ms": 0, "batch_slowdown": 0}


def catalog(tmp: Path) -> dict:
    keys_file = tmp / "bob.keys"
    keys_file.write_text(f"# bob's keys, rotated without touching the catalog\n{key_hash(BOB)}\n")
    return {
        "models": [
            {"name": "open-model", "endpoints": ["sim"], "max_context_tokens": 1024, "max_output_tokens": 16,
             "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "16MiB"}, "sim": QUICK},
            {"name": "tri", "protocol": "triton", "backend_model": "ensemble", "endpoints": ["sim"],
             "max_context_tokens": 1024, "max_output_tokens": 16,
             "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "16MiB"}, "sim": QUICK},
            {"name": "alice-only", "backend_model": "open-model", "endpoints": ["sim"], "max_context_tokens": 1024,
             "max_output_tokens": 16, "kv": {"bytes_per_token": 1024, "budget_per_endpoint": "16MiB"}, "sim": QUICK},
        ],
        "tenants": [
            {"name": "alice", "api_key_sha256": [key_hash(ALICE)], "models": ["open-model", "tri", "alice-only"],
             # The readiness probes (one per model, ~29 tokens each) are charged to alice too.
             "tokens_per_minute": 130},
            {"name": "bob", "api_keys_file": str(keys_file), "models": ["open-model"], "requests_per_minute": 2},
        ],
    }


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = Path(tmp_path_factory.mktemp("auth"))
    gw = start_gateway(parse_catalog(catalog(tmp)), tmp, probe_headers={"authorization": f"Bearer {ALICE}"})
    yield gw
    gw.stop()


def client(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)


def test_a_tenants_key_is_served_and_spends_its_tokens(gateway: Gateway) -> None:
    done = client(gateway, ALICE).completions.create(model="open-model", prompt="hi", max_tokens=4)
    assert done.usage.completion_tokens == 4


def test_no_key_or_a_wrong_key_is_401_in_the_openai_shape(gateway: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        client(gateway, "kvg-not-a-key").completions.create(model="open-model", prompt="hi", max_tokens=4)
    assert e.value.code == "invalid_api_key"
    keyless = httpx.post(f"{gateway.url}/v1/completions", json={"model": "open-model", "prompt": "hi"})
    assert keyless.status_code == 401 and keyless.json()["error"]["code"] == "invalid_api_key"


def test_a_model_the_tenant_may_not_call_is_403(gateway: Gateway) -> None:
    with pytest.raises(openai.PermissionDeniedError):
        client(gateway, BOB).completions.create(model="tri", prompt="hi", max_tokens=4)


def test_requests_per_minute_from_a_keys_file(gateway: Gateway) -> None:
    bob = client(gateway, BOB)
    outcomes = []
    for _ in range(3):
        try:
            bob.completions.create(model="open-model", prompt="hi", max_tokens=1)
            outcomes.append(200)
        except openai.RateLimitError as e:
            outcomes.append(429)
            assert e.code == "rate_limit_exceeded" and e.body["type"] == "requests"
            assert 1 <= int(e.response.headers["retry-after"]) <= 60
    assert outcomes == [200, 200, 429]


def test_tokens_per_minute_are_charged_with_what_a_request_may_use(gateway: Gateway) -> None:
    # 130 tokens a minute: a request that may use 16 output tokens + a 120-byte prompt bound is over.
    with pytest.raises(openai.RateLimitError) as e:
        client(gateway, ALICE).completions.create(model="open-model", prompt="p" * 120, max_tokens=16)
    assert e.value.body["type"] == "tokens"


def test_the_models_list_needs_a_key_too(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/v1/models").status_code == 401
    listed = httpx.get(f"{gateway.url}/v1/models", headers={"authorization": f"Bearer {ALICE}"})
    assert listed.status_code == 200 and {m["id"] for m in listed.json()["data"]} == {"open-model", "alice-only"}
    assert httpx.get(f"{gateway.url}/v2/health/ready").status_code == 200  # health stays open


def test_grpc_clients_get_unauthenticated_then_are_served_with_the_key(gateway: Gateway) -> None:
    triton = tgrpc.InferenceServerClient(gateway.url.removeprefix("http://"))
    inputs = [tgrpc.InferInput("text_input", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[b"hello"]], dtype=object))
    with pytest.raises(InferenceServerException) as e:
        triton.infer("tri", inputs)
    assert "UNAUTHENTICATED" in str(e.value.status())
    result = triton.infer("tri", inputs, headers={"authorization": f"Bearer {ALICE}"})
    assert result.as_numpy("text_output") is not None
    triton.close()


def test_each_tenant_lists_and_reads_only_the_models_it_may_call(gateway: Gateway) -> None:
    assert sorted(m.id for m in client(gateway, ALICE).models.list().data) == ["alice-only", "open-model"]
    assert [m.id for m in client(gateway, BOB).models.list().data] == ["open-model"]
    assert client(gateway, ALICE).models.retrieve("alice-only").id == "alice-only"
    with pytest.raises(openai.NotFoundError):
        client(gateway, BOB).models.retrieve("alice-only")
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "kvg-not-a-key").models.list()


def test_triton_metadata_of_another_tenants_model_is_403_over_http(gateway: Gateway) -> None:
    for path in ("/v2/models/tri", "/v2/models/tri/config", "/v2/models/tri/ready"):
        refused = httpx.get(f"{gateway.url}{path}", headers={"authorization": f"Bearer {BOB}"})
        assert refused.status_code == 403 and "error" in refused.json(), path
    assert httpx.get(f"{gateway.url}/v2/models/tri/ready", headers={"authorization": f"Bearer {ALICE}"}).status_code == 200


def test_the_repository_index_lists_the_tenants_triton_models(gateway: Gateway) -> None:
    """Over HTTP (Envoy answers, ext_proc for a tenant) and gRPC (ext_proc's own server answers), by the
    names clients call the models, and only those the tenant may call."""
    def index(key: str) -> tuple[list[str], list[str]]:
        headers = {"authorization": f"Bearer {key}"}
        with thttp.InferenceServerClient(gateway.url.removeprefix("http://")) as h, \
                tgrpc.InferenceServerClient(gateway.url.removeprefix("http://")) as g:
            over_http = [m["name"] for m in h.get_model_repository_index(headers=headers)]
            over_grpc = [m.name for m in g.get_model_repository_index(headers=headers).models]
        return over_http, over_grpc

    assert index(ALICE) == (["tri"], ["tri"])
    assert index(BOB) == ([], [])
    with tgrpc.InferenceServerClient(gateway.url.removeprefix("http://")) as g:
        with pytest.raises(InferenceServerException) as e:
            g.get_model_repository_index()
    assert "UNAUTHENTICATED" in str(e.value.status())
    assert httpx.post(f"{gateway.url}/v2/repository/index").status_code == 401
