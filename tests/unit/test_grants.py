"""The grant table: who may map which NVRAM region, and how (pure data, no I/O)."""

from __future__ import annotations

import pytest

from vmemu.errors import NotGranted
from vmemu.hypervisor.grants import RO, RW, GrantTable, Region

R1, R2 = 0x1100, 0x1200


def table(sealed: bool = True) -> GrantTable:
    t = GrantTable()
    t.register(Region(R1, owner=1, size=1 << 20, sealed=sealed))
    t.register(Region(R2, owner=2, size=1 << 20, sealed=sealed))
    return t


def test_partner_granted_read_only_may_map_read_only() -> None:
    t = table()
    t.grant(R1, 2, RO)
    assert t.check(R1, 2) == RO
    assert t.check(R1, 2, RO) == RO
    assert t.rows() == [{"region": f"{R1:#x}", "owner": "node1", "grantee": "node2",
                         "mode": RO, "owner_alive": True}]


def test_partner_cannot_write_a_read_only_grant() -> None:
    t = table()
    t.grant(R1, 2, RO)
    with pytest.raises(NotGranted, match="read-only"):
        t.check(R1, 2, RW)


def test_read_write_grant_on_an_unsealed_region_allows_read_write() -> None:
    t = table(sealed=False)
    t.grant(R1, 2, RW)
    assert t.check(R1, 2, RW) == RW
    assert t.check(R1, 2, RO) == RW


def test_read_write_grant_on_a_write_sealed_region_is_refused() -> None:
    t = table(sealed=True)
    with pytest.raises(NotGranted, match="write-sealed"):
        t.grant(R1, 2, RW)
    assert t.grants == {}
    with pytest.raises(NotGranted):
        t.check(R1, 2)


def test_check_of_an_unknown_region_is_not_granted() -> None:
    t = table()
    with pytest.raises(NotGranted, match="does not exist"):
        t.check(0xDEAD, 2)
    with pytest.raises(NotGranted, match="does not exist"):
        t.grant(0xDEAD, 2, RO)


def test_node_without_a_grant_is_not_granted() -> None:
    t = table()
    t.grant(R1, 2, RO)
    with pytest.raises(NotGranted, match="no grant"):
        t.check(R1, 3)
    with pytest.raises(NotGranted, match="no grant"):
        t.check(R2, 1)  # grants are not symmetric


def test_registering_a_region_twice_is_refused_and_keeps_the_first() -> None:
    t = table()
    with pytest.raises(NotGranted, match="already registered"):
        t.register(Region(R1, owner=3, size=1, sealed=False))
    assert t.regions[R1].owner == 1


def test_revoke_removes_only_that_grant_and_tolerates_a_missing_one() -> None:
    t = table()
    t.grant(R1, 2, RO)
    t.grant(R1, 3, RO)
    t.revoke(R1, 2)
    with pytest.raises(NotGranted):
        t.check(R1, 2)
    assert t.check(R1, 3) == RO
    t.revoke(R1, 2)  # again: nothing to do
    t.revoke(0xDEAD, 9)


def test_live_owner_needs_no_grant_but_its_next_incarnation_gets_one() -> None:
    t = table()
    t.grant(R1, 1, RO)  # the owner maps its own region directly
    assert t.grants == {}
    assert t.owner_died(1) == [R1]
    assert t.owner_died(1) == []  # reported once
    assert t.regions[R1].owner_alive is False
    t.grant(R1, 1, RO)  # node1's next incarnation replays its predecessor's region
    assert t.check(R1, 1) == RO


def test_remove_forgets_the_region_and_returns_every_grantee() -> None:
    t = table()
    t.grant(R1, 2, RO)
    t.grant(R1, 3, RO)
    t.grant(R2, 1, RO)
    assert sorted(t.remove(R1)) == [2, 3]
    assert R1 not in t.regions
    for node in (2, 3):
        with pytest.raises(NotGranted, match="does not exist"):
            t.check(R1, node)
    assert t.check(R2, 1) == RO
    assert t.remove(R1) == []


def test_read_only_grant_of_an_unsealed_region_is_refused() -> None:
    """Read-only means the kernel refuses writes: an unsealed memfd would reopen read-write."""
    t = table(sealed=False)
    with pytest.raises(NotGranted, match="not write-sealed"):
        t.grant(R1, 2, RO)
    assert t.grants == {}
