"""The dashboard: live Redis counters, calls and security events in a browser, a JSON API, and
Prometheus metrics of the shared counters (``guard dashboard``).

``data`` reads what the pages show, ``render`` draws it (Jinja2 templates, inline SVG), ``app``
is the aiohttp application (login, sessions, CSRF, actions, live stream), ``exporter`` its
``/metrics``, ``auth`` the password hashes, cookies and login limits, ``server`` runs it. It never
decides a call and writes nothing but what an enabled, audited action asks for.
"""

from __future__ import annotations
