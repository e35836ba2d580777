"""Child processes that die with their parent: start, watch, stop all (no orphans, ever)."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1
# util-linux's setpriv sets the parent-death signal and execs the child. Python then spawns without
# a preexec_fn (vfork/exec, no Python code between fork and exec): a plain fork of a process whose
# grpc threads are running sometimes crashed the child before exec.
_SETPRIV = shutil.which("setpriv")


def _die_with_parent() -> None:
    # Linux: the kernel sends SIGTERM to the child if the parent dies, even by SIGKILL.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _dying_with_parent(argv: list[str]) -> tuple[list[str], dict[str, object]]:
    """argv and Popen options under which the child gets SIGTERM when its parent (thread) dies."""
    if _SETPRIV:
        return [_SETPRIV, "--pdeathsig", "TERM", "--", *argv], {}
    return argv, {"preexec_fn": _die_with_parent}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class ProcessDied(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str]
    env: dict[str, str] | None = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Supervisor:
    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log"
        command, options = _dying_with_parent(argv)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})}, **options)  # type: ignore[call-overload]
        child = Child(name, proc, log_path, argv, env)
        self.children.append(child)
        return child

    def get(self, name: str) -> Child | None:
        return next((c for c in self.children if c.name == name), None)

    def restart(self, name: str, *, argv: list[str] | None = None, kill: bool = False) -> Child:
        """Stop a child (SIGKILL if `kill`: a crash) and start it again, with the same command or `argv`."""
        old = self.get(name)
        assert old is not None, f"no child named {name}"
        old.proc.kill() if kill else old.proc.terminate()
        old.proc.wait()
        self.children.remove(old)
        return self.start(name, argv or old.argv, old.env)

    def check(self) -> None:
        """Raise if any child has exited: a gateway with a dead part must not look healthy."""
        for c in self.children:
            if c.proc.poll() is not None:
                raise ProcessDied(f"{c.name} exited with code {c.proc.returncode}; last log lines:\n{c.log_tail()}")

    def stop_all(self, timeout_s: float = 5.0) -> None:
        """SIGTERM in reverse start order (Envoy first, engines last), then SIGKILL stragglers."""
        for c in reversed(self.children):
            if c.proc.poll() is None:
                c.proc.terminate()
        deadline = time.monotonic() + timeout_s
        for c in self.children:
            try:
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
        self.children.clear()
