"""The control plane's status page in a real browser (Debian's headless Chromium): models and
endpoints listed, a held request's reservation appearing and going away, the charts of KV use and
admissions drawing them, refusals, an engine going down."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from kvgate.wire import PRIORITY_HEADER
from tests.integration.conftest import TEST_CATALOG, start_gateway, wait_for
from xds_server.status_history import SAMPLE_INTERVAL_S

# Debian's packages (.ci/run installs them): selenium must not go looking for a browser to download.
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The test catalog with org/tiny's engine slower (a held request holds its budget for 13 s, so a
# slow browser still sees it), plus a model whose engine this module kills: its metrics go stale
# within a second.
TINY = next(m for m in TEST_CATALOG["models"] if m["name"] == "org/tiny")
SLOW_TINY = {**TINY, "sim": {**TINY["sim"], "itl_ms": 100}}
DOOMED = {"name": "doomed", "endpoints": ["sim"], "max_context_tokens": 2048, "max_output_tokens": 64,
          "kv": {"bytes_per_token": 4096, "budget_per_endpoint": "64MiB"},
          "engine_metrics": {"interval_s": 0.2, "stale_after_s": 1.2},
          "sim": {"ttft_base_ms": 0, "ttft_per_token_ms": 0, "itl_ms": 0, "batch_slowdown": 0}}
# The page polls every second; a change shows within a few polls.
PAGE_TIMEOUT_S = 10
# The control plane samples the charts' history every SAMPLE_INTERVAL_S and the page fetches it as
# often: a change is charted within two intervals and a poll, given time for a loaded machine.
CHART_TIMEOUT_S = 5 * SAMPLE_INTERVAL_S


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    models = [SLOW_TINY if m is TINY else m for m in TEST_CATALOG["models"]]
    catalog = parse_catalog({**TEST_CATALOG, "models": [*models, DOOMED]})
    gw = start_gateway(catalog, tmp_path_factory.mktemp("gw"))
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh profile: nothing from earlier runs
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()  # chromedriver and every Chromium process with it


@pytest.fixture(scope="module")
def page(browser: WebDriver, gateway: Gateway) -> WebDriver:
    browser.get(gateway.status_url)
    return browser


def endpoint_of(gw: Gateway, model: str) -> str:
    return str(gw.sims[model][0])


def cell(page: WebDriver, model: str, endpoint: str, field: str) -> str | None:
    """data-value of one endpoint's cell as the page shows it now; None while it is not there."""
    found = page.find_elements(
        By.CSS_SELECTOR, f'tbody[data-model="{model}"] tr[data-endpoint="{endpoint}"] td[data-field="{field}"]')
    try:
        return found[0].get_attribute("data-value") if found else None
    except StaleElementReferenceException:  # redrawn between finding and reading: ask again
        return None


def until(page: WebDriver, predicate: Callable[[], bool], what: str, timeout_s: float = PAGE_TIMEOUT_S) -> None:
    WebDriverWait(page, timeout_s, poll_frequency=0.1,
                  ignored_exceptions=[StaleElementReferenceException]).until(
        lambda _: predicate(), message=f"the page never showed {what}")


def refusal_rows(page: WebDriver) -> list[dict[str, str]]:
    rows = page.find_elements(By.CSS_SELECTOR, "#refusals tbody tr")
    return [{c.get_attribute("data-field"): c.text for c in r.find_elements(By.CSS_SELECTOR, "td[data-field]")}
            | {"code": r.get_attribute("data-code")} for r in rows]


def chart_line(page: WebDriver, chart: str, series: str) -> tuple[list[float | None], str] | None:
    """(values, SVG path data) of one line of a chart (a CSS selector) as the page draws it now."""
    found = page.find_elements(By.CSS_SELECTOR, f'{chart} path[data-series="{series}"]')
    try:
        return (json.loads(found[0].get_attribute("data-values")), found[0].get_attribute("d")) if found else None
    except StaleElementReferenceException:
        return None


def values(page: WebDriver, chart: str, series: str) -> list[float | None]:
    line = chart_line(page, chart, series)
    return line[0] if line else []


def drawn_rising(page: WebDriver, chart: str, series: str) -> bool:
    """The line's path has points at two heights: it shows a change, not just a flat zero."""
    line = chart_line(page, chart, series)
    heights = {float(y) for y in re.findall(r"[ML][\d.]+,([\d.]+)", line[1])} if line else set()
    return len(heights) >= 2


def test_models_and_endpoints_are_listed_and_up(page: WebDriver, gateway: Gateway) -> None:
    for model in ("fast", "org/tiny", "doomed"):
        until(page, lambda m=model: cell(page, m, endpoint_of(gateway, m), "health") is not None,
              f"{model} and its endpoint")
    for model in ("fast", "org/tiny"):
        until(page, lambda m=model: cell(page, m, endpoint_of(gateway, m), "health") == "up", f"{model} up")
    assert cell(page, "org/tiny", endpoint_of(gateway, "org/tiny"), "capacity") == str(640 * 1024)
    nodes = {e.text for e in page.find_elements(By.CSS_SELECTOR, "#nodes tbody tr td:first-child")}
    assert {"envoy-0", "ext-proc-0"} <= nodes


