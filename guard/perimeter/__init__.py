"""The perimeter: which sources may even try to call, before any money is looked at.

Blocked IPs (refused-attempt velocity and scanner User-Agents, kept in Redis, copied in process
by ``blocks``), allow-lists of addresses never blocked, GeoIP country lists (``geoip``) and
imported threat lists of bad IPs and fraud number ranges (``threats``), tied together for the
engine by ``runtime.Perimeter``. Nothing here does I/O on the hot path: every check reads
in-process state that a background task refreshes.
"""

from __future__ import annotations

from guard.perimeter.runtime import Perimeter, PerimeterSettings, PerimeterStore

__all__ = ["Perimeter", "PerimeterSettings", "PerimeterStore"]
