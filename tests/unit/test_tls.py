"""kvgate/tls.py, and the TLS pieces it renders for Envoy: the ADS cluster of the bootstrap and the
ext_proc cluster of the snapshot, checked as the protobuf messages Envoy parses (and by Envoy itself).

A real handshake is checked on an in-process gRPC server with certificates made here."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import typer
import yaml
from google.protobuf import json_format

# Importing the modules registers the typed_config types the bootstrap names.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.base_pb2 import TransportSocket
from envoy.extensions.resource_monitors.downstream_connections.v3 import downstream_connections_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3.common_pb2 import SubjectAltNameMatcher
from envoy.extensions.transport_sockets.tls.v3.tls_pb2 import UpstreamTlsContext
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from ext_proc import __main__ as ext_proc_main
from kvgate import tls
from kvgate.catalog import Address, parse_catalog
from kvgate.cli.app import app
from kvgate.cli.envoy_bootstrap import envoy_binary, render_bootstrap
from kvgate.tls import TlsBundle, TlsError, TlsFiles
from tests.tls_util import make_bundle, make_ca, make_leaf
from xds_server import __main__ as xds_server_main
from xds_server.render import resources
from xds_server.render.resources import EXT_PROC_CLUSTER
from xds_server.settings import GatewaySettings
from xds_server.render.build import build_snapshot
from xds_server.resource_types import CLUSTER

REPO = Path(__file__).resolve().parents[2]
CA, CERT, KEY = Path("/etc/kvgate/ca.pem"), Path("/etc/kvgate/envoy.pem"), Path("/etc/kvgate/envoy.key")
CATALOG = parse_catalog({"models": [{
    "name": "alpha", "endpoints": ["10.0.0.1:8000"], "max_context_tokens": 2048, "max_output_tokens": 64,
    "kv": {"bytes_per_token": 4096, "budget_per_endpoint": "256MiB"}}]})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> TlsBundle:
    return make_bundle(tmp_path_factory.mktemp("tls"))


# --- files and flags -------------------------------------------------------------------------------

def test_half_a_key_pair_is_refused() -> None:
    with pytest.raises(TlsError):
        TlsFiles(cert=CERT)
    with pytest.raises(TlsError):
        TlsFiles(key=KEY, ca=CA)


def test_bundle_serves_mutual_tls_only_with_a_client_certificate() -> None:
    mutual = TlsBundle(CA, CERT, KEY, client_cert=Path("c.pem"), client_key=Path("c.key"))
    assert mutual.server == TlsFiles(CERT, KEY, CA)
    assert mutual.client == TlsFiles(Path("c.pem"), Path("c.key"), CA)
    one_way = TlsBundle(CA, CERT, KEY)
    assert one_way.server == TlsFiles(CERT, KEY, None)  # any client: no CA to check client certificates against
    assert one_way.client == TlsFiles(None, None, CA)


def test_describe() -> None:
    assert tls.describe(None, server=True) == "plaintext"
    assert tls.describe(TlsFiles(CERT, KEY), server=True) == "TLS"
    assert tls.describe(TlsFiles(CERT, KEY, CA), server=True) == "mutual TLS"
    assert tls.describe(TlsFiles(ca=CA), server=False) == "TLS"
    assert tls.describe(TlsFiles(CERT, KEY, CA), server=False) == "mutual TLS"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    tls.add_server_flags(p, "the server")
    tls.add_client_flags(p, "xds", "the control plane")
    return p


@pytest.mark.parametrize("files", [None, TlsFiles(CERT, KEY), TlsFiles(CERT, KEY, CA)])
def test_server_flags_read_back(files: TlsFiles | None) -> None:
    assert tls.server_files(parser().parse_args(tls.server_flags(files))) == files


@pytest.mark.parametrize("files", [None, TlsFiles(ca=CA), TlsFiles(CERT, KEY, CA)])
def test_client_flags_read_back(files: TlsFiles | None) -> None:
    assert tls.client_files(parser().parse_args(tls.client_flags(files, "xds")), "xds") == files


@pytest.mark.parametrize("argv, message", [
    (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert"),
    (["--tls-cert", "s.pem"], "--tls-cert/--tls-key: set both"),
    (["--xds-cert", "c.pem", "--xds-key", "c.key"], "need --xds-ca"),
    (["--xds-ca", "ca.pem", "--xds-key", "c.key"], "--xds-cert/--xds-key: set both"),
])
def test_flags_that_do_not_make_sense_are_refused(argv: list[str], message: str) -> None:
    args = parser().parse_args(argv)
    with pytest.raises(TlsError, match=message):
        tls.server_files(args)
        tls.client_files(args, "xds")


def test_unreadable_files_fail_early(tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="cannot read"):
        tls.readable(TlsFiles(ca=tmp_path / "missing.pem"))
    assert tls.readable(None) is None


def test_a_client_without_a_ca_is_refused() -> None:
    # grpc would trust the system's roots instead, which never signed a kvgate server's certificate.
    with pytest.raises(TlsError):
        tls.channel_credentials(TlsFiles(CERT, KEY))


# --- a real handshake ------------------------------------------------------------------------------

async def _echo(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
    return request


ECHO = grpc.method_handlers_generic_handler("kvgate.test.Echo", {
    "Echo": grpc.unary_unary_rpc_method_handler(_echo)})


async def _call(target: str, files: TlsFiles | None) -> grpc.StatusCode:
    async with tls.aio_channel(target, files) as channel:
        try:
            await channel.unary_unary("/kvgate.test.Echo/Echo")(b"hi", timeout=5)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            return e.code()


async def echo_server(files: TlsFiles) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([ECHO])
    port = tls.bind(server, "127.0.0.1:0", files)
    await server.start()
    return server, port


@pytest.mark.asyncio
async def test_mutual_tls_takes_only_clients_with_a_certificate_from_its_ca(bundle: TlsBundle, tmp_path: Path) -> None:
    server, port = await echo_server(bundle.server)
    try:
        for host in ("127.0.0.1", "localhost"):  # both names are in the server certificate
            assert await _call(f"{host}:{port}", bundle.client) == grpc.StatusCode.OK
        assert await _call(f"127.0.0.1:{port}", TlsFiles(ca=bundle.ca)) == grpc.StatusCode.UNAVAILABLE
        assert await _call(f"127.0.0.1:{port}", None) == grpc.StatusCode.UNAVAILABLE
        stranger = make_ca(tmp_path, "another CA")
        cert, key = make_leaf(stranger, tmp_path, "stranger", server=False)
        assert await _call(f"127.0.0.1:{port}", TlsFiles(cert, key, bundle.ca)) == grpc.StatusCode.UNAVAILABLE
        # The client checks the server too: a CA that did not sign it is refused.
        assert await _call(f"127.0.0.1:{port}", TlsFiles(cert, key, stranger.cert_path)) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


# --- Envoy ------------------------------------------------------------------------------------------

def upstream_tls(transport_socket: TransportSocket) -> UpstreamTlsContext:
    assert transport_socket.name == "envoy.transport_sockets.tls"
    context = UpstreamTlsContext()
    assert transport_socket.typed_config.Unpack(context)
    return context


def test_envoy_checks_the_server_name_and_presents_its_certificate() -> None:
    context = upstream_tls(json_format.ParseDict(
        {"transport_socket": tls.envoy_upstream_tls(TlsFiles(CERT, KEY, CA))}, Cluster()).transport_socket)
    assert context.sni == "localhost"
    common = context.common_tls_context
    assert list(common.alpn_protocols) == ["h2"]
    assert common.validation_context.trusted_ca.filename == str(CA)
    (san,) = common.validation_context.match_typed_subject_alt_names
    assert (san.san_type, san.matcher.exact) == (SubjectAltNameMatcher.DNS, "localhost")
    (cert,) = common.tls_certificates
    assert (cert.certificate_chain.filename, cert.private_key.filename) == (str(CERT), str(KEY))


def test_envoy_checks_an_ip_name_as_an_ip_san_and_sends_no_sni() -> None:
    context = upstream_tls(json_format.ParseDict(
        {"transport_socket": tls.envoy_upstream_tls(TlsFiles(ca=CA), "127.0.0.1")}, Cluster()).transport_socket)
    assert context.sni == ""
    (san,) = context.common_tls_context.validation_context.match_typed_subject_alt_names
    assert (san.san_type, san.matcher.exact) == (SubjectAltNameMatcher.IP_ADDRESS, "127.0.0.1")
    assert not context.common_tls_context.tls_certificates  # TLS, not mutual: no client certificate


def test_envoy_is_never_rendered_tls_that_verifies_nothing() -> None:
    with pytest.raises(TlsError):
        tls.envoy_upstream_tls(TlsFiles(CERT, KEY))


def bootstrap(**kwargs: object) -> bootstrap_pb2.Bootstrap:
    text = render_bootstrap(node_id="envoy-0", node_cluster="kvgate-envoy", admin_port=9901,
                            xds=Address(host="127.0.0.1", port=18000), **kwargs)
    return json_format.ParseDict(yaml.safe_load(text), bootstrap_pb2.Bootstrap())


def test_the_bootstrap_reaches_xds_server_over_tls_only_when_asked() -> None:
    (plain,) = bootstrap().static_resources.clusters
    assert not plain.HasField("transport_socket")
    (cluster,) = bootstrap(xds_tls=TlsFiles(CERT, KEY, CA)).static_resources.clusters
    context = upstream_tls(cluster.transport_socket)
    assert context.common_tls_context.validation_context.trusted_ca.filename == str(CA)
    assert context.common_tls_context.tls_certificates[0].certificate_chain.filename == str(CERT)
    # All else as the plaintext one.
    cluster.ClearField("transport_socket")
    assert cluster == plain


def ext_proc_cluster(settings: GatewaySettings) -> Cluster:
    """The ext_proc cluster as the snapshot packs it (render/protos.py must know UpstreamTlsContext)."""
    cluster = Cluster()
    assert build_snapshot(CATALOG, settings).get(CLUSTER).items[EXT_PROC_CLUSTER].Unpack(cluster)
    return cluster


def test_the_ext_proc_cluster_is_tls_only_when_the_settings_say_so() -> None:
    assert not ext_proc_cluster(GatewaySettings()).HasField("transport_socket")
    cluster = ext_proc_cluster(GatewaySettings(ext_proc_tls=TlsFiles(CERT, KEY, CA), ext_proc_tls_server_name="ext-proc"))
    context = upstream_tls(cluster.transport_socket)
    assert context.sni == "ext-proc"
    assert list(context.common_tls_context.alpn_protocols) == ["h2"]
    assert context.common_tls_context.tls_certificates[0].private_key.filename == str(KEY)
    # The engines' clusters are not kvgate's to secure.
    snapshot = build_snapshot(CATALOG, GatewaySettings(ext_proc_tls=TlsFiles(CERT, KEY, CA)))
    for name, packed in snapshot.get(CLUSTER).items.items():
        other = Cluster()
        packed.Unpack(other)
        assert name == EXT_PROC_CLUSTER or not other.HasField("transport_socket")


def test_envoy_accepts_both_tls_clusters(bundle: TlsBundle, tmp_path: Path) -> None:
    """Envoy's own validation of the rendered bootstrap, with the ext_proc cluster added to it as a
    static cluster: it loads the certificate files, so they are the generated ones."""
    config = yaml.safe_load(render_bootstrap(node_id="envoy-0", node_cluster="kvgate-envoy", admin_port=9901,
                                             xds=Address(host="127.0.0.1", port=18000), xds_tls=bundle.client))
    settings = GatewaySettings(ext_proc_tls=bundle.client)
    config["static_resources"]["clusters"].append(resources.ext_proc_cluster(settings))
    path = tmp_path / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(config))
    envoy_validates(path)


def envoy_validates(path: Path) -> None:
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error",
                             "--base-id", "0", "--use-dynamic-base-id"],
                            capture_output=True, text=True, timeout=60, cwd=path.parent)
    assert result.returncode == 0, result.stdout + result.stderr


# --- docs/security.md: its examples as a user would run them -----------------------------------------

DOC = REPO / "docs" / "security.md"
# ```lang info, up to the closing fence; blocks whose info says no-run are shown, not run.
FENCE = re.compile(r"^```(?P<lang>[\w-]*)(?P<info>[^\n]*)\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def doc_blocks(lang: str) -> list[str]:
    return [m["code"] for m in FENCE.finditer(DOC.read_text()) if m["lang"] == lang and "no-run" not in m["info"]]


@pytest.fixture(scope="module")
def doc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh directory where the page's OpenSSL steps have been run."""
    # .ci/run installs it when missing: the page's steps are what an operator runs, so they must run here.
    assert shutil.which("openssl"), "the openssl command is needed to run docs/security.md's steps"
    directory = tmp_path_factory.mktemp("doc")
    (steps,) = [b for b in doc_blocks("sh") if "openssl" in b]
    subprocess.run(["bash", "-euo", "pipefail", "-c", steps], cwd=directory, check=True, capture_output=True, timeout=60)
    return directory


