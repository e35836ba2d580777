"""A real Triton Inference Server on this machine's CPU, serving a model repository shaped like a
TensorRT-LLM deployment, for tests and benchmarks.

`python -m engines.real.triton install | repo DIR | serve`

- `install`: the tritonserver binary (2.51.0), its libraries and the Python backend, unpacked from
  PyPI's nvidia-pytriton wheel into .real-engines/ (no venv: nothing of pytriton's Python is used).
- `write_repository`: three models over ONE paged KV pool, as clients of a TensorRT-LLM deployment
  see them: `tensorrt_llm` (a Python-backend stand-in for the engine that owns the pool and publishes
  TensorRT-LLM's nv_trt_llm_* metrics), `ensemble` (Triton's ensemble over it) and `tensorrt_llm_bls`
  (a Python model that calls it by BLS). The models' sources are files under triton_models/.
- `TritonServer`: the binary on 127.0.0.1 free ports, started and stopped with kvgate's Supervisor.

The models' Python: the Python backend stub embeds the libpython of the interpreter that starts the
server (put first on its LD_LIBRARY_PATH), and the models import numpy and tokenizers from a folder
that install() fills beside the backend (Installation.python_packages), not from a venv: Triton
2.51's stub misreads BYTES tensors under numpy 2, which the project's main venv has, so the models
need numpy 1.x of their own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from kvgate.cli.processes import Child, Supervisor, free_port

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO / ".real-engines"
PYTRITON = "nvidia-pytriton==0.7.0"
TRITON_VERSION = "2.51.0"  # the tritonserver that PYTRITON bundles
# What the models import (numpy 1.x: see the module's docstring). tokenizers as the project asks for it,
# so that it reads the tokenizer.json files the main venv's tokenizers writes.
MODEL_PACKAGES = ("numpy==1.26.4", "tokenizers>=0.20")
MODELS_SOURCE = Path(__file__).resolve().parent / "triton_models"
# What clients call, all three over one KV pool; tensorrt_llm owns it.
ENGINE = "tensorrt_llm"
MODELS = ("ensemble", "tensorrt_llm_bls", ENGINE)
# Copied into every Python model's version folder, next to its model.py.
_COMMON_MODULES = ("backend_packages.py", "parent_watch.py", "trtllm_metrics.py")
RECORD_FILE = "tensorrt_llm.jsonl"
_INSTALLED_MARKER = "kvgate-installed.json"
# A stub sees its server gone within 0.5 s (triton_models/common/parent_watch.py).
STUB_EXIT_S = 5.0


def _log(message: str) -> None:
    print(f"[triton] {message}", flush=True)


@dataclass(frozen=True)
class Installation:
    """An unpacked nvidia-pytriton wheel: the server keeps the wheel's layout, whose RPATHs point at
    its nvidia_pytriton.libs folder."""

    root: Path

    @property
    def tritonserver(self) -> Path:
        return self.root / "pytriton" / "tritonserver" / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "pytriton" / "tritonserver" / "backends"

    @property
    def python_stub(self) -> Path:
        return self.backends / "python" / "triton_python_backend_stub"

    @property
    def python_packages(self) -> Path:
        """MODEL_PACKAGES; triton_models/common/backend_packages.py finds them here."""
        return self.backends / "python" / "kvgate-packages"


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def install(root: Path = DEFAULT_ROOT) -> Installation:
    """Unpack Triton from PyPI's nvidia-pytriton wheel into `root`/triton-<version>/, with the Python
    backend stub of the running Python and MODEL_PACKAGES for it. A no-op when its marker says the same
    wheel, Python and packages."""
    target = Installation(root / f"triton-{TRITON_VERSION}")
    wanted = {"wheel": PYTRITON, "python": _python_version(), "packages": list(MODEL_PACKAGES)}
    marker = target.root / _INSTALLED_MARKER
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return target
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".triton-") as scratch:
        _log(f"downloading {PYTRITON} (55 MB)")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", scratch, PYTRITON], check=True)
        (wheel,) = Path(scratch).glob("*.whl")
        staged = Installation(Path(scratch) / "unpacked")
        _unpack_server(wheel, staged.root)
        stub = staged.root / "pytriton/tritonserver/python_backend_stubs" / _python_version()
        shutil.copy2(stub / staged.python_stub.name, staged.python_stub)
        _log(f"installing {' '.join(MODEL_PACKAGES)} for the models (90 MB)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:",
                        "--target", str(staged.python_packages), *MODEL_PACKAGES], check=True)
        (staged.root / _INSTALLED_MARKER).write_text(json.dumps(wanted))
        shutil.rmtree(target.root, ignore_errors=True)
        staged.root.rename(target.root)
    _log(f"installed into {target.root} in {time.monotonic() - started:.1f} s")
    return target


def _unpack_server(wheel: Path, into: Path) -> None:
    """The wheel's tritonserver/ tree and its libraries, with their file modes (zipfile drops them)."""
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if not info.filename.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
                continue
            path = Path(archive.extract(info, into))
            mode = info.external_attr >> 16
            if mode and not info.is_dir():
                path.chmod(mode & 0o755)


