"""The whole gateway with mutual TLS on every gRPC connection between its parts (certificates made
here): Envoy -> xds_server (ADS), ext_proc -> xds_server (ADS), Envoy -> ext_proc, and the admin API.

A request through Envoy that an engine answers needs all three of the first: Envoy's config came
over ADS, ext_proc admitted it with the policies and share it got over ADS, and Envoy asked it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from typer.testing import CliRunner

from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from kvgate.cli import admin_client
from kvgate.catalog import parse_catalog
from kvgate.cli.app import app
from kvgate.cli.gateway import Gateway
from kvgate.tls import TlsBundle, TlsFiles
from tests.integration.conftest import ALPHA, envoy_stat, start_gateway
from tests.tls_util import make_bundle


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    bundle = make_bundle(tmp_path_factory.mktemp("certs"))
    gw = start_gateway(parse_catalog({"models": [ALPHA]}), tmp_path_factory.mktemp("gw"), tls=bundle)
    yield gw
    gw.stop()


def bundle_of(gw: Gateway) -> TlsBundle:
    assert gw.tls is not None
    return gw.tls


def test_a_request_goes_through_and_every_hop_was_tls(gateway: Gateway) -> None:
    r = httpx.post(f"{gateway.url}/v1/completions", json={"model": "alpha", "prompt": "hello", "max_tokens": 4})
    assert r.status_code == 200, r.text
    # Envoy's own count of TLS handshakes, per cluster: its ADS connection and its ext_proc ones.
    assert envoy_stat(gateway, "cluster.kvgate_xds.ssl.handshake") >= 1
    assert envoy_stat(gateway, "cluster.kvgate_ext_proc.ssl.handshake") >= 1


def kvgate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_kvgate_status_with_the_client_certificate(gateway: Gateway) -> None:
    b = bundle_of(gateway)
    code, out = kvgate("status", "--server", gateway.admin_address, "--ca", str(b.ca),
                       "--cert", str(b.client_cert), "--key", str(b.client_key))
    assert code == 0, out
    # ext_proc's ADS stream over mutual TLS, with its budget share.
    assert "- ext-proc-0 (group kvgate-ext-proc)" in out and "budget share: 1.000" in out
    assert "- envoy-0 (group kvgate-envoy)" in out


@pytest.mark.parametrize("flags", [
    pytest.param(lambda b: ["--ca", str(b.ca)], id="TLS without a client certificate"),
    pytest.param(lambda b: [], id="plaintext"),
])
def test_kvgate_status_without_the_client_certificate_is_refused(
        gateway: Gateway, flags: Callable[[TlsBundle], list[str]]) -> None:
    code, out = kvgate("status", "--server", gateway.admin_address, *flags(bundle_of(gateway)))
    assert code == 1
    assert "refused: UNAVAILABLE" in out


def test_a_client_certificate_is_no_use_against_a_server_it_cannot_verify(gateway: Gateway, tmp_path: Path) -> None:
    """The client checks the server too: the server's certificate against a CA that did not sign it."""
    b = bundle_of(gateway)
    other = make_bundle(tmp_path)
    with pytest.raises(admin_client.AdminError, match="UNAVAILABLE"):
        admin_client.status(gateway.admin_address, TlsFiles(b.client_cert, b.client_key, other.ca))


def test_plaintext_grpc_to_the_xds_and_ext_proc_ports_fails(gateway: Gateway) -> None:
    with grpc.insecure_channel(gateway.admin_address) as channel:
        stream = AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
            iter([DiscoveryRequest(type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster")]), timeout=5)
        with pytest.raises(grpc.RpcError) as e:
            next(stream)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(f"127.0.0.1:{gateway.ext_proc_port}") as channel:
        stream = ExternalProcessorStub(channel).Process(iter([ProcessingRequest()]), timeout=5)
        with pytest.raises(grpc.RpcError) as e:
            next(stream)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
