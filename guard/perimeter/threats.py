"""Threat lists: bad source IPs/networks and fraud number ranges, parsed, compiled and checked.

Operators import lists (APIBAN output, a honeypot's log, a carrier's list of international
revenue-share prefixes) with ``guard threat import``; they live in Redis (see
``guard.ledger.keys``) and every guard compiles them into a ``ThreatIndex`` when their version
changes. The checks are ``extra_checks`` of ``guard.policy.evaluate``: pure, and O(1) in the
size of the lists (one dict probe per distinct network length, one per digit of the number).

Parsing never raises on bad content: it returns the entries and the bad lines by number, and the
import refuses to publish anything while there are bad lines (unless told to skip them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, IPv6Network, ip_network

from guard.domain import CheckOutcome, Reason
from guard.ledger.types import ThreatKind
from guard.policy import Check, CheckContext

IPAddress = IPv4Address | IPv6Address

#: Broadest network a list may hold: a shorter prefix is a typo that would refuse a continent.
MIN_PREFIX = {4: 8, 6: 19}
#: Longest number prefix (E.164 numbers have at most 15 digits).
MAX_NUMBER_DIGITS = 15
#: A list name: what ``guard threat list`` shows and ``guard threat clear`` takes.
LIST_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SEPARATORS = re.compile(r"[,;\s]+")
_DIGITS = re.compile(r"[0-9]{1,15}")

_THREAT_IP_OK = CheckOutcome("threat_ip", True)
_THREAT_NUMBER_OK = CheckOutcome("threat_number", True)


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def parse_ip_entry(text: str) -> str:
    """The canonical form of an address or network (``ValueError`` if it is neither, or if the
    network is broader than ``MIN_PREFIX``); host bits of a network are dropped."""
    network = ip_network(text, strict=False)
    if isinstance(network, IPv6Network) and network.network_address.ipv4_mapped is not None:
        network = ip_network(
            f"{network.network_address.ipv4_mapped}/{max(network.prefixlen - 96, 0)}"
        )
    if network.prefixlen < MIN_PREFIX[network.version]:
        raise ValueError(
            f"{network} is too broad (at most /{MIN_PREFIX[network.version]} is accepted)"
        )
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def parse_number_entry(text: str) -> str:
    """The E.164 digits of a number prefix given as ``882``, ``+882`` or ``00882``."""
    digits = text[1:] if text.startswith("+") else text[2:] if text.startswith("00") else text
    if not _DIGITS.fullmatch(digits) or digits.startswith("0"):
        raise ValueError(
            f"not a number prefix: {text[:40]!r} (digits of the international form: 882, +882 "
            "or 00882)"
        )
    return digits


def parse_threat_list(
    text: str, kind: ThreatKind, *, max_errors: int = 100
) -> tuple[list[str], list[LineError]]:
    """Entries of a threat list file, and its bad lines.

    Accepted: one entry a line, with ``#`` or ``;`` comments (Spamhaus DROP style) and blank
    lines; comma- or whitespace-separated lines (the first field is the entry, so a first line
    that is not an entry is a header); and APIBAN's JSON (``{"ipaddress": [...]}``).
    Entries are canonical and distinct, in file order.
    """
    parse = parse_ip_entry if kind is ThreatKind.IP else parse_number_entry
    body = text.removeprefix("\ufeff")
    if body.lstrip().startswith("{"):
        return _parse_json(body, parse)
    entries: dict[str, None] = {}
    errors: list[LineError] = []
    first = True
    # Lines end at \n only (as editors and ``wc -l`` count them): U+2028 is not a break here.
    for number, raw in enumerate(body.split("\n"), start=1):
        line = raw.split("#", 1)[0].split(";", 1)[0]
        field = next((f.strip("\"' ") for f in _SEPARATORS.split(line.strip()) if f), "")
        if not field:
            continue
        try:
            entries[parse(field)] = None
        except ValueError as exc:
            if first and any(char.isalpha() for char in field) and ":" not in field:
                first = False
                continue  # a CSV header such as "ip,added,comment"
            errors.append(LineError(number, str(exc)))
            if len(errors) >= max_errors:
                errors.append(LineError(number, f"stopped after {max_errors} errors"))
                break
        first = False
    return list(entries), errors


def _parse_json(text: str, parse: Callable[[str], str]) -> tuple[list[str], list[LineError]]:
    """APIBAN's answer: a JSON object whose ``ipaddress`` member lists the addresses."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        return [], [LineError(1, f"broken JSON: {exc}")]
    items = document.get("ipaddress") if isinstance(document, dict) else None
    if not isinstance(items, list):
        return [], [LineError(1, 'JSON without an "ipaddress" list (APIBAN format)')]
    entries: dict[str, None] = {}
    errors: list[LineError] = []
    for index, item in enumerate(items, start=1):
        try:
            entries[parse(str(item))] = None
        except ValueError as exc:
            errors.append(LineError(1, f"item {index}: {exc}"))
    return list(entries), errors