def write_repository(directory: Path, pool_blocks: int, tokens_per_block: int, *, inter_token_ms: float = 5.0,
                     max_batch: int = 16, decoupled: bool = True, tokenizer_json: Path | None = None,
                     add_special_tokens: bool = False, record_dir: Path | None = None) -> Path:
    """Triton's model repository in `directory` (its models replaced): MODELS over one pool of
    `pool_blocks` KV blocks of `tokens_per_block` tokens. Prompt tokens are counted with
    `tokenizer_json` (one per UTF-8 byte without it); the engine generates a token every
    `inter_token_ms` and runs at most `max_batch` requests at once. `decoupled` models stream (and
    Triton refuses unary infer for them, the ensemble included); the others serve unary infer and
    refuse `stream`. With `record_dir`, every request the engine ran is appended to
    `record_dir`/RECORD_FILE (read_records)."""
    values = {
        "pool_blocks": pool_blocks,
        "tokens_per_block": tokens_per_block,
        "inter_token_ms": inter_token_ms,
        "max_batch": max_batch,
        "decoupled": str(decoupled).lower(),
        "tokenizer_json": tokenizer_json.resolve() if tokenizer_json else "",
        "add_special_tokens": str(add_special_tokens).lower(),
        "record_file": (record_dir.resolve() / RECORD_FILE) if record_dir else "",
    }
    if record_dir:
        record_dir.mkdir(parents=True, exist_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        target = directory / model
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(MODELS_SOURCE / model, target, ignore=shutil.ignore_patterns("__pycache__"))
        config = target / "config.pbtxt"
        config.write_text(Template(config.read_text()).substitute(values))
        version = target / "1"
        version.mkdir(exist_ok=True)  # an ensemble's version folder is empty, which git does not keep
        if (version / "model.py").exists():
            for module in _COMMON_MODULES:
                shutil.copy2(MODELS_SOURCE / "common" / module, version / module)
    return directory


def read_records(record_dir: Path) -> list[dict[str, Any]]:
    """The requests the engine ran (or refused), oldest first: one dict per request, with its
    prompt, prompt_tokens, max_tokens, blocks, whether it waited, and its outcome."""
    path = record_dir / RECORD_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@dataclass
class TritonServer:
    """The real tritonserver on `repository`, on 127.0.0.1 free ports; it dies with its parent."""

    installation: Installation
    repository: Path
    log_dir: Path
    exit_timeout_s: int = 2  # in-flight requests get this long at stop (Triton's default is 30 s)
    host: str = "127.0.0.1"
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    _supervisor: Supervisor | None = field(default=None, init=False, repr=False)

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        return self.log_dir / "tritonserver.log"

    @property
    def child(self) -> Child:
        assert self._supervisor is not None and self._supervisor.children, "not started"
        return self._supervisor.children[0]

    @property
    def _shm_prefix(self) -> str:
        """The names of the Python backend's regions in /dev/shm, unique to this server."""
        return f"kvgate_triton_{os.getpid()}_{self.http_port}_"

    def argv(self) -> list[str]:
        return [
            str(self.installation.tritonserver),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.installation.backends}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
        ]

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server and return once it and every model of MODELS are ready."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._supervisor = Supervisor(self.log_dir)
        # The stub embeds this interpreter's libpython (the one install() fetched the packages for),
        # rather than whichever libpython3.x.so the system's loader cache has.
        libdir = sysconfig.get_config_var("LIBDIR")
        library_path = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
        self._supervisor.start("tritonserver", self.argv(), env={"LD_LIBRARY_PATH": library_path})
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        assert self._supervisor is not None
        paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in MODELS)]
        deadline = time.monotonic() + timeout_s
        while paths:
            self._supervisor.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"tritonserver not ready after {timeout_s} s ({paths[0]}); last log lines:\n"
                                   f"{self.child.log_tail()}")
            try:
                with urllib.request.urlopen(self.http_url + paths[0], timeout=2):
                    paths.pop(0)
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)

    def _stub_pids(self) -> list[int]:
        """The live processes whose arguments name this server's shm prefix: its Python backend stubs
        (and the server itself while it runs)."""
        pids = []
        for process in Path("/proc").iterdir():
            try:
                if process.name.isdigit() and self._shm_prefix.encode() in (process / "cmdline").read_bytes():
                    pids.append(int(process.name))
            except OSError:  # it has just exited
                pass
        return pids

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited when in-flight requests have had their time; then
        wait for its Python backend stubs (SIGKILL after STUB_EXIT_S) and remove the shared-memory
        regions they leave when the server exits with requests in flight."""
        if self._supervisor is None:
            return
        self._supervisor.stop_all(timeout_s=self.exit_timeout_s + 10)
        self._supervisor = None
        deadline = time.monotonic() + STUB_EXIT_S
        while (stubs := self._stub_pids()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in stubs:
            os.kill(pid, signal.SIGKILL)
        for region in Path("/dev/shm").glob(self._shm_prefix + "*"):
            region.unlink(missing_ok=True)

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool-blocks", type=int, default=64)
    parser.add_argument("--tokens-per-block", type=int, default=32)
    parser.add_argument("--inter-token-ms", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--not-decoupled", dest="decoupled", action="store_false",
                        help="serve unary infer instead of streaming")
    parser.add_argument("--tokenizer-json", type=Path)
    parser.add_argument("--add-special-tokens", action="store_true")
    parser.add_argument("--record-dir", type=Path)


def _write(directory: Path, args: argparse.Namespace) -> Path:
    return write_repository(directory, args.pool_blocks, args.tokens_per_block, inter_token_ms=args.inter_token_ms,
                            max_batch=args.max_batch, decoupled=args.decoupled, tokenizer_json=args.tokenizer_json,
                            add_special_tokens=args.add_special_tokens, record_dir=args.record_dir)


def _serve(args: argparse.Namespace) -> None:
    installation = install(args.root)
    with tempfile.TemporaryDirectory(prefix="kvgate-triton-") as scratch:
        repository = args.repository or _write(Path(scratch) / "models", args)
        server = TritonServer(installation, repository, args.log_dir or Path(scratch))
        server.start()
        print(json.dumps({"http": server.http_url, "grpc": server.grpc_address, "metrics": server.metrics_url,
                          "models": list(MODELS), "repository": str(repository), "log": str(server.log_path)}),
              flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while server.child.proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engines.real.triton", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where install() unpacks Triton")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("install", help="unpack Triton from PyPI's nvidia-pytriton (a no-op once done)")
    repo = commands.add_parser("repo", help="write the model repository into DIR")
    repo.add_argument("directory", type=Path)
    _engine_options(repo)
    serve = commands.add_parser("serve", help="serve a repository (default: a fresh one) until Ctrl-C")
    serve.add_argument("--repository", type=Path, help="an existing repository (engine options then unused)")
    serve.add_argument("--log-dir", type=Path)
    _engine_options(serve)
    args = parser.parse_args(argv)
    if args.command == "install":
        print(install(args.root).root)
    elif args.command == "repo":
        print(_write(args.directory, args))
    else:
        _serve(args)


if __name__ == "__main__":
    main()
