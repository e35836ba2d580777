"""kvgate/cli/processes.py: children started again when they die (with backoff when they keep dying),
in their place in the stop order, and a port probe that TIME_WAIT sockets do not fool."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from kvgate.cli.processes import Backoff, Supervisor, free_port, port_is_free

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
DIES = [sys.executable, "-c", "raise SystemExit(3)"]


def test_backoff_restarts_at_once_then_waits_longer_while_a_child_keeps_dying() -> None:
    b = Backoff(first_s=0.0, second_s=0.2, max_s=1.0, healthy_after_s=10.0)
    assert b.delay(None, lived_s=0.1) == 0.0  # its first death: at once
    assert b.delay(0.0, lived_s=0.1) == 0.2
    assert b.delay(0.2, lived_s=0.1) == 0.4
    assert b.delay(0.8, lived_s=0.1) == 1.0  # capped
    assert b.delay(1.0, lived_s=30.0) == 0.0  # it ran a while: forgiven


def test_a_dead_child_is_started_again_in_its_place(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    try:
        first, doomed, last = (sup.start(n, SLEEPER) for n in ("a", "b", "c"))
        doomed.proc.kill()
        doomed.proc.wait()
        assert sup.revive() == [(sup.children[1], -9)]
        assert [c.name for c in sup.children] == ["a", "b", "c"]
        assert sup.children[1].proc.poll() is None and sup.children[1].restarts == 1
        assert sup.children[0] is first and sup.children[2] is last
    finally:
        sup.stop_all()
    assert sup.children == []


def test_a_child_that_keeps_dying_waits_out_its_backoff(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, backoff=Backoff(first_s=0.0, second_s=5.0, max_s=5.0, healthy_after_s=10.0))
    try:
        child = sup.start("crashy", DIES)
        child.proc.wait()
        (revived, code), = sup.revive(now=child.started_at + 1)
        assert code == 3 and revived.restarts == 1
        revived.proc.wait()
        died = revived.started_at + 0.5
        assert sup.revive(now=died) == []  # seen dead: 5 s to wait
        assert sup.revive(now=died + 4.9) == []
        assert [r.restarts for r, _ in sup.revive(now=died + 5.0)] == [2]
    finally:
        sup.stop_all()


def test_a_port_in_time_wait_is_free_and_a_listening_one_is_not() -> None:
    """What a stopped gateway leaves behind: its listener (SO_REUSEADDR, as Envoy's is) closed, the
    connections it closed first in TIME_WAIT for a minute. A new Envoy could bind; so must the probe."""
    port = free_port()
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert not port_is_free("127.0.0.1", port)
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the server side closes first: its end of the connection goes to TIME_WAIT
        assert client.recv(1) == b""  # its FIN arrived
        client.close()
    assert port_is_free("127.0.0.1", port)
    plain = socket.socket()
    with pytest.raises(OSError):  # what the old probe, without SO_REUSEADDR, tripped over
        plain.bind(("127.0.0.1", port))
    plain.close()


def test_free_ports_are_distinct_bindable_and_never_ones_outgoing_connections_take() -> None:
    """A child binds the port later: one from the ephemeral range could meanwhile become the local port
    of some outgoing connection ("address already in use" for the child, seen in CI)."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == 500
    assert not any(low <= p <= high for p in ports)
    assert not {8080, 18000, 18080} & set(ports)
    for port in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
