"""Child processes that die with their parent: start, watch, stop all (no orphans, ever)."""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
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


def _ephemeral_range() -> range:
    """The ports the kernel gives outgoing connections (and bind to port 0)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


# What `kvgate up` and its parts bind when not told otherwise: never handed out.
_DEFAULT_PORTS = frozenset({8080, 18000, 18080})


class _PortPicker:
    """Ports outside the ephemeral range, in turn from a random start. A port handed out is bound later
    by a child process; from the ephemeral range (bind to port 0) it could meanwhile become the local
    port of some outgoing connection, and the child would fail with "address already in use" (seen in
    CI). In turn: a process never hands out one port twice while it has unbound ones left."""

    def __init__(self) -> None:
        ephemeral = _ephemeral_range()
        self._ports = [p for p in range(1024, 65536) if p not in ephemeral and p not in _DEFAULT_PORTS]
        self._next = random.randrange(len(self._ports))
        self._lock = threading.Lock()

    def pick(self, host: str) -> int:
        with self._lock:
            for _ in range(len(self._ports)):
                port = self._ports[self._next]
                self._next = (self._next + 1) % len(self._ports)
                with socket.socket() as s:  # without SO_REUSEADDR: a port in TIME_WAIT is skipped too
                    try:
                        s.bind((host, port))
                    except OSError:
                        continue
                return port
        raise OSError(f"no free port on {host} outside the ephemeral range")


_PORTS = _PortPicker()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on or uses now, for a process about to bind it."""
    return _PORTS.pick(host)


def port_is_free(host: str, port: int) -> bool:
    """Whether a listener could bind `host:port` now. With SO_REUSEADDR, as Envoy binds it: connections
    of a gateway that just stopped linger in TIME_WAIT for a minute, and they do not stop Envoy."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class ProcessDied(RuntimeError):
    pass


@dataclass(frozen=True)
class Backoff:
    """How soon a dead child is started again: at once the first time, then twice as long after each
    death that came soon after its start, up to `max_s`; a child that ran `healthy_after_s` is forgiven."""

    first_s: float = 0.0
    second_s: float = 0.2
    max_s: float = 5.0
    healthy_after_s: float = 10.0

    def delay(self, previous_s: float | None, lived_s: float) -> float:
        if previous_s is None or lived_s >= self.healthy_after_s:
            return self.first_s
        return min(self.max_s, max(self.second_s, previous_s * 2))


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str]
    env: dict[str, str] | None = None
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0
    # Set once it is seen dead: when, and how long it waits before it is started again.
    died_at: float | None = None
    delay_s: float | None = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Supervisor:
    log_dir: Path
    children: list[Child] = field(default_factory=list)
    backoff: Backoff = field(default_factory=Backoff)
    # start/restart/revive may run on a watcher thread while the main thread reloads or stops.
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        with self._lock:
            child = self._spawn(name, argv, env)
            self.children.append(child)
        return child

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None) -> Child:
        log_path = self.log_dir / f"{name}.log"
        command, options = _dying_with_parent(argv)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})}, **options)  # type: ignore[call-overload]
        return Child(name, proc, log_path, argv, env)

    def _replace(self, old: Child, argv: list[str] | None = None) -> Child:
        """A new process in `old`'s place (stop order is start order reversed)."""
        new = self._spawn(old.name, argv or old.argv, old.env)
        self.children[self.children.index(old)] = new
        return new

    def get(self, name: str) -> Child | None:
        with self._lock:
            return next((c for c in self.children if c.name == name), None)

    def restart(self, name: str, *, argv: list[str] | None = None, kill: bool = False) -> Child:
        """Stop a child (SIGKILL if `kill`: a crash) and start it again, with the same command or `argv`."""
        with self._lock:
            old = self.get(name)
            assert old is not None, f"no child named {name}"
            old.proc.kill() if kill else old.proc.terminate()
            old.proc.wait()
            return self._replace(old, argv)

    def check(self) -> None:
        """Raise if any child has exited: a gateway with a dead part must not look healthy."""
        for c in list(self.children):
            if c.proc.poll() is not None:
                raise ProcessDied(f"{c.name} exited with code {c.proc.returncode}; last log lines:\n{c.log_tail()}")

    def revive(self, now: float | None = None) -> list[tuple[Child, int]]:
        """Start again every child that died, each once its backoff has passed; returns the new
        children with the exit code of the ones they replace."""
        now = time.monotonic() if now is None else now
        revived = []
        with self._lock:
            for c in list(self.children):
                if c.proc.poll() is None:
                    continue
                if c.died_at is None:
                    c.died_at, c.delay_s = now, self.backoff.delay(c.delay_s, now - c.started_at)
                if now < c.died_at + (c.delay_s or 0.0):
                    continue
                new = self._replace(c)
                new.restarts, new.delay_s = c.restarts + 1, c.delay_s
                revived.append((new, c.proc.returncode))
        return revived

    def stop_all(self, timeout_s: float = 5.0) -> None:
        """SIGTERM in reverse start order (Envoy first, engines last), then SIGKILL stragglers."""
        with self._lock:
            self._stop_all(timeout_s)

    def _stop_all(self, timeout_s: float) -> None:
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
