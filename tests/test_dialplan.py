"""The shipped dialplans keep the contract: fail closed, URI-encoded inputs, L() on every dial.

Two kinds of proof: static rules over every line of both files, and the dialplan interpreter
(``dialplan_sim``) running the real files with what a FastAGI server or Stasis app could leave
behind (nothing, garbage, a DENY, an ALLOW without a limit, an ALLOW with one).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from dialplan_sim import Channel, Dialplan, parse_dialplan

DIALPLAN_DIR = Path(__file__).resolve().parents[1] / "dialplan"
AGI_FILE = DIALPLAN_DIR / "extensions_guard.conf"
ARI_FILE = DIALPLAN_DIR / "extensions_guard_ari.conf"
UNTRUSTED = ("GUARD_UA", "CALLERID(num)", "EXTEN", "GUARD_SRC_IP", "GUARD_EXT", "GUARD_TENANT")
PJSIP = {
    "CHANNEL(endpoint)": "1001",
    "CHANNEL(pjsip,remote_addr)": "127.0.0.8:5063",
    "PJSIP_HEADER(read,User-Agent)": 'Evil", "9999", "x" ip=6.6.6.6 %0A',
    "CALLERID(num)": "1001",
    "CHANNEL(accountcode)": "acme",
}


def _lines(path: Path) -> list[str]:
    return [line.split(";", 1)[0] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("path", [AGI_FILE, ARI_FILE], ids=["agi", "ari"])
def test_untrusted_values_only_travel_uri_encoded(path: Path) -> None:
    calls = [line for line in _lines(path) if re.search(r"\b(AGI|Stasis)\(", line)]
    assert calls
    for line in calls:
        assert '"' not in line, f"quoted argument in: {line}"
        for name in UNTRUSTED:
            for match in re.finditer(re.escape("${" + name + "}"), line):
                before = line[: match.start()]
                assert before.endswith("URIENCODE("), f"{name} not URI-encoded in: {line}"


@pytest.mark.parametrize("path", [AGI_FILE, ARI_FILE], ids=["agi", "ari"])
def test_every_guarded_dial_carries_the_limit_and_nothing_disables_it(path: Path) -> None:
    contexts = parse_dialplan(path.read_text())
    dials = [
        (name, step.data)
        for name, exts in contexts.items()
        for steps in exts.values()
        for step in steps
        if step.app == "Dial"
    ]
    guarded = [data for name, data in dials if "emergency" not in name]
    assert guarded and all(data.endswith(",L(${GUARD_MAX_SECONDS}000)") for data in guarded)
    assert "TIMEOUT(absolute)=0" not in path.read_text()


@pytest.mark.parametrize(
    ("left", "dials"),
    [
        ({}, False),  # the server closed without a word: AGISTATUS=SUCCESS, nothing set
        ({"GUARD_RESULT": "allow", "GUARD_MAX_SECONDS": "60"}, False),
        ({"GUARD_RESULT": "ALLOW "}, False),
        ({"GUARD_RESULT": "ALLOW"}, False),
        ({"GUARD_RESULT": "ALLOW", "GUARD_MAX_SECONDS": "0"}, False),
        ({"GUARD_RESULT": "ALLOW", "GUARD_MAX_SECONDS": "-5"}, False),
        ({"GUARD_RESULT": "ALLOW", "GUARD_MAX_SECONDS": "12x"}, False),
        ({"GUARD_RESULT": "ALLOW", "GUARD_MAX_SECONDS": "1234567"}, False),
        ({"GUARD_RESULT": "DENY", "GUARD_MAX_SECONDS": "60"}, False),
        ({"GUARD_RESULT": "ALLOW", "GUARD_MAX_SECONDS": "60"}, True),
    ],
)
async def test_agi_dialplan_dials_only_on_allow_with_a_positive_limit(
    left: dict[str, str], dials: bool
) -> None:
    seen: list[str] = []

    def agi(url: str, channel: Channel) -> None:
        seen.append(url)
        channel.variables.update(left)
        channel.variables["AGISTATUS"] = "SUCCESS"

    channel = await Dialplan(AGI_FILE, agi=agi).run(
        "guard-outbound-pjsip", "00441234567", Channel(functions=dict(PJSIP))
    )
    assert len(seen) == 1
    assert bool(channel.dialed) is dials
    if dials:
        assert channel.dialed == ["PJSIP/00441234567@carrier,60,L(60000)"]
    else:
        assert channel.hangup_cause == "21"


async def test_agi_dialplan_refuses_when_guard_is_down() -> None:
    def agi(url: str, channel: Channel) -> None:
        channel.variables["AGISTATUS"] = "FAILURE"

    channel = await Dialplan(AGI_FILE, agi=agi).run(
        "guard-outbound-sip", "00441234567", Channel(functions={"CHANNEL(peername)": "1001"})
    )
    assert channel.dialed == [] and channel.hangup_cause == "21"
    assert channel.variables["GUARD_REASON"] == "guard_unreachable"


async def test_agi_request_carries_the_hostile_user_agent_whole_and_encoded() -> None:
    seen: list[str] = []
    await Dialplan(AGI_FILE, agi=lambda url, ch: seen.append(url)).run(
        "guard-outbound-pjsip", "00441234567", Channel(functions=dict(PJSIP))
    )
    (url,) = seen
    assert url.startswith("agi://127.0.0.1:4573/authorize?tenant=acme&ext=1001&to=00441234567")
    assert "ua=Evil%22%2C%20%229999%22%2C%20%22x%22%20ip%3D6.6.6.6%20%250A" in url
    assert "," not in url  # one AGI argument: nothing for Asterisk to split


@pytest.mark.parametrize("path", [AGI_FILE, ARI_FILE], ids=["agi", "ari"])
@pytest.mark.parametrize("number", ["112", "911", "999", "000"])
async def test_emergency_numbers_never_ask_guard(path: Path, number: str) -> None:
    def broken(url: str, channel: Channel) -> None:
        raise AssertionError("an emergency call must not depend on Guard")

    prefix = "guard-ari" if path == ARI_FILE else "guard"
    channel = await Dialplan(path, agi=broken, stasis=broken).run(
        f"{prefix}-outbound-pjsip", number, Channel(functions=dict(PJSIP))
    )
    assert channel.dialed == [f"PJSIP/{number}@carrier,120"]


async def test_agi_settle_handler_runs_only_for_allowed_calls() -> None:
    settles: list[str] = []

    def agi(url: str, channel: Channel) -> None:
        if "/settle?" in url:
            settles.append(url)
        else:
            channel.variables.update(GUARD_RESULT="ALLOW", GUARD_MAX_SECONDS="60")

    dialplan = Dialplan(AGI_FILE, agi=agi)
    channel = await dialplan.run("guard-outbound-pjsip", "0044", Channel(functions=dict(PJSIP)))
    channel.variables["ANSWEREDTIME"] = "42"
    await dialplan.run_hangup_handlers(channel)
    assert settles == ["agi://127.0.0.1:4573/settle?tenant=acme&billsec=42"]

    refused = Channel(functions=dict(PJSIP))
    await Dialplan(AGI_FILE, agi=lambda url, ch: None).run("guard-outbound-pjsip", "0044", refused)
    await Dialplan(AGI_FILE, agi=lambda url, ch: settles.append(url)).run_hangup_handlers(refused)
    assert len(settles) == 1


@pytest.mark.parametrize(
    ("status", "left", "dials"),
    [
        ("FAILED", {"GUARD_RESULT": "ALLOW", "GUARD_MAX_SECONDS": "60"}, False),
        ("SUCCESS", {}, False),
        ("SUCCESS", {"GUARD_RESULT": "DENY"}, False),
        ("SUCCESS", {"GUARD_RESULT": "ALLOW", "GUARD_MAX_SECONDS": "60"}, True),
    ],
)
async def test_ari_dialplan_dials_only_on_allow_after_stasis(
    status: str, left: dict[str, str], dials: bool
) -> None:
    def stasis(data: str, channel: Channel) -> None:
        assert data.startswith("guard,tenant=acme&ext=1001&to=00441234567&")
        channel.variables.update(left)
        channel.variables["STASISSTATUS"] = status

    channel = await Dialplan(ARI_FILE, stasis=stasis).run(
        "guard-ari-outbound-pjsip", "00441234567", Channel(functions=dict(PJSIP))
    )
    assert bool(channel.dialed) is dials


# --- interval reservations ------------------------------------------------------------------

ALLOW_SLICE = {"GUARD_RESULT": "ALLOW", "GUARD_MAX_SECONDS": "300"}


async def _run_either(path: Path, left: dict[str, str], preset: dict[str, str]) -> Channel:
    """Run ``path`` for one call whose Guard (FastAGI or Stasis) leaves ``left`` behind;
    ``preset``: variables the endpoint set before the dialplan ran (e.g. ``set_var``)."""

    def guard(data: str, channel: Channel) -> None:
        channel.variables.update(left)
        channel.variables["AGISTATUS" if path == AGI_FILE else "STASISSTATUS"] = "SUCCESS"

    prefix = "guard-ari" if path == ARI_FILE else "guard"
    channel = Channel(variables=dict(preset), functions=dict(PJSIP))
    return await Dialplan(path, agi=guard, stasis=guard).run(
        f"{prefix}-outbound-pjsip", "00441234567", channel
    )


@pytest.mark.parametrize("path", [AGI_FILE, ARI_FILE], ids=["agi", "ari"])
@pytest.mark.parametrize(
    ("left", "limit"),
    [
        ({**ALLOW_SLICE, "GUARD_MODE": "interval", "GUARD_CAP_SECONDS": "3600"}, "3600000"),
        ({**ALLOW_SLICE, "GUARD_CAP_SECONDS": "3600"}, "300000"),  # no mode: the slice binds
        ({**ALLOW_SLICE, "GUARD_MODE": "Interval", "GUARD_CAP_SECONDS": "3600"}, "300000"),
        ({**ALLOW_SLICE, "GUARD_MODE": "interval"}, None),  # interval without a cap: refused
        ({**ALLOW_SLICE, "GUARD_MODE": "interval", "GUARD_CAP_SECONDS": "0"}, None),
        ({**ALLOW_SLICE, "GUARD_MODE": "interval", "GUARD_CAP_SECONDS": "36x"}, None),
        ({**ALLOW_SLICE, "GUARD_MODE": "interval", "GUARD_CAP_SECONDS": "1234567"}, None),
        ({"GUARD_MODE": "interval", "GUARD_CAP_SECONDS": "3600"}, None),  # no ALLOW
        (
            {"GUARD_RESULT": "ALLOW", "GUARD_MODE": "interval", "GUARD_CAP_SECONDS": "3600"},
            None,  # a cap never stands in for a missing GUARD_MAX_SECONDS
        ),
    ],
)
async def test_interval_mode_dials_with_the_cap_only_when_guard_set_both(
    path: Path, left: dict[str, str], limit: str | None
) -> None:
    channel = await _run_either(path, left, {})
    if limit is None:
        assert channel.dialed == [] and channel.hangup_cause == "21"
    else:
        assert channel.dialed == [f"PJSIP/00441234567@carrier,60,L({limit})"]


@pytest.mark.parametrize("path", [AGI_FILE, ARI_FILE], ids=["agi", "ari"])
async def test_an_endpoint_cannot_claim_interval_mode_for_itself(path: Path) -> None:
    # pjsip.conf set_var (or an inherited variable) naming a mode and a cap before Guard runs:
    # the dialplan resets the mode, so Guard's whole-call limit still binds.
    preset = {"GUARD_MODE": "interval", "GUARD_CAP_SECONDS": "99999"}
    channel = await _run_either(path, {"GUARD_RESULT": "ALLOW", "GUARD_MAX_SECONDS": "60"}, preset)
    assert channel.dialed == ["PJSIP/00441234567@carrier,60,L(60000)"]
