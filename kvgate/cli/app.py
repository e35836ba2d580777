"""The `kvgate` command: `up` runs a whole gateway, `check` validates a catalog and prints what it renders."""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, NoReturn, TypeVar

import typer
import watchfiles
import yaml
from google.protobuf import json_format

from engines import assets
from kvgate import api_keys, tls
from kvgate.cli import admin_client
from kvgate.catalog import SIM, Address, Catalog, CatalogError, Model, bundled_catalog_path, load_catalog
from kvgate.cli.gateway import Gateway, NotReady
from kvgate.cli.processes import Child, ProcessDied
from kvgate.cli.workers import DEFAULT_WORKERS, split_budget_errors
from xds_server.settings import GatewaySettings
from xds_server.control import render
from xds_server.resource_types import BUDGET_SHARES, PUSH_ORDER
from xds_server.snapshot import Snapshot

T = TypeVar("T")

app = typer.Typer(help="kvgate: an LLM gateway on Envoy that admits requests by the KV cache they can claim.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

CatalogOption = Annotated[Path, typer.Option(help="Model catalog (YAML); default: the bundled simulated models")]


def _load(path: Path) -> Catalog:
    try:
        return load_catalog(path)
    except CatalogError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None


def _raise_exit(signum: int, _frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


@app.command()
def up(catalog: CatalogOption = bundled_catalog_path(),
       port: Annotated[int, typer.Option(help="Gateway port")] = 8080,
       host: Annotated[str, typer.Option(help="Gateway address")] = "127.0.0.1",
       xds_port: Annotated[int, typer.Option(help="Control-plane port (xDS and the admin API)")] = 18000,
       status_port: Annotated[int, typer.Option(help="Control plane's status page and /metrics")] = 18080,
       run_dir: Annotated[Path | None, typer.Option(help="Where logs and rendered files go")] = None,
       ext_proc_workers: Annotated[int, typer.Option(
           min=1, help="ext_proc processes; each admits from 1/N of every endpoint's KV budget")] = DEFAULT_WORKERS,
       ) -> None:
    """Start engines (for `sim` endpoints), xds_server, ext_proc and Envoy; stop them all on Ctrl-C/SIGTERM."""
    cat = _load(catalog)
    if errors := split_budget_errors(cat, ext_proc_workers):
        typer.echo(f"--ext-proc-workers {ext_proc_workers}: each worker admits from 1/{ext_proc_workers} of every "
                   "KV budget, too little for:\n  " + "\n  ".join(errors), err=True)
        raise typer.Exit(2)
    workdir = run_dir or Path(tempfile.mkdtemp(prefix="kvgate-"))
    # SIGTERM unwinds like Ctrl-C, through the `finally` that stops every child. SIGINT too, even when
    # a script started us in the background: its shell makes background jobs ignore SIGINT, and
    # Python then keeps it ignored instead of raising KeyboardInterrupt.
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    gateway = Gateway(cat, run_dir=workdir, host=host, port=port, xds_port=xds_port, xds_http_port=status_port,
                      extra_ext_procs=ext_proc_workers - 1)
    typer.echo(f"starting kvgate ({len(cat.models)} models, {ext_proc_workers} ext_proc worker"
               f"{'s' if ext_proc_workers > 1 else ''}; logs in {workdir}) ...", err=True)
    try:
        gateway.start()
        typer.echo(f"kvgate ready: {gateway.url}  (OpenAI base_url {gateway.url}/v1; Ctrl-C stops)")
        typer.echo(f"  control plane: 127.0.0.1:{xds_port} (kvgate status, kvgate models ...)", err=True)
        typer.echo(f"  status page: {gateway.status_url}", err=True)
        for m in gateway.catalog.models:
            engines = ", ".join(f"{a} (gRPC {a.grpc_port})" if a.grpc_port else str(a) for a in m.addresses())
            typer.echo(f"  {m.name} ({m.protocol}): {engines}", err=True)
        gateway.supervise(_report_restart)
        _serve_changes(catalog, gateway, ext_proc_workers)
    except (NotReady, ProcessDied) as e:
        typer.echo(f"kvgate failed: {e}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass
    finally:
        gateway.stop()
        typer.echo("kvgate stopped", err=True)


def _report_restart(child: Child, code: int) -> None:
    typer.echo(f"kvgate: {child.name} exited with code {code}; started again (restart {child.restarts}). "
               f"Its last log lines:\n{child.log_tail(10)}", err=True)


def _serve_changes(path: Path, gateway: Gateway, workers: int) -> None:
    """Until interrupted: serve every valid save of the catalog file; an invalid one is refused and
    changes nothing."""
    path = path.resolve()
    for changes in watchfiles.watch(path.parent, watch_filter=lambda _c, p: Path(p) == path, debounce=50):
        try:
            cat = load_catalog(path)
            _render(cat)
            if errors := split_budget_errors(cat, workers):
                raise CatalogError(f"with {workers} ext_proc workers: " + "; ".join(errors))
        except CatalogError as e:
            typer.echo(f"catalog change refused (still serving the previous one):\n{e}", err=True)
            continue
        gateway.reload(cat)
        typer.echo(f"catalog reloaded: {', '.join(m.name for m in cat.models)}", err=True)


def _render(cat: Catalog, port: int = 8080) -> Snapshot:
    """Everything the control plane would serve for `cat`; raises CatalogError if it can't."""
    return render(_placeholders(cat), GatewaySettings(listen=Address(host="127.0.0.1", port=port)))


def _placeholders(cat: Catalog) -> Catalog:
    """`sim` endpoints get their ports at `kvgate up`; show them as consecutive placeholder ports."""
    ports = iter(range(18001, 65535))

    def placeholder(m: Model) -> Address:
        return Address(host="127.0.0.1", port=next(ports),
                       grpc_port=next(ports) if m.protocol == "triton" else None)

    return cat.with_endpoints({m.name: [placeholder(m) for e in m.endpoints if e == SIM] for m in cat.models})


@app.command()
def check(catalog: Annotated[Path, typer.Argument(help="Catalog file to validate")],
          port: Annotated[int, typer.Option(help="Gateway port to render")] = 8080) -> None:
    """Validate a catalog and print every resource the control plane would serve (a dry run)."""
    cat = _load(catalog)
    try:
        snapshot = _render(cat, port)
    except CatalogError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    docs = [{"type_url": t, "version_info": snapshot.get(t).version,
             "resources": [json.loads(json_format.MessageToJson(r, preserving_proto_field_name=True))
                           for r in snapshot.get(t).items.values()]}
            for t in PUSH_ORDER if t != BUDGET_SHARES]  # shares follow the running replicas, not the catalog
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False, explicit_start=True)
    typer.echo(f"# catalog OK: {len(cat.models)} models; `sim` endpoints shown at placeholder ports", err=True)


models = typer.Typer(help="Read and change the served catalog through the control plane's admin API.",
                     no_args_is_help=True)
app.add_typer(models, name="models")
ServerOption = Annotated[str, typer.Option(help="Control plane (xds_server) address")]
# The admin API over TLS: --ca turns it on; --cert/--key answer a control plane that requires mutual TLS.
CaOption = Annotated[Path | None, typer.Option(help="PEM CA that signed the control plane's certificate (TLS)")]
CertOption = Annotated[Path | None, typer.Option(help="PEM client certificate, for mutual TLS (with --ca)")]
KeyOption = Annotated[Path | None, typer.Option(help="PEM private key of --cert")]


def _tls(ca: Path | None, cert: Path | None, key: Path | None) -> tls.TlsFiles | None:
    try:
        return tls.client_tls(ca, cert, key)
    except tls.TlsError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None


def _admin(call: Callable[[], T]) -> T:
    try:
        return call()
    except admin_client.AdminError as e:
        typer.echo(f"refused: {e}", err=True)
        raise typer.Exit(1) from None


@models.command("list")
def models_list(server: ServerOption = admin_client.DEFAULT_SERVER,
                ca: CaOption = None, cert: CertOption = None, key: KeyOption = None) -> None:
    """Print the catalog being served (catalog YAML)."""
    files = _tls(ca, cert, key)
    resp = _admin(lambda: admin_client.list_models(server, files))
    typer.echo(f"# version {resp.version}\n{resp.catalog_yaml}", nl=False)


@models.command("apply")
def models_apply(file: Annotated[Path, typer.Argument(help="YAML: a list of models, or a catalog")],
                 server: ServerOption = admin_client.DEFAULT_SERVER,
                 ca: CaOption = None, cert: CertOption = None, key: KeyOption = None) -> None:
    """Add or replace models; the whole resulting catalog is validated before anything changes."""
    files = _tls(ca, cert, key)
    resp = _admin(lambda: admin_client.apply_models(server, file.read_text(), files))
    typer.echo(f"{'applied' if resp.changed else 'unchanged'}: version {resp.version}")


@models.command("remove")
def models_remove(name: str, server: ServerOption = admin_client.DEFAULT_SERVER,
                  ca: CaOption = None, cert: CertOption = None, key: KeyOption = None) -> None:
    """Stop serving a model."""
    files = _tls(ca, cert, key)
    resp = _admin(lambda: admin_client.remove_model(server, name, files))
    typer.echo(f"removed {name}: version {resp.version}")


engines_app = typer.Typer(help="What real engines need, generated from the catalog.", no_args_is_help=True)
app.add_typer(engines_app, name="engines")


@engines_app.command("render", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                                  "help_option_names": []})
def engines_render(ctx: typer.Context) -> None:
    """CATALOG OUT_DIR [options]: Triton model repositories and trtllm-serve commands (--help for options)."""
    raise typer.Exit(assets.main(list(ctx.args)))


keys = typer.Typer(help="API keys of tenants (catalog `tenants:`).", no_args_is_help=True)
app.add_typer(keys, name="keys")


@keys.command("new")
def keys_new() -> None:
    """A new random API key (give it to the tenant) and its sha256 (put it in the catalog)."""
    key, digest = api_keys.new_key()
    typer.echo(f"key:    {key}\nsha256: {digest}")


@app.command()
def status(server: ServerOption = admin_client.DEFAULT_SERVER,
           ca: CaOption = None, cert: CertOption = None, key: KeyOption = None) -> None:
    """Every Envoy and ext_proc replica connected to the control plane, and what each has ACKed."""
    files = _tls(ca, cert, key)
    resp = _admin(lambda: admin_client.status(server, files))
    typer.echo(f"serving version {resp.version}; {len(resp.nodes)} nodes")
    for n in resp.nodes:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(n.connected_since_unix))
        typer.echo(f"- {n.id} (group {n.group}), connected since {since} UTC")
        if n.HasField("budget_share"):
            typer.echo(f"    budget share: {n.budget_share:.3f} of every endpoint's KV budget")
        for type_url, version in sorted(n.acked_versions.items()):
            typer.echo(f"    {type_url.rsplit('.', 1)[-1]}: ACKed {version}")
        if n.HasField("last_nack"):
            typer.echo(f"    last NACK: {n.last_nack.type_url.rsplit('.', 1)[-1]} {n.last_nack.version or '-'}: "
                       f"{n.last_nack.error_detail}")