def doc_bundle(directory: Path) -> TlsBundle:
    certs = directory / "certs"
    return TlsBundle(ca=certs / "ca.pem", server_cert=certs / "server.pem", server_key=certs / "server.key",
                     client_cert=certs / "client.pem", client_key=certs / "client.key")


@pytest.mark.asyncio
async def test_the_docs_certificates_pass_a_mutual_tls_handshake(doc_dir: Path) -> None:
    bundle = doc_bundle(doc_dir)
    server, port = await echo_server(bundle.server)
    try:
        for host in ("127.0.0.1", "localhost"):
            assert await _call(f"{host}:{port}", bundle.client) == grpc.StatusCode.OK
        assert await _call(f"127.0.0.1:{port}", TlsFiles(ca=bundle.ca)) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


def doc_commands(directory: Path) -> list[list[str]]:
    """Every command of the page's sh blocks (continuation lines joined), $PWD as `directory`."""
    lines = (line for block in doc_blocks("sh") for line in block.replace("\\\n", " ").splitlines())
    return [[a.replace("$PWD", str(directory)) for a in shlex.split(line)]
            for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_the_docs_command_lines_parse(doc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the real parsers, in the directory the OpenSSL steps filled (the servers' files must be readable)."""
    monkeypatch.chdir(doc_dir)
    cli = typer.main.get_command(app)
    parsed = []
    for argv in doc_commands(doc_dir):
        if argv[:3] == ["python", "-m", "xds_server"]:
            args = xds_server_main.parse_args(argv[3:])
            assert (tls.describe(args.tls, server=True), tls.describe(args.ext_proc_tls, server=False)) == (
                "mutual TLS", "mutual TLS")
        elif argv[:3] == ["python", "-m", "ext_proc"]:
            args = ext_proc_main.parse_args(argv[3:])
            assert (tls.describe(args.tls, server=True), tls.describe(args.xds_tls, server=False)) == (
                "mutual TLS", "mutual TLS")
        elif argv[0] == "kvgate":
            command, rest = cli, argv[1:]
            # Down to the subcommand, e.g. `models list` (typer may bring its own click: no isinstance).
            while hasattr(command, "commands"):
                command, rest = command.commands[rest[0]], rest[1:]
            command.make_context(argv[0], rest)  # parses and checks every option without running it
        else:
            continue
        parsed.append(argv[0] if argv[0] == "kvgate" else argv[2])
    assert set(parsed) == {"xds_server", "ext_proc", "kvgate"}


def test_the_docs_bootstrap_is_one_envoy_accepts(doc_dir: Path) -> None:
    (example,) = doc_blocks("python")
    subprocess.run([sys.executable, "-c", example], cwd=doc_dir, check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    envoy_validates(doc_dir / "envoy.yaml")
