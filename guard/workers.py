"""How ``guard serve`` runs: one process, or a pre-fork parent and N workers (``--workers N``).

:func:`serve_forever` is what the CLI calls. With one worker it runs
:func:`guard.service.serve` in this process. With more, :class:`Supervisor` forks N workers that
each build their own services (SQL engine, ledger, snapshot, sweeper) and listen on the same
addresses with ``SO_REUSEPORT``, so the kernel spreads Asterisk's connections over them; they share
nothing but Redis (and SQL for the configuration), which is why ``memory://`` is refused there;
worker ``i`` serves its own ``/metrics`` on the configured metrics port + ``i``.
The parent binds and connects to nothing: it forwards SIGTERM/SIGINT to every worker and waits for
their drain, restarts a worker that dies unexpectedly (sooner or later: the delay grows while a
worker keeps dying young), and stops everything when a worker reports a configuration error, which
no restart can mend. A worker whose parent disappears (even by SIGKILL) gets SIGTERM and drains.
Linux only (``SO_REUSEPORT`` load balancing, ``PR_SET_PDEATHSIG``).

:func:`run` is the one way Guard runs an event loop: on uvloop when it is installed (the ``fast``
extra), else on asyncio's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from guard.errors import ConfigurationError
from guard.logs import log_fields
from guard.service import serve
from guard.settings import Settings

log = logging.getLogger("guard.workers")

_T = TypeVar("_T")

#: A worker's exit status for a configuration error (``EX_CONFIG``): not worth a restart.
EXIT_CONFIG = 78
#: Seconds a worker must live to count as healthy; one that dies younger is restarted later.
STABLE_SECONDS = 10.0
#: First and longest delay before restarting a worker that keeps dying young.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
#: Extra seconds past the drain for a worker to close its connections before it is killed.
STOP_MARGIN = 5.0
_PR_SET_PDEATHSIG = 1
_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGCHLD})


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """Run ``main`` to completion on uvloop if it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def serve_forever(
    settings: Settings, *, workers: int = 1, drain_seconds: float = 10.0, ari: bool = False
) -> int:
    """``guard serve``: serve until SIGTERM/SIGINT, then drain; returns the exit status.

    ``ari`` (one worker only) also runs the Stasis app, which must exist once per Asterisk.
    """
    if workers == 1:
        run(serve(settings, drain_seconds=drain_seconds, ari=ari, long_lived=True))
        return 0
    if ari:
        raise ConfigurationError(
            "--ari runs the Stasis app, which must run once: use --workers 1, or run `guard ari`"
            " beside `guard serve --workers N`"
        )
    return Supervisor(settings, workers, drain_seconds=drain_seconds).run()


def check_workers(settings: Settings, workers: int) -> None:
    """Raise ``ConfigurationError`` unless ``workers`` processes can serve ``settings``."""
    if workers < 1:
        raise ConfigurationError(f"--workers must be at least 1, not {workers}")
    if workers == 1:
        return
    if not hasattr(socket, "SO_REUSEPORT") or not sys.platform.startswith("linux"):
        raise ConfigurationError("--workers above 1 needs Linux (SO_REUSEPORT)")
    if settings.redis_url.strip().lower().startswith("memory://"):
        raise ConfigurationError(
            "--workers above 1 needs a shared counter store: memory:// lives inside one process,"
            " so limits would not hold across workers (set GUARD_REDIS_URL to redis://…)"
        )
    if any(port == 0 for _, port in settings.agi_listen):
        raise ConfigurationError(
            "--workers above 1 needs fixed ports in GUARD_AGI_LISTEN (port 0 would give each"
            " worker a different one)"
        )


@dataclass
class _Slot:
    """One worker position: its process (if running) and its restart bookkeeping."""

    index: int
    pid: int = 0
    started: float = 0.0
    delay: float = 0.0
    restart_at: float | None = None


