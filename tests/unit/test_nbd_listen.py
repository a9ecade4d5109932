"""An identity's NBD listeners (domains/nbd_listen.py): a taken address does not keep the
identity from being served, is retried in the background and reported once each way; a
bind without retry fails whole; Unix sockets replaced when stale, unlinked only if ours."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from domains import nbd_listen as L
from vmemu.errors import VmemuError


def holder() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def listeners(addr: tuple[str, int] | None, path: Path | None
              ) -> tuple[L.Listeners, list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    lst = L.Listeners(2, (lambda ident: addr) if addr else None,
                      (lambda ident: path) if path else None,
                      emit=lambda kind, fields: events.append((kind, fields)))
    return lst, events


def test_a_taken_address_is_retried_in_the_background(tmp_path):
    h = holder()
    addr = h.getsockname()
    lst, events = listeners(addr, tmp_path / "n1.nbd.s")
    try:
        lst.bind(1, deadline_s=0.05, retry=True)  # does not raise: served without it
        assert lst.tcp_socket(1) is None and 1 in lst.served
        assert [ep.kind for ep in lst.by_fd.values()] == ["unix"]  # the other listener is up
        [(kind, f)] = events
        assert kind == "nbd_address_taken" and f["address"] == f"{addr[0]}:{addr[1]}"
        assert f["transport"] == "tcp" and f["error"].startswith("[EADDRINUSE]")
        assert f["holder_uid"] == os.geteuid() and "another user" not in f["holder"]
        view = lst.view()["1"]["tcp"]
        assert not view["listening"] and view["error"] and view["attempts"] >= 1
        tries = view["attempts"]
        lst.retry(time.monotonic())  # not yet due: no attempt
        assert lst.view()["1"]["tcp"]["attempts"] == tries
        lst.retry(time.monotonic() + L.RETRY_S)  # due, still taken: one attempt
        assert lst.view()["1"]["tcp"]["attempts"] == tries + 1 and len(events) == 1
        h.close()
        lst.retry(time.monotonic() + 2 * L.RETRY_S)
        s = lst.tcp_socket(1)
        assert s is not None and s.getsockname() == addr and s.fileno() in lst.by_fd
        assert events[-1][0] == "nbd_address_bound" and events[-1][1]["address"] == f["address"]
        assert lst.view()["1"]["tcp"] | {"attempts": 0} == {
            "address": f["address"], "listening": True, "error": None, "holder": None,
            "down_s": None, "attempts": 0}
        assert not lst.pending
        lst.retry(time.monotonic() + 10)  # nothing pending: nothing happens
        assert len(events) == 2
    finally:
        h.close()
        lst.close()
    assert not lst.by_fd and not lst.served


def test_without_retry_a_taken_address_fails_the_bind_whole(tmp_path):
    h = holder()
    lst, events = listeners(h.getsockname(), tmp_path / "n1.nbd.s")
    try:
        with pytest.raises(VmemuError, match="cannot serve NBD for node1 on 127.0.0.1"):
            lst.bind(1, deadline_s=0.05)
        assert not lst.served and not lst.by_fd and not lst.pending and not events
    finally:
        h.close()
    # The TCP listener, bound first, does not stay when the Unix socket cannot be bound.
    path = tmp_path / "taken"
    path.write_text("")
    free = holder()
    addr = free.getsockname()
    free.close()
    lst, events = listeners(addr, path)
    with pytest.raises(VmemuError, match="cannot serve NBD for node1 on .*taken"):
        lst.bind(1, deadline_s=0.05)
    assert not lst.served and not lst.by_fd
    again = socket.socket()
    again.bind(addr)  # free again
    again.close()


def test_another_users_listener_is_not_waited_for(monkeypatch):
    h = holder()
    monkeypatch.setattr(L, "tcp_listener_uid", lambda host, port: 65534)
    lst, events = listeners(h.getsockname(), None)
    try:
        t0 = time.monotonic()
        lst.bind(1, deadline_s=5.0, retry=True)
        assert time.monotonic() - t0 < 1.0  # a takeover does not wait 5 s for a squatter
        assert events[0][1]["holder_uid"] == 65534
        assert "another user" in events[0][1]["holder"] or os.geteuid() == 65534
    finally:
        h.close()
        lst.close()


def test_unbind_forgets_a_pending_retry():
    h = holder()
    lst, events = listeners(h.getsockname(), None)
    try:
        lst.bind(1, deadline_s=0.0, retry=True)
        assert lst.pending
        lst.unbind(1)
        assert not lst.pending and not lst.served
        h.close()
        lst.retry(time.monotonic() + 10)
        assert [k for k, _ in events] == ["nbd_address_taken"] and not lst.by_fd
    finally:
        h.close()


def test_unix_socket_stale_replaced_and_only_ours_unlinked(tmp_path):
    path = tmp_path / "n1.nbd.s"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a server of this identity that died: its socket file stays
    stale.close()
    lst, _ = listeners(None, path)
    lst.bind(1)
    c = socket.socket(socket.AF_UNIX)
    c.connect(str(path))  # ours now
    c.close()
    lst.unbind(1)
    assert not path.exists()
    lst.bind(1)
    path.unlink()  # someone else's socket at the same path since
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    try:
        lst.unbind(1)
        assert path.is_socket()  # not ours: left alone
    finally:
        other.close()


def test_a_path_that_is_not_a_socket_is_not_removed(tmp_path):
    path = tmp_path / "n1.nbd.s"
    path.write_text("not a socket")
    lst, events = listeners(None, path)
    lst.bind(1, deadline_s=0.0, retry=True)
    try:
        assert path.read_text() == "not a socket"
        assert events[0][0] == "nbd_address_taken" and events[0][1]["transport"] == "unix"
    finally:
        lst.close()


def test_listener_uid_from_proc_net_tcp():
    h = holder()
    try:
        assert L.tcp_listener_uid(*h.getsockname()) == os.geteuid()
    finally:
        h.close()
    assert L.describe_uid(None) == ""
    assert L.describe_uid(os.geteuid()).startswith(f"uid {os.geteuid()} (")
