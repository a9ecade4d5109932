"""A report throttle: a flood of bad requests must not become a flood of events.

Whoever sends garbage as fast as it can would otherwise have every rejection written to the
event log (and fill the disk with it). Per key (an error kind, a peer), the first `burst`
reports in each `window_s` pass; the rest are counted, and the next report that passes
carries how many were held back, so nothing is silently forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Window:
    start: float
    passed: int = 0
    held: int = 0


@dataclass
class Throttle:
    burst: int = 5
    window_s: float = 1.0
    _keys: dict[str, _Window] = field(default_factory=dict)
    max_keys: int = 256  # bounded too: keys come from what peers send

    def allow(self, key: str, now: float) -> int | None:
        """None: hold this report back. An int: report it, with that many held back since."""
        w = self._keys.get(key)
        if w is None or now - w.start >= self.window_s:
            held = w.held if w is not None else 0
            if w is None and len(self._keys) >= self.max_keys:
                self._keys.clear()
            self._keys[key] = _Window(now, 1)
            return held
        if w.passed < self.burst:
            w.passed += 1
            held, w.held = w.held, 0
            return held
        w.held += 1
        return None
