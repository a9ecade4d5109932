"""The heartbeat monitor: pure bookkeeping of who stayed silent too long."""

from __future__ import annotations

import pytest

from vmemu.hypervisor.heartbeat import HeartbeatMonitor


def test_node_is_overdue_only_after_misses_times_interval_of_silence() -> None:
    m = HeartbeatMonitor(interval=0.25, misses=4)  # binary fractions: exact arithmetic
    assert m.limit == 1.0
    m.watch(1, now=10.0)
    assert m.overdue(10.0) == []
    assert m.overdue(11.0) == []  # exactly at the limit: not yet
    assert m.overdue(11.0625) == [1]


def test_beats_keep_a_node_alive() -> None:
    m = HeartbeatMonitor(interval=0.05, misses=4)
    m.watch(1, 0.0)
    for k in range(1, 100):
        m.beat(1, k * 0.05)
        assert m.overdue(k * 0.05 + 0.1) == []
    assert m.count[1] == 99
    assert m.overdue(99 * 0.05 + 0.21) == [1]


def test_out_of_order_beat_does_not_move_the_last_beat_back() -> None:
    m = HeartbeatMonitor(interval=1.0, misses=2)
    m.watch(1, 0.0)
    m.beat(1, 5.0)
    m.beat(1, 3.0)
    assert m.age(1, 6.0) == pytest.approx(1.0)


def test_watch_gives_a_fresh_incarnation_a_full_grace_period() -> None:
    m = HeartbeatMonitor(interval=0.1, misses=3)
    m.watch(1, 0.0)
    assert m.overdue(100.0) == [1]
    m.watch(1, 100.0)  # restarted: its silence before now does not count
    assert m.overdue(100.29) == []
    assert m.count[1] == 0
    assert m.overdue(100.31) == [1]


def test_beat_from_an_unwatched_node_is_ignored() -> None:
    m = HeartbeatMonitor(interval=0.1, misses=3)
    m.beat(7, 1.0)
    assert m.age(7, 2.0) is None
    assert m.overdue(1000.0) == []


def test_forget_stops_reporting_a_node() -> None:
    m = HeartbeatMonitor(interval=0.1, misses=3)
    m.watch(1, 0.0)
    m.watch(2, 0.0)
    m.forget(1)
    assert m.overdue(10.0) == [2]
    assert m.age(1, 10.0) is None
    m.beat(1, 11.0)  # a late beat of the forgotten incarnation does not revive it
    assert m.overdue(20.0) == [2]
    m.forget(1)  # twice: fine


def test_overdue_lists_nodes_sorted_and_age_is_never_negative() -> None:
    m = HeartbeatMonitor(interval=0.1, misses=2)
    for n in (3, 1, 2):
        m.watch(n, 0.0)
    assert m.overdue(1.0) == [1, 2, 3]
    assert m.age(1, -5.0) == 0.0


def test_a_main_loop_silent_past_the_limit_is_stalled() -> None:
    from vmemu.hypervisor.heartbeat import HeartbeatMonitor

    m = HeartbeatMonitor(interval=0.1, misses=5)
    assert not m.stalled(9.9, 10.0)
    assert m.stalled(10.1, 10.0)


def test_time_domain0_itself_did_not_run_is_not_counted_as_silence() -> None:
    m = HeartbeatMonitor(interval=0.05, misses=10)  # limit 0.5 s
    m.watch(1, 0.0)
    m.own_turn(0.02, tick_s=0.02)  # an ordinary turn: nothing credited
    assert m.own_stalls == 0 and m.last[1] == 0.0
    m.own_turn(1.62, tick_s=0.02)  # Domain 0 descheduled for 1.6 s: 1.5 s credited
    assert m.own_stalls == 1
    assert m.overdue(1.62) == []
    assert m.overdue(2.2) == [1]  # a real silence after it is still caught


def test_a_domain0_that_stalls_every_turn_still_detects_a_hang() -> None:
    m = HeartbeatMonitor(interval=0.05, misses=10)
    m.watch(1, 0.0)
    now, turns = 0.0, 0
    while not m.overdue(now):
        now += 0.5  # every turn 0.5 s: 0.12 s of each counted
        m.own_turn(0.5, tick_s=0.02)
        turns += 1
        assert turns < 100
    assert turns == 5  # 5 x 0.12 s > the 0.5 s limit