class Supervisor:
    """The pre-fork parent of ``guard serve --workers N`` (see the module docstring).

    The parent must not have started threads or opened connections before :meth:`run`.
    """

    def __init__(self, settings: Settings, workers: int, *, drain_seconds: float = 10.0) -> None:
        check_workers(settings, workers)
        self._settings = settings
        self._drain = drain_seconds
        self._slots = [_Slot(index) for index in range(workers)]
        self._mask: set[int | signal.Signals] = set()
        self._pid = os.getpid()

    @property
    def pids(self) -> list[int]:
        """The running workers' process ids."""
        return [slot.pid for slot in self._slots if slot.pid]

    def run(self) -> int:
        """Start the workers and supervise them until SIGTERM/SIGINT; the exit status."""
        self._pid = os.getpid()
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for slot in self._slots:
                self._spawn(slot)
            log.info(
                "guard supervisor running",
                extra=log_fields(workers=len(self._slots), pids=self.pids),
            )
            return self._supervise()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)

    def _supervise(self) -> int:
        while True:
            info = signal.sigtimedwait(_SIGNALS, self._next_wait())
            if info is not None and info.si_signo != signal.SIGCHLD:
                log.info(
                    "guard supervisor stopping: draining workers",
                    extra=log_fields(signal=signal.Signals(info.si_signo).name),
                )
                return self._stop(0)
            if self._reap() == EXIT_CONFIG:
                log.error("a worker reported a configuration error: stopping every worker")
                return self._stop(EXIT_CONFIG)
            now = time.monotonic()
            for slot in self._slots:
                if slot.restart_at is not None and slot.restart_at <= now:
                    self._spawn(slot)

    def _next_wait(self) -> float:
        due = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
        if not due:
            return 1.0
        return min(1.0, max(0.0, min(due) - time.monotonic()))

    def _spawn(self, slot: _Slot) -> None:
        pid = os.fork()
        if pid == 0:
            self._worker(slot.index)
        slot.pid, slot.started, slot.restart_at = pid, time.monotonic(), None

    def _worker(self, index: int) -> NoReturn:
        """The child side of ``fork``: serve, then leave without running the parent's cleanup."""
        status = 0
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            if _die_with_parent(self._pid):
                log.info("guard worker started", extra=log_fields(worker=index, pid=os.getpid()))
                settings = worker_settings(self._settings, index)
                run(serve(settings, drain_seconds=self._drain, reuse_port=True, long_lived=True))
        except (ConfigurationError, OSError) as exc:
            # A bad setting or an address that cannot be bound: no restart will mend it.
            log.error("guard worker cannot start", extra=log_fields(worker=index, error=str(exc)))
            status = EXIT_CONFIG
        except BaseException:
            log.exception("guard worker failed", extra=log_fields(worker=index))
            status = 1
        finally:
            logging.shutdown()
            os._exit(status)

    def _reap(self) -> int | None:
        """Collect every exited worker and schedule its restart; a configuration error's status."""
        config_error = None
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return config_error
            if pid == 0:
                return config_error
            code = os.waitstatus_to_exitcode(status)
            for slot in self._slots:
                if slot.pid == pid:
                    slot.pid = 0
                    if code == EXIT_CONFIG:
                        config_error = EXIT_CONFIG
                    self._schedule_restart(slot, code)

    def _schedule_restart(self, slot: _Slot, code: int) -> None:
        uptime = time.monotonic() - slot.started
        slot.delay = (
            0.0
            if uptime >= STABLE_SECONDS
            else min(max(slot.delay * 2, RESTART_DELAY), MAX_RESTART_DELAY)
        )
        slot.restart_at = time.monotonic() + slot.delay
        log.error(
            "guard worker died unexpectedly: restarting it",
            extra=log_fields(
                worker=slot.index, status=code, uptime=round(uptime, 1), restart_in=slot.delay
            ),
        )

    def _stop(self, status: int) -> int:
        """SIGTERM every worker, wait for their drain, then SIGKILL what is left."""
        for slot in self._slots:
            slot.restart_at = None
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._drain + STOP_MARGIN
        while self.pids and time.monotonic() < deadline:
            signal.sigtimedwait({signal.SIGCHLD}, min(0.5, deadline - time.monotonic()))
            self._collect()
        for pid in self.pids:
            log.error("guard worker did not drain in time: killed", extra=log_fields(pid=pid))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.pids:
            pid, _ = os.waitpid(-1, 0)
            self._forget(pid)
        return status

    def _collect(self) -> None:
        while self.pids:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._forget(pid)

    def _forget(self, pid: int) -> None:
        for slot in self._slots:
            if slot.pid == pid:
                slot.pid = 0


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker ``index``'s settings: its ``/metrics`` listener on the configured port + ``index``
    (each worker counts its own calls; Prometheus scrapes every port)."""
    listen = settings.metrics_listen
    if listen is None or listen[1] == 0 or index == 0:
        return settings
    return dataclasses.replace(settings, metrics_listen=(listen[0], listen[1] + index))


def _die_with_parent(parent: int) -> bool:
    """Have the kernel send SIGTERM when ``parent`` dies (Linux); false if it is gone already."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    return os.getppid() == parent
