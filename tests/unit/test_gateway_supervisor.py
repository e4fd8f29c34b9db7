"""The pieces of ``gateway --processes N`` that need no gateway: the per-process settings, the
port reservation, the siblings directory."""

from __future__ import annotations

import socket
from pathlib import Path

from controlplane.gateway.main import GatewaySettings, Siblings
from controlplane.gateway.supervisor import process_settings, reserve_port
from workers.openai_main import listen_socket


def test_each_process_gets_the_shared_ports_and_its_own_id_and_files(tmp_path: Path) -> None:
    base = GatewaySettings(listen="0.0.0.0:0", processes=3, port_file="/x/port", late_hold_factor=2)
    s = process_settings(
        base, 1, listen="0.0.0.0:8123", grpc_listen="0.0.0.0:9123", run_dir=tmp_path, base="gw"
    )
    assert (s.processes, s.listen, s.grpc_listen) == (1, "0.0.0.0:8123", "0.0.0.0:9123")
    assert (s.gateway_id, s.reuse_port) == ("gw-1", True)
    assert s.port_file == str(tmp_path / "process-1.port")  # not the supervisor's
    assert s.siblings_dir == str(tmp_path / "siblings")
    assert s.late_hold_factor == 2  # everything else is the supervisor's settings


def test_a_reserved_port_is_shared_by_listeners_and_takes_no_connection() -> None:
    hold = reserve_port("127.0.0.1", 0)
    port = hold.getsockname()[1]
    a = listen_socket("127.0.0.1", port, reuse_port=True)
    b = listen_socket("127.0.0.1", port, reuse_port=True)
    try:
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(32)]
        accepted = {"a": 0, "b": 0}
        for name, sock in (("a", a), ("b", b)):
            sock.settimeout(0.5)
            while True:
                try:
                    sock.accept()[0].close()
                    accepted[name] += 1
                except TimeoutError:
                    break
        assert accepted["a"] + accepted["b"] == 32
        assert accepted["a"] > 0 and accepted["b"] > 0  # spread (by the 4-tuple's hash)
        for c in clients:
            c.close()
        # a listener without SO_REUSEPORT cannot take the reserved port
        plain = socket.socket()
        try:
            plain.bind(("127.0.0.1", port))
            raise AssertionError("bound a reserved port")
        except OSError:
            pass
        finally:
            plain.close()
    finally:
        for sock in (a, b, hold):
            sock.close()


def test_siblings_see_each_other_not_themselves(tmp_path: Path) -> None:
    one, two = Siblings(tmp_path, "gw-0"), Siblings(tmp_path, "gw-1")
    assert one.others() == []
    two.publish(4321)
    one.publish(1234)
    (tmp_path / ".gw-2.tmp").write_text("127.0.0.1:9")  # half-written: not a sibling yet
    assert one.others() == ["127.0.0.1:4321"]
    assert two.others() == ["127.0.0.1:1234"]
    two.withdraw()
    assert one.others() == []
    two.withdraw()  # twice is fine
