"""Catalog changes through the admin API and the catalog file reach the real Envoy and ext_proc while
the gateway serves; refused changes touch nothing; `kvgate status` shows the fleet."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
import yaml

from kvgate.cli import admin_client
from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import ALPHA, alias_of_alpha, envoy_stat, start_gateway, wait_for



@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(parse_catalog({"models": [ALPHA]}), tmp_path_factory.mktemp("live"))
    yield gw
    gw.stop()


@pytest.fixture
def pristine(gateway: Gateway) -> Iterator[str]:
    """The served catalog as the test found it, restored afterwards."""
    before = admin_client.list_models(gateway.admin_address).catalog_yaml
    yield before
    admin_client.apply_models(gateway.admin_address, before)
    for m in yaml.safe_load(admin_client.list_models(gateway.admin_address).catalog_yaml)["models"]:
        if m["name"] not in {x["name"] for x in yaml.safe_load(before)["models"]}:
            admin_client.remove_model(gateway.admin_address, m["name"])


def complete(gw: Gateway, model: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1000})




@contextmanager
def loaded(gw: Gateway, model: str, expected: Callable[[httpx.Response], bool]
           ) -> Iterator[tuple[list[int], list[str]]]:
    """Four clients sending `model` one request after another until the block ends: (every status
    seen, the answers `expected` did not accept)."""
    seen: list[int] = []
    unexpected: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                answer = http.post(f"{gw.url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1})
                seen.append(answer.status_code)
                if not expected(answer):
                    unexpected.append(f"{answer.status_code} {answer.text}")

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        yield seen, unexpected
    finally:
        stop.set()
        for w in workers:
            w.join()


def test_a_model_added_through_the_api_is_served_then_removed(gateway: Gateway, pristine: str) -> None:
    beta = alias_of_alpha(gateway, "beta")
    resp = admin_client.apply_models(gateway.admin_address, yaml.safe_dump([beta]))
    assert resp.changed
    wait_for(lambda: complete(gateway, "beta").status_code == 200, "beta served through Envoy and ext_proc")
    listed = httpx.get(f"{gateway.url}/v1/models").json()["data"]
    assert {m["id"] for m in listed} == {"alpha", "beta"}

    admin_client.remove_model(gateway.admin_address, "beta")
    wait_for(lambda: complete(gateway, "beta").status_code == 404, "beta gone")
    assert complete(gateway, "alpha").status_code == 200


def test_a_new_limit_is_the_new_clamp(gateway: Gateway, pristine: str) -> None:
    changed = yaml.safe_load(pristine)["models"][0] | {"max_output_tokens": 8}
    admin_client.apply_models(gateway.admin_address, yaml.safe_dump([changed]))
    wait_for(lambda: complete(gateway, "alpha").headers.get("x-kvgate-max-tokens") == "8", "the new clamp")
    assert complete(gateway, "alpha").json()["usage"]["completion_tokens"] == 8


def test_an_invalid_change_is_refused_and_nothing_changes(gateway: Gateway, pristine: str) -> None:
    version = admin_client.list_models(gateway.admin_address).version
    broken = yaml.safe_load(pristine)["models"][0] | {"kv": {"bytes_per_token": 4096, "budget_per_endpoint": "1KiB"}}
    with pytest.raises(admin_client.AdminError) as e:
        admin_client.apply_models(gateway.admin_address, yaml.safe_dump([broken]))
    assert "INVALID_ARGUMENT" in str(e.value) and "model 'alpha'" in str(e.value) and "budget_per_endpoint" in str(e.value)
    with pytest.raises(admin_client.AdminError, match="not in the catalog"):
        admin_client.remove_model(gateway.admin_address, "nope")
    assert admin_client.list_models(gateway.admin_address).version == version
    assert complete(gateway, "alpha").headers["x-kvgate-max-tokens"] == "64"


def test_the_catalog_file_is_watched_and_a_broken_save_is_refused(gateway: Gateway, pristine: str) -> None:
    path = gateway.run_dir / "catalog.yaml"
    original = path.read_text()
    try:
        data = yaml.safe_load(original)
        data["models"][0]["max_output_tokens"] = 5
        path.write_text(yaml.safe_dump(data))
        wait_for(lambda: complete(gateway, "alpha").headers.get("x-kvgate-max-tokens") == "5", "the file's clamp")
        version = admin_client.list_models(gateway.admin_address).version
        refusals = (gateway.run_dir / "xds_server.log").read_text().count("catalog.refused")
        path.write_text("models: [ {name: alpha")  # a broken save
        wait_for(lambda: (gateway.run_dir / "xds_server.log").read_text().count("catalog.refused") > refusals,
                 "the broken save refused")
        assert admin_client.list_models(gateway.admin_address).version == version
        assert complete(gateway, "alpha").headers["x-kvgate-max-tokens"] == "5"
    finally:
        path.write_text(original)
    wait_for(lambda: complete(gateway, "alpha").headers.get("x-kvgate-max-tokens") == "64", "the original clamp")


def test_status_shows_every_node_and_what_it_acked(gateway: Gateway) -> None:
    current = admin_client.status(gateway.admin_address)
    groups = {n.id: n.group for n in current.nodes}
    assert groups == {"envoy-0": "kvgate-envoy", "ext-proc-0": "kvgate-ext-proc"}
    envoy = next(n for n in current.nodes if n.id == "envoy-0")
    assert {t.rsplit(".", 1)[1] for t in envoy.acked_versions} == {
        "Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration"}
    ext_proc = next(n for n in current.nodes if n.id == "ext-proc-0")
    assert sorted(ext_proc.acked_versions) == ["type.googleapis.com/kvgate.v1.BudgetShares",
                                               "type.googleapis.com/kvgate.v1.ModelPolicy",
                                               "type.googleapis.com/kvgate.v1.Tenant"]
    assert ext_proc.budget_share == 1.0 and not envoy.HasField("budget_share")  # the only replica
    printed = subprocess.run([sys.executable, "-m", "kvgate.cli", "status", "--server", gateway.admin_address],
                             capture_output=True, text=True, timeout=30)
    assert printed.returncode == 0 and "envoy-0 (group kvgate-envoy)" in printed.stdout
    assert "ModelPolicy: ACKed" in printed.stdout and "budget share: 1.000" in printed.stdout



def test_a_control_plane_crash_and_restart_drops_nothing_and_repushes_nothing(gateway: Gateway) -> None:
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:  # steady traffic through the whole path for the whole test
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                results.append(http.post(f"{gateway.url}/v1/completions",
                                         json={"model": "alpha", "prompt": "hi", "max_tokens": 2}).status_code)
                time.sleep(0.01)

    version = admin_client.status(gateway.admin_address).version
    cds_updates = envoy_stat(gateway, "cluster_manager.cds.update_success")
    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(0.3)
        gateway.supervisor.restart("xds_server", kill=True)
        time.sleep(1.0)  # Envoy and ext_proc serve on their last config meanwhile

        def both_back() -> bool:
            try:
                nodes = admin_client.status(gateway.admin_address).nodes
            except admin_client.AdminError:
                return False
            return {n.id for n in nodes} == {"envoy-0", "ext-proc-0"}

        wait_for(both_back, "Envoy and ext_proc reconnected", timeout_s=30)
        time.sleep(0.3)
    finally:
        stop.set()
        worker.join()
    assert len(results) > 50 and set(results) == {200}
    assert admin_client.status(gateway.admin_address).version == version
    # Same catalog, same versions: the reconnected Envoy was sent nothing it already had.
    assert envoy_stat(gateway, "cluster_manager.cds.update_success") == cds_updates


def test_removing_a_model_under_load_never_black_holes_a_request(gateway: Gateway, pristine: str) -> None:
    """A removed model's requests are served, then refused as unknown (404), never dropped by Envoy
    for a missing cluster (503). Two guards: ext_proc refuses the model as soon as its policy goes,
    and routes stop using the cluster before the cluster goes (make before break, unit-tested in
    test_control.py); this test sees the sum of both."""
    for attempt in range(2):
        beta = alias_of_alpha(gateway, "beta")
        admin_client.apply_models(gateway.admin_address, yaml.safe_dump([beta]))
        wait_for(lambda: complete(gateway, "beta").status_code == 200, "beta served")
        with loaded(gateway, "beta", lambda answer: answer.status_code in (200, 404)) as (seen, unexpected):
            time.sleep(0.2)
            admin_client.remove_model(gateway.admin_address, "beta")
            wait_for(lambda: bool(seen) and seen[-1] == 404, "beta refused")
        assert set(seen) <= {200, 404}, f"attempt {attempt}: {sorted(set(seen))} {unexpected[:3]}"


def test_adding_a_model_under_load_answers_only_unknown_retry_or_served(gateway: Gateway, pristine: str) -> None:
    """While a model is added, its requests get 404 (not there yet), 200, or, for one whose headers
    reached Envoy before the model's routes and whose body reached ext_proc after its policy, a
    retryable 503 model_not_ready; never a 400 from the routes for bodiless requests (seen under load
    before the pending route), nor Envoy's plain text."""
    def expected(answer: httpx.Response) -> bool:
        return answer.status_code in (200, 404) or (
            answer.status_code == 503 and answer.headers.get("retry-after") == "1"
            and answer.json()["error"]["code"] == "model_not_ready")

    for attempt in range(3):
        with loaded(gateway, "beta", expected) as (seen, unexpected):
            time.sleep(0.2)
            admin_client.apply_models(gateway.admin_address, yaml.safe_dump([alias_of_alpha(gateway, "beta")]))
            wait_for(lambda: bool(seen) and seen[-1] == 200, "beta served")
        admin_client.remove_model(gateway.admin_address, "beta")
        wait_for(lambda: complete(gateway, "beta").status_code == 404, "beta gone")
        assert not unexpected, f"attempt {attempt}: {unexpected[:3]}"
        assert 404 in seen and 200 in seen
