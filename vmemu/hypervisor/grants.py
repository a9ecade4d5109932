"""The grant table: which domain may map which NVRAM region, and how.

Pure data, no I/O: the fd broker asks `check()` before it hands over a descriptor, so a domain
that was not granted a region never gets a descriptor for it, and a read-only grantee only ever
gets an O_RDONLY descriptor of a write-sealed region.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmemu.errors import NotGranted

RO = "ro"
RW = "rw"


@dataclass
class Region:
    region_id: int
    owner: int  # node index
    size: int
    sealed: bool  # write-sealed after the owner mapped it (read-only grants)
    owner_alive: bool = True
    # Who allocated it: "" for the owner itself (--nvram-placement own), "mediator" when the
    # mediator domain did and Domain 0 handed it to the owner (--nvram-placement mediator).
    allocator: str = ""

    @property
    def allocated_by(self) -> str:
        return self.allocator or f"node{self.owner}"


@dataclass
class GrantTable:
    regions: dict[int, Region] = field(default_factory=dict)
    grants: dict[tuple[int, int], str] = field(default_factory=dict)  # (region, node) -> mode

    def register(self, region: Region) -> None:
        if region.region_id in self.regions:
            raise NotGranted(f"region {region.region_id:#x} is already registered")
        self.regions[region.region_id] = region

    def grant(self, region_id: int, grantee: int, mode: str) -> None:
        region = self._region(region_id)
        if mode == RW and region.sealed:
            raise NotGranted(f"region {region_id:#x} is write-sealed; only read-only grants exist")
        if mode == RO and not region.sealed:
            # An O_RDONLY descriptor of an unsealed memfd reopens read-write through
            # /proc/self/fd: read-only would be a promise the kernel does not keep.
            raise NotGranted(f"region {region_id:#x} is not write-sealed; a read-only grant "
                             "of it could be reopened read-write")
        if grantee == region.owner and region.owner_alive:
            return  # the owner maps its own region directly
        self.grants[(region_id, grantee)] = mode

    def revoke(self, region_id: int, grantee: int) -> None:
        self.grants.pop((region_id, grantee), None)

    def check(self, region_id: int, node: int, want: str = RO) -> str:
        """The mode `node` may map `region_id` with, or NotGranted."""
        region = self.regions.get(region_id)
        if region is None:
            raise NotGranted(f"region {region_id:#x} does not exist")
        mode = self.grants.get((region_id, node))
        if mode is None:
            raise NotGranted(f"node{node} has no grant for node{region.owner}'s region "
                             f"{region_id:#x}")
        if want == RW and mode != RW:
            raise NotGranted(f"node{node} holds a read-only grant for region {region_id:#x}")
        return mode

    def owner_died(self, node: int) -> list[int]:
        dead = []
        for region in self.regions.values():
            if region.owner == node and region.owner_alive:
                region.owner_alive = False
                dead.append(region.region_id)
        return dead

    def remove(self, region_id: int) -> list[int]:
        """Forget a freed region; returns the nodes that held grants on it."""
        self.regions.pop(region_id, None)
        holders = [n for (r, n) in self.grants if r == region_id]
        for n in holders:
            del self.grants[(region_id, n)]
        return holders

    def _region(self, region_id: int) -> Region:
        try:
            return self.regions[region_id]
        except KeyError:
            raise NotGranted(f"region {region_id:#x} does not exist") from None

    def rows(self) -> list[dict]:
        return [
            {"region": f"{r:#x}", "owner": f"node{self.regions[r].owner}", "grantee": f"node{n}",
             "mode": mode, "owner_alive": self.regions[r].owner_alive}
            for (r, n), mode in sorted(self.grants.items())
        ]

    def region_rows(self) -> list[dict]:
        """Every registered region: who owns it, who allocated it, who may map it."""
        return [
            {"region": f"{r.region_id:#x}", "owner": f"node{r.owner}", "allocator": r.allocated_by,
             "size": r.size, "sealed": r.sealed, "owner_alive": r.owner_alive,
             "grantees": [f"node{n}" for (rid, n) in sorted(self.grants) if rid == r.region_id]}
            for r in sorted(self.regions.values(), key=lambda r: (r.owner, r.region_id))
        ]