class ThreatIndex:
    """Every threat list compiled for O(1) lookups; immutable, replaced whole on reload.

    IPs: addresses in one dict; networks in one dict per (IP version, prefix length), probed
    with the masked address, so a lookup costs one probe per distinct length, whatever the
    number of entries. Numbers: longest prefix over one dict, one probe per digit.
    """

    __slots__ = ("_lengths", "_longest", "_networks", "_numbers", "ip_entries", "number_entries")

    def __init__(
        self,
        ips: Mapping[str, Iterable[str]] | None = None,
        numbers: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self._networks: dict[tuple[int, int], dict[int, str]] = {}
        for name, entries in sorted((ips or {}).items()):
            for entry in entries:
                try:
                    network = ip_network(entry, strict=False)
                except ValueError:
                    continue  # written by hand into Redis: not ours to trust
                table = self._networks.setdefault((network.version, network.prefixlen), {})
                table.setdefault(int(network.network_address), name)
        self._lengths: dict[int, tuple[tuple[int, int, dict[int, str]], ...]] = {
            version: tuple(
                (length, ((1 << bits) - 1) ^ ((1 << (bits - length)) - 1), table)
                for (v, length), table in sorted(self._networks.items(), reverse=True)
                if v == version
            )
            for version, bits in ((4, 32), (6, 128))
        }
        self._numbers: dict[str, str] = {}
        for name, entries in sorted((numbers or {}).items()):
            for entry in entries:
                self._numbers.setdefault(entry, name)
        self._longest = max((len(prefix) for prefix in self._numbers), default=0)
        self.ip_entries = sum(len(table) for table in self._networks.values())
        self.number_entries = len(self._numbers)

    def ip_list(self, address: IPAddress) -> str | None:
        """The name of a list holding ``address`` (or a network around it), else ``None``."""
        value = int(address)
        for _length, mask, table in self._lengths[address.version]:
            name = table.get(value & mask)
            if name is not None:
                return name
        return None

    def number_list(self, e164: str) -> tuple[str, str] | None:
        """(list name, prefix) of the longest listed prefix of ``e164``, else ``None``."""
        numbers = self._numbers
        for length in range(min(len(e164), self._longest), 0, -1):
            name = numbers.get(e164[:length])
            if name is not None:
                return name, e164[:length]
        return None


def threat_ip_check(index: Callable[[], ThreatIndex]) -> Check:
    """A check refusing source addresses on an IP threat list (``threat_list``).

    ``index`` returns the current compiled lists, so the check follows reloads.
    """

    def check_threat_ip(ctx: CheckContext) -> CheckOutcome | None:
        address = ctx.source_ip
        if address is None:
            return None
        name = index().ip_list(address)
        if name is None:
            return _THREAT_IP_OK
        return CheckOutcome(
            "threat_ip", False, Reason.THREAT_LIST, f"{address} is on threat list {name}"
        )

    return check_threat_ip


def threat_number_check(index: Callable[[], ThreatIndex]) -> Check:
    """A check refusing numbers under a prefix of a number threat list (``threat_number``)."""

    def check_threat_number(ctx: CheckContext) -> CheckOutcome | None:
        number = ctx.number
        if number is None:
            return None
        found = index().number_list(number.e164)
        if found is None:
            return _THREAT_NUMBER_OK
        name, prefix = found
        return CheckOutcome(
            "threat_number",
            False,
            Reason.THREAT_NUMBER,
            f"{number.e164} is under prefix {prefix} of threat list {name}",
        )

    return check_threat_number
