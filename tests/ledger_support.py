"""Helpers shared by the ledger tests: request builders and private Redis servers.

A private ``redis-server`` (a plain one, a one-node Cluster, or a master with a Sentinel) runs on a
free loopback port, on a TLS port only (certificates from a ``trustme`` test CA), or on a Unix
socket only, so that a test may stop, pause or flush it without
disturbing the shared test Redis that other tests use at the same time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme

from guard.domain import DestinationClass, Rate
from guard.ledger import RedisLedger
from guard.ledger.cluster import ClusterScripts
from guard.ledger.multiplex import MultiplexedConnection
from guard.ledger.types import ReserveRequest

REDIS_SERVER = "/usr/bin/redis-server"
DAY = "20240501"
NOW = 1_714_550_400.0  # 2024-05-01T08:00:00Z

#: 0.60 a minute, per-second billing after the first 30 seconds.
RATE = Rate(
    prefix="33",
    name="France",
    dest_class=DestinationClass.INTERNATIONAL,
    rate_per_minute=6_000,
    connect_fee=100,
    initial_increment=30,
    subsequent_increment=1,
)
FREE = Rate(
    prefix="0800", name="Freephone", dest_class=DestinationClass.TOLLFREE, rate_per_minute=0
)

_REQUEST = ReserveRequest(
    tenant="acme",
    extension="100",
    call_id="call-1",
    day=DAY,
    now=NOW,
    rate=RATE,
    number="33123456789",
    ext_daily_limit=None,
    tenant_daily_limit=None,
    ext_concurrent_limit=None,
    tenant_concurrent_limit=None,
    max_call_seconds=3_600,
    grace_seconds=60,
    source_ip="192.0.2.10",
    channel="PJSIP/100-00000001",
)


def request(**changes: Any) -> ReserveRequest:
    """A valid reservation request for tenant ``acme``, extension ``100``, with ``changes``."""
    return replace(_REQUEST, **changes)


def count_scripts(ledger: RedisLedger, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SHA1 of every script ``ledger`` runs from now on through its multiplexed connection
    (or, on a Cluster, connections), which it must have."""
    scripts = ledger._scripts
    assert isinstance(scripts, MultiplexedConnection | ClusterScripts)
    ran: list[str] = []
    evalsha = scripts.evalsha

    async def counted(sha: str, source: str, keys: Any, args: Any) -> Any:
        ran.append(sha)
        return await evalsha(sha, source, keys, args)

    monkeypatch.setattr(scripts, "evalsha", counted)
    return ran


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError("a private redis-server did not become ready")
        time.sleep(0.02)


@dataclass(frozen=True)
class TlsFiles:
    """A CA certificate, and a certificate chain and its private key issued by that CA (PEM)."""

    ca: Path
    cert: Path
    key: Path


def tls_files(ca: trustme.CA, directory: Path, *identities: str) -> TlsFiles:
    """Write ``ca``'s certificate and a certificate it issues for ``identities`` (host names, IP
    addresses, or a client's name) under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    issued = ca.issue_cert(*identities)
    files = TlsFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca))
    files.cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(files.key))
    return files


class RedisProcess:
    """One private ``redis-server`` without persistence, on a free loopback port or, given
    ``unix_socket``, on that socket alone (``--port 0``); ``password`` is its ``requirepass``.

    Given ``tls`` (the server's certificate, its key and the CA that issued it), it listens on a
    free loopback TLS port alone (``--port 0``); ``tls_auth_clients`` (``no``, ``optional`` or
    ``yes``) says whether clients must show a certificate from that CA, and ``client_tls`` is the
    one ``client()`` shows.
    """

    def __init__(
        self,
        workdir: Path,
        *options: str,
        config_file: Path | None = None,
        unix_socket: Path | None = None,
        password: str | None = None,
        tls: TlsFiles | None = None,
        tls_auth_clients: str = "no",
        client_tls: TlsFiles | None = None,
    ) -> None:
        self.workdir = workdir
        self.options = options
        self.config_file = config_file
        self.unix_socket = unix_socket
        self.password = password
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self.client_tls = client_tls
        self.port = 0 if unix_socket else free_port()
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        if self.unix_socket:
            return f"unix://{self.unix_socket}"
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, db: int = 0) -> redis.Redis:
        if self.unix_socket:
            return redis.Redis(
                unix_socket_path=str(self.unix_socket),
                db=db,
                password=self.password,
                socket_timeout=2,
            )
        if self.tls:
            client_tls = self.client_tls
            return redis.Redis(
                port=self.port,
                db=db,
                password=self.password,
                socket_timeout=2,
                ssl=True,
                ssl_ca_certs=str(self.tls.ca),
                ssl_check_hostname=False,  # the helper trusts the CA whatever name it certifies
                ssl_certfile=str(client_tls.cert) if client_tls else None,
                ssl_keyfile=str(client_tls.key) if client_tls else None,
            )
        return redis.Redis(port=self.port, db=db, password=self.password, socket_timeout=2)

    def start(self) -> RedisProcess:
        args = [REDIS_SERVER] + ([str(self.config_file)] if self.config_file else [])
        if self.unix_socket:
            args += ["--port", "0", "--unixsocket", str(self.unix_socket)]
        elif self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1"]
            args += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            args += ["--tls-ca-cert-file", str(self.tls.ca)]
            args += ["--tls-auth-clients", self.tls_auth_clients]
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        if self.password:
            args += ["--requirepass", self.password]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir), *self.options]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self.ready(lambda client: client.ping())

    def ready(self, check: Callable[[redis.Redis], object]) -> RedisProcess:
        """Wait until ``check`` passes on this server; stop the server if it never does."""
        client = self.client()
        try:
            wait_until(lambda: check(client))
        except AssertionError:
            self.stop()
            raise
        finally:
            client.close()
        return self

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def start_cluster(workdir: Path) -> RedisProcess:
    """A one-node Redis Cluster that owns every slot."""
    node = RedisProcess(
        workdir,
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        str(workdir / "nodes.conf"),
        "--cluster-port",  # the bus port: port + 10000 is past 65535 for a port above 55535
        str(free_port()),
    ).start()
    try:
        with node.client() as client:
            client.cluster("ADDSLOTSRANGE", 0, 16383)
    except redis.RedisError:
        node.stop()
        raise
    return node.ready(lambda client: client.cluster("info")["cluster_state"] == "ok")


def start_sentinel(workdir: Path, master: RedisProcess, service: str) -> RedisProcess:
    """A Sentinel that monitors ``master`` as ``service``."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "sentinel.conf"
    config.write_text(f"sentinel monitor {service} 127.0.0.1 {master.port} 1\n")
    sentinel = RedisProcess(workdir, "--sentinel", config_file=config).start()
    return sentinel.ready(lambda client: client.sentinel_get_master_addr_by_name(service))
