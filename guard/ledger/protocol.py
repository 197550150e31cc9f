"""The ledger interface the engine codes against (implemented by ``RedisLedger``)."""

from __future__ import annotations

from typing import Protocol

from guard.domain import Reason
from guard.ledger.types import (
    BlockRule,
    ExtensionState,
    LiveCall,
    RefusalCounts,
    Reservation,
    ReserveRequest,
    SettleResult,
    SweptCall,
    TenantCounters,
)


class Ledger(Protocol):
    async def reserve(self, req: ReserveRequest) -> Reservation: ...

    async def settle(
        self, tenant: str, call_id: str, billsec: int, now: float, *, probe: bool = False
    ) -> SettleResult: ...

    async def sweep(self, tenant: str, now: float, limit: int = 1000) -> list[SweptCall]: ...

    async def record_refusal(
        self,
        tenant: str,
        extension: str,
        source_ip: str,
        reason: Reason,
        now: float,
        *,
        block: BlockRule | None = None,
        window_minutes: int = ...,
    ) -> RefusalCounts: ...

    async def counters(self, tenant: str, day: str) -> TenantCounters: ...

    async def live_calls(self, tenant: str) -> list[LiveCall]: ...

    async def extension_state(self, tenant: str, extension: str) -> ExtensionState: ...

    async def lock_extension(
        self, tenant: str, extension: str, reason: str, *, now: float | None = None
    ) -> bool: ...

    async def unlock_extension(
        self, tenant: str, extension: str, *, forget_ua: bool = False
    ) -> bool: ...

    async def ping(self) -> float: ...

    async def config_version(self) -> int: ...

    async def bump_config_version(self, at_least: int) -> int: ...

    async def close(self) -> None: ...