def test_reserved_bytes_show_live_while_a_request_holds_them(page: WebDriver, gateway: Gateway) -> None:
    tiny = endpoint_of(gateway, "org/tiny")
    until(page, lambda: cell(page, "org/tiny", tiny, "reserved") == "0", "nothing reserved at first")
    # 300 bytes + 8 = 308 prompt tokens + 128 output = 436 -> 28 blocks of 16 x 1 KiB = 448 KiB.
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{gateway.url}/v1/completions", json={
            "model": "org/tiny", "prompt": "p" * 300, "max_tokens": 128, "stream": True}) as held:
        assert held.status_code == 200
        until(page, lambda: cell(page, "org/tiny", tiny, "reserved") == str(448 * 1024), "the reservation")
        assert cell(page, "org/tiny", tiny, "reservations") == "1"
    # The client went away mid-stream: the request ends there, and ext_proc releases its reservation.
    until(page, lambda: cell(page, "org/tiny", tiny, "reserved") == "0", "the reservation released")
    assert cell(page, "org/tiny", tiny, "reservations") == "0"


def test_the_kv_chart_draws_a_held_reservation_and_its_release(page: WebDriver, gateway: Gateway) -> None:
    chart = f'tbody[data-model="org/tiny"] tr[data-endpoint="{endpoint_of(gateway, "org/tiny")}"] svg[data-chart="kv"]'
    until(page, lambda: values(page, chart, "reserved")[-1:] == [0.0], "an empty pool charted", CHART_TIMEOUT_S)
    # 100 bytes + 8 = 108 prompt tokens + 128 output = 236 -> 15 blocks of 16 KiB = 240 KiB of 640: 0.375.
    # The engine streams for 12.8 s, two samples at least.
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{gateway.url}/v1/completions", json={
            "model": "org/tiny", "prompt": "p" * 100, "max_tokens": 128, "stream": True}) as held:
        assert held.status_code == 200
        until(page, lambda: 0.375 in values(page, chart, "reserved"), "the reservation charted", CHART_TIMEOUT_S)
    assert drawn_rising(page, chart, "reserved")
    assert len(values(page, chart, "used")) == len(values(page, chart, "reserved"))
    until(page, lambda: values(page, chart, "reserved")[-1:] == [0.0], "the release charted", CHART_TIMEOUT_S)


def test_the_admissions_chart_counts_admitted_and_refused_requests(page: WebDriver, gateway: Gateway) -> None:
    chart = 'tbody[data-model="fast"] svg[data-chart="admissions"]'
    until(page, lambda: chart_line(page, chart, "admitted") is not None, "the admissions chart", CHART_TIMEOUT_S)
    admitted, refused = sum(values(page, chart, "admitted")), sum(values(page, chart, "refused"))
    with httpx.Client(timeout=30) as http:
        for _ in range(3):
            ok = http.post(f"{gateway.url}/v1/completions", json={"model": "fast", "prompt": "hi", "max_tokens": 2})
            assert ok.status_code == 200
        for _ in range(2):
            bad = http.post(f"{gateway.url}/v1/completions", json={"model": "fast", "prompt": "hi", "max_tokens": 2},
                            headers={PRIORITY_HEADER: "nope"})
            assert bad.status_code == 400
    # Nothing else in this module is admitted to "fast"; an earlier test's one refusal may be charted late.
    until(page, lambda: sum(values(page, chart, "admitted")) == admitted + 3
          and sum(values(page, chart, "refused")) >= refused + 2, "the requests charted", CHART_TIMEOUT_S)
    assert drawn_rising(page, chart, "admitted") and drawn_rising(page, chart, "refused")


def test_a_refusal_appears_in_recent_refusals(page: WebDriver, gateway: Gateway) -> None:
    request_id = uuid.uuid4().hex  # Envoy keeps a client's x-request-id: it finds this one row
    resp = httpx.post(f"{gateway.url}/v1/completions", json={"model": "fast", "prompt": "hi", "max_tokens": 2},
                      headers={PRIORITY_HEADER: "nope", "x-request-id": request_id})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_priority_class"
    until(page, lambda: any(r["request_id"] == request_id for r in refusal_rows(page)), "the refusal")
    row = next(r for r in refusal_rows(page) if r["request_id"] == request_id)
    assert row == {"model": "fast", "code": "invalid_priority_class", "request_id": request_id}
    assert refusal_rows(page)[0]["request_id"] == request_id  # the newest first


def test_an_engine_whose_metrics_go_stale_is_down(page: WebDriver, gateway: Gateway) -> None:
    doomed = endpoint_of(gateway, "doomed")
    until(page, lambda: cell(page, "doomed", doomed, "health") == "up", "doomed up")
    (engine,) = [c for c in gateway.supervisor.children if c.name.startswith("sim-doomed")]
    engine.proc.kill()
    engine.proc.wait()
    until(page, lambda: cell(page, "doomed", doomed, "health") == "down", "doomed down")
    assert cell(page, "fast", endpoint_of(gateway, "fast"), "health") == "up"


def test_status_json_and_metrics_are_served_beside_the_page(gateway: Gateway) -> None:
    status = httpx.get(f"{gateway.status_url}status.json").json()
    assert [r["node_id"] for r in status["replicas"] if r["ok"]] == ["ext-proc-0"]
    wait_for(lambda: 'kvgate_xds_connected_nodes{group="kvgate-envoy"} 1.0' in
             httpx.get(f"{gateway.status_url}metrics").text, what="Envoy counted as connected")
    metrics = httpx.get(f"{gateway.status_url}metrics").text
    assert 'kvgate_xds_pushes_total{type_url="type.googleapis.com/kvgate.v1.ModelPolicy"}' in metrics
