"""A whole gateway on one machine: simulated engines, xds_server, ext_proc and Envoy, started in
dependency order and ready only when a request has gone all the way through.

`kvgate up` runs one; the integration tests and benchmarks run theirs the same way.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvgate.catalog import SIM, Address, Catalog, Model
from kvgate.cli.envoy_bootstrap import envoy_binary, render_bootstrap
from kvgate.cli.processes import Child, Supervisor, free_port, port_is_free
from kvgate.tls import DEFAULT_SERVER_NAME, TlsBundle, TlsFiles, client_flags, server_flags
from xds_server.settings import GatewaySettings

ENVOY_NODE_CLUSTER = "kvgate-envoy"


def sim_argv(model: Model, addr: Address) -> list[str]:
    """The simulated engine for one `sim` endpoint, sized by the model's KV budget; for `engine: vllm`, a
    simulated vLLM (its scheduling and metrics, prompts counted with the model's tokenizer)."""
    s = model.sim
    blocks = model.kv_budget_bytes // (model.kv_bytes_per_token * model.block_tokens)
    protocol = ["--protocol", model.protocol] + (["--grpc-port", str(addr.grpc_port)] if addr.grpc_port else [])
    if model.engine == "vllm":
        protocol += ["--flavor", "vllm"] + (["--tokenizer", str(model.tokenizer)] if model.tokenizer else [])
    return [sys.executable, "-m", "engines.sim", *protocol, "--host", addr.host, "--port", str(addr.port),
            "--model", model.engine_model,
            "--kv-blocks", str(blocks), "--tokens-per-block", str(model.block_tokens),
            "--ttft-base-ms", str(s.ttft_base_ms), "--ttft-per-token-ms", str(s.ttft_per_token_ms),
            "--itl-ms", str(s.itl_ms), "--batch-slowdown", str(s.batch_slowdown),
            "--on-full", s.on_full, "--seed", str(s.seed)]


def _http(method: str, url: str, body: dict | None = None, timeout_s: float = 2.0,
          headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def health_url(model: Model, addr: Address) -> str:
    """The engine's own readiness endpoint (trtllm-serve's or Triton's)."""
    return f"http://{addr}/v2/health/ready" if model.protocol == "triton" else f"http://{addr}/health"


def probe(url: str, model: Model) -> tuple[str, dict]:
    """One cheap request (one output token) in the model's own protocol."""
    if model.protocol == "triton":
        return f"{url}/v2/models/{model.name}/generate", {"text_input": "kvgate probe", "max_tokens": 1}
    return f"{url}/v1/completions", {"model": model.name, "prompt": "kvgate probe", "max_tokens": 1}


class NotReady(RuntimeError):
    pass


@dataclass(frozen=True)
class EnvoyNode:
    node_id: str
    group: str  # node.cluster: its own group gives it its own listener address
    host: str
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


@dataclass
class Gateway:
    catalog: Catalog
    run_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    max_request_bytes: int = GatewaySettings.max_request_bytes
    xds_port: int = field(default_factory=free_port)
    ext_proc_port: int = field(default_factory=free_port)
    ext_proc_metrics_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    # xds_server's HTTP port: the status page, /status.json and the control plane's /metrics.
    xds_http_port: int = field(default_factory=free_port)
    # A fleet on one host: more Envoys (each its own listener port) and ext_proc replicas.
    extra_envoys: int = 0
    extra_ext_procs: int = 0
    # Envoys speak incremental (Delta) ADS instead of state of the world.
    delta_xds: bool = False
    # TLS (mutual TLS if it has a client certificate) on every gRPC connection between the parts:
    # Envoy and ext_proc to xds_server, Envoy to ext_proc, and the admin API. None: plaintext.
    tls: TlsBundle | None = None
    # Sent with the readiness probes: a tenant's key when the catalog has tenants. Without one, a 401
    # from ext_proc is taken as ready (it answered with policies and tenants loaded), the engines'
    # health having been checked directly.
    probe_headers: dict[str, str] = field(default_factory=dict)
    sims: dict[str, list[Address]] = field(default_factory=dict)
    _sim_addresses: dict[str, Address] = field(default_factory=dict)  # by engine process name

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.supervisor = Supervisor(self.run_dir)
        self._watcher: threading.Thread | None = None
        self._stopping = threading.Event()
        self.envoys = [EnvoyNode("envoy-0", ENVOY_NODE_CLUSTER, self.host, self.port, self.admin_port)] + [
            EnvoyNode(f"envoy-{i}", f"{ENVOY_NODE_CLUSTER}-{i}", self.host, free_port(), free_port())
            for i in range(1, self.extra_envoys + 1)]
        # (gRPC port, metrics port) of each ext_proc replica.
        self.ext_procs = [(self.ext_proc_port, self.ext_proc_metrics_port)] + [
            (free_port(), free_port()) for _ in range(self.extra_ext_procs)]

    @property
    def url(self) -> str:
        """The gateway: the first Envoy's listener."""
        return self.envoys[0].url

    @property
    def admin_url(self) -> str:
        """The first Envoy's admin interface."""
        return self.envoys[0].admin_url

    @property
    def admin_address(self) -> str:
        """The control plane: ADS and the admin API share its port."""
        return f"127.0.0.1:{self.xds_port}"

    @property
    def server_tls(self) -> TlsFiles | None:
        """What xds_server and ext_proc serve with."""
        return self.tls.server if self.tls else None

    @property
    def client_tls(self) -> TlsFiles | None:
        """What their clients present: Envoy, ext_proc to xds_server, and the admin API's (kvgate status)."""
        return self.tls.client if self.tls else None

    @property
    def tls_server_name(self) -> str:
        return self.tls.server_name if self.tls else DEFAULT_SERVER_NAME

    @property
    def status_url(self) -> str:
        """The status page (xds_server binds 127.0.0.1, its default)."""
        return f"http://127.0.0.1:{self.xds_http_port}/"

    @property
    def ext_proc_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ext_proc_metrics_port}/metrics"

    @property
    def access_log_path(self) -> Path:
        """Envoy's JSON access log (every Envoy of the gateway appends to it; `listener` tells them apart)."""
        return self.run_dir / "access.log"

    def start(self, timeout_s: float = 60.0) -> None:
        if not port_is_free(self.host, self.port):
            # Envoy would NACK the listener and never get ready: say so now, plainly.
            raise NotReady(f"{self.host}:{self.port} is already in use (choose another with --port)")
        try:
            self._start_all()
            self._wait_ready(time.monotonic() + timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._watcher is not None:
            self._stopping.set()
            self._watcher.join()
            self._watcher = None
        self.supervisor.stop_all()

    def supervise(self, on_restart: Callable[[Child, int], None] = lambda child, code: None,
                  every_s: float = 0.1) -> None:
        """From now until stop(): any part that dies (Envoy, xds_server, an ext_proc replica, a
        simulated engine) is started again on the same ports, with backoff if it keeps dying.
        `on_restart` hears of each restart (the new child, the old one's exit code). Envoy keeps serving
        its last config while xds_server is away; ext_proc being away fails closed."""
        def watch() -> None:
            while not self._stopping.wait(every_s):
                for child, code in self.supervisor.revive():
                    on_restart(child, code)

        self._stopping.clear()
        self._watcher = threading.Thread(target=watch, name="kvgate-supervisor", daemon=True)
        self._watcher.start()

    def __enter__(self) -> Gateway:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def reload(self, catalog: Catalog) -> None:
        """Serve another catalog: engines for new `sim` endpoints are started (changed ones restarted
        on the same ports), and xds_server, which watches the resolved copy, publishes it."""
        self.catalog = self._ensure_sims(catalog)
        self.catalog_path.write_text(self.catalog.to_yaml())

    @property
    def catalog_path(self) -> Path:
        """The catalog xds_server serves: the given one with every `sim` resolved to its engine."""
        return self.run_dir / "catalog.yaml"

    def _ensure_sims(self, catalog: Catalog, timeout_s: float = 30.0) -> Catalog:
        """Start (or restart, when its settings changed) the engine of every `sim` endpoint, and wait
        until the ones started answer their health check: a route to an engine still booting is a 503."""
        sims: dict[str, list[Address]] = {}
        started: list[str] = []
        for model in catalog.models:
            for i, _ in enumerate(e for e in model.endpoints if e == SIM):
                name = f"sim-{model.name.replace('/', '_')}-{i}"
                port = free_port()
                # The simulated Triton serves its metrics on its HTTP port, not on a third one.
                triton = {"grpc_port": free_port(), "metrics_port": port} if model.protocol == "triton" else {}
                addr = self._sim_addresses.get(name) or Address(host="127.0.0.1", port=port, **triton)
                self._sim_addresses[name] = addr
                argv = sim_argv(model, addr)
                running = self.supervisor.get(name)
                if running is None:
                    self.supervisor.start(name, argv)
                elif running.argv != argv:
                    self.supervisor.restart(name, argv=argv)
                if running is None or running.argv != argv:
                    started.append(health_url(model, addr))
                sims.setdefault(model.name, []).append(addr)
        deadline = time.monotonic() + timeout_s
        for url in started:
            while _http("GET", url)[0] != 200:
                self.supervisor.check()
                if time.monotonic() > deadline:
                    raise NotReady(f"simulated engine never answered {url}")
                time.sleep(0.02)
        self.sims = sims
        return catalog.with_endpoints(sims)

    def _start_all(self) -> None:
        py = sys.executable
        self.catalog = self._ensure_sims(self.catalog)
        self.catalog_path.write_text(self.catalog.to_yaml())
        fleet = self.envoys[1:]  # each extra Envoy is its own node group with its own listener
        self.supervisor.start("xds_server", [
            py, "-m", "xds_server", "--catalog", str(self.catalog_path), "--port", str(self.xds_port),
            "--http-port", str(self.xds_http_port),
            "--listen", f"{self.host}:{self.port}", "--max-request-bytes", str(self.max_request_bytes),
            "--access-log", str(self.access_log_path),
            *(a for port, _ in self.ext_procs for a in ("--ext-proc", f"127.0.0.1:{port}")),
            *(a for e in fleet for a in ("--group-listen", f"{e.group}={self.host}:{e.port}")),
            *server_flags(self.server_tls), *client_flags(self.client_tls, "ext-proc-tls"),
            *(["--ext-proc-tls-server-name", self.tls_server_name] if self.tls else [])])
        for i, (port, metrics_port) in enumerate(self.ext_procs):
            self.supervisor.start(f"ext_proc-{i}", [
                py, "-m", "ext_proc", "--port", str(port), "--xds", self.admin_address, "--node-id", f"ext-proc-{i}",
                "--metrics-port", str(metrics_port),
                # gRPC must take any body Envoy buffered, plus the message's own framing.
                "--max-message-bytes", str(self.max_request_bytes + 64 * 1024),
                *server_flags(self.server_tls), *client_flags(self.client_tls, "xds")])
        xds = Address(host="127.0.0.1", port=self.xds_port)
        for e in self.envoys:
            bootstrap = self.run_dir / f"{e.node_id}.yaml"
            bootstrap.write_text(render_bootstrap(node_id=e.node_id, node_cluster=e.group, admin_port=e.admin_port,
                                                  xds=xds, delta=self.delta_xds, xds_tls=self.client_tls,
                                                  xds_server_name=self.tls_server_name))
            # The access log reaches its file within a second (Envoy's default flush interval is 10 s).
            self.supervisor.start(e.node_id, [envoy_binary(), "-c", str(bootstrap), "--log-level", "warn",
                                              "--disable-hot-restart", "--file-flush-interval-msec", "1000"])

    def _wait_ready(self, deadline: float) -> None:
        """Every Envoy LIVE (it applied, so ACKed, its first config); then one request per model
        through every Envoy must pass ext_proc (policies loaded) and reach an engine."""
        def live(e: EnvoyNode) -> bool:
            status, body = _http("GET", f"{e.admin_url}/ready")
            return status == 200 and body.strip() == b"LIVE"

        checks = [(f"{e.node_id} LIVE", lambda e=e: live(e)) for e in self.envoys]
        ok = {200} if self.probe_headers or not self.catalog.tenants else {200, 401}
        checks += [(f"{m.name} via {e.node_id}",
                    lambda e=e, m=m: _http("POST", *probe(e.url, m), timeout_s=10, headers=self.probe_headers)[0] in ok)
                   for e in self.envoys for m in self.catalog.models]
        while checks:
            self.supervisor.check()
            if time.monotonic() > deadline:
                raise NotReady(f"gateway not ready; still waiting for: {', '.join(c for c, _ in checks)} "
                               f"(logs in {self.run_dir})")
            if checks[0][1]():
                checks.pop(0)
            else:
                time.sleep(0.05)
