"""A small interpreter for the shipped dialplan files, enough to prove their fail-closed logic.

It understands what ``dialplan/extensions_guard*.conf`` use: contexts, ``exten =>``/``same =>``
with ``n`` priorities and ``(label)``s, patterns (``_X.``, ``_[+0-9].``), ``${VAR}``,
``${URIENCODE()}``, ``${CHANNEL(x)}``, ``${CUT()}``, ``${IF()}``, ``${REGEX()}``,
``$["a" = "b"]``/``!=``, and the applications Set, ExecIf, GotoIf, Goto, NoOp, Verbose, AGI,
Stasis, Dial, Hangup and Return. ``AGI``/``Stasis`` call back into the test, which talks to a real
Guard server; ``Dial`` is recorded, not performed. Anything it does not understand raises, so a
dialplan change that the simulation cannot follow fails loudly instead of passing by accident.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

AppHook = Callable[[str, "Channel"], Awaitable[None] | None]


@dataclass
class Priority:
    number: int
    label: str | None
    app: str
    data: str


@dataclass
class Channel:
    variables: dict[str, str] = field(default_factory=dict)
    functions: dict[str, str] = field(default_factory=dict)
    dialed: list[str] = field(default_factory=list)
    hangup_cause: str | None = None
    hangup_handlers: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)


class DialplanError(Exception):
    pass


def parse_dialplan(text: str) -> dict[str, dict[str, list[Priority]]]:
    contexts: dict[str, dict[str, list[Priority]]] = {}
    current: dict[str, list[Priority]] | None = None
    last_exten: str | None = None
    for raw in text.splitlines():
        line = _strip_comment(raw).strip()
        if not line:
            continue
        if line.startswith("["):
            current = contexts.setdefault(line[1 : line.index("]")], {})
            continue
        if current is None:
            raise DialplanError(f"line outside a context: {raw!r}")
        kind, _, rest = line.partition("=>")
        kind = kind.strip()
        rest = rest.strip()
        if kind == "exten":
            exten, prio, appdata = rest.split(",", 2)
            last_exten = exten.strip()
        elif kind == "same":
            if last_exten is None:
                raise DialplanError("same => before exten =>")
            prio, appdata = rest.split(",", 1)
        else:
            raise DialplanError(f"unknown line: {raw!r}")
        steps = current.setdefault(last_exten, [])
        label = None
        prio = prio.strip()
        match = re.fullmatch(r"(\d+|n)(?:\((\w+)\))?", prio)
        if not match:
            raise DialplanError(f"bad priority {prio!r}")
        number = int(match.group(1)) if match.group(1) != "n" else len(steps) + 1
        label = match.group(2)
        app, _, data = appdata.strip().partition("(")
        steps.append(
            Priority(number, label, app.strip(), data[:-1] if data.endswith(")") else data)
        )
    return contexts


def _strip_comment(line: str) -> str:
    out = []
    escaped = False
    for char in line:
        if char == ";" and not escaped:
            break
        escaped = char == "\\"
        out.append(char)
    return "".join(out)


def pattern_matches(pattern: str, exten: str) -> bool:
    if not pattern.startswith("_"):
        return pattern == exten
    regex = ""
    body = pattern[1:]
    i = 0
    while i < len(body):
        char = body[i]
        if char == "X":
            regex += "[0-9]"
        elif char == "Z":
            regex += "[1-9]"
        elif char == "N":
            regex += "[2-9]"
        elif char == ".":
            regex += ".+"
        elif char == "!":
            regex += ".*"
        elif char == "[":
            end = body.index("]", i)
            regex += "[" + re.escape(body[i + 1 : end]).replace("\\-", "-") + "]"
            i = end
        else:
            regex += re.escape(char)
        i += 1
    return re.fullmatch(regex, exten) is not None


class Dialplan:
    def __init__(
        self,
        source: Path | str,
        agi: AppHook | None = None,
        stasis: AppHook | None = None,
    ) -> None:
        """``source``: a dialplan file, or its text (e.g. with the ADAPT lines adapted)."""
        text = source.read_text() if isinstance(source, Path) else source
        self.contexts = parse_dialplan(text)
        self.agi = agi
        self.stasis = stasis

    def find(self, context: str, exten: str) -> tuple[str, list[Priority]]:
        exts = self.contexts[context]
        exact = [p for p in exts if not p.startswith("_") and p == exten]
        matches = exact or [p for p in exts if pattern_matches(p, exten)]
        if not matches:
            raise DialplanError(f"no extension {exten!r} in [{context}]")
        return matches[0], exts[matches[0]]

    async def run(
        self, context: str, exten: str, channel: Channel, *, max_steps: int = 200
    ) -> Channel:
        channel.variables["EXTEN"] = exten
        _, steps = self.find(context, exten)
        index = 0
        for _ in range(max_steps):
            if index >= len(steps):
                return channel
            step = steps[index]
            channel.trace.append(f"{context},{exten},{step.number} {step.app}")
            jump = await self._execute(step, channel)
            if jump == "hangup":
                return channel
            if jump is None:
                index += 1
                continue
            target_context, target_exten, target_label = jump
            if target_context != context or target_exten != exten:
                context, exten = target_context, target_exten
                channel.variables["EXTEN"] = exten
                _, steps = self.find(context, exten)
            index = self._index_of(steps, target_label)
        raise DialplanError("dialplan did not finish (loop?)")

    async def run_hangup_handlers(self, channel: Channel) -> None:
        for handler in reversed(channel.hangup_handlers):
            context, exten, _prio = handler.split(",")
            await self.run(context, exten, channel)

    @staticmethod
    def _index_of(steps: list[Priority], target: str) -> int:
        for i, step in enumerate(steps):
            if step.label == target or str(step.number) == target:
                return i
        raise DialplanError(f"no priority/label {target!r}")

    async def _execute(self, step: Priority, ch: Channel) -> tuple[str, str, str] | str | None:
        app = step.app
        if app in {"NoOp", "Verbose", "Return"}:
            return None
        if app == "Set":
            self._set(self.expand(step.data, ch), ch)
            return None
        if app == "ExecIf":
            cond, _, action = step.data.partition("?")
            if self._truthy(self.expand(cond, ch)):
                inner_app, _, inner = action.partition("(")
                return await self._execute(Priority(step.number, None, inner_app, inner[:-1]), ch)
            return None
        if app == "GotoIf":
            cond, _, targets = step.data.partition("?")
            yes, _, no = targets.partition(":")
            target = yes if self._truthy(self.expand(cond, ch)) else no
            return self._goto(target, ch) if target else None
        if app == "Goto":
            return self._goto(step.data, ch)
        if app == "AGI":
            if self.agi is None:
                raise DialplanError("AGI without a hook")
            await _call(self.agi, self.expand(step.data, ch), ch)
            return None
        if app == "Stasis":
            if self.stasis is None:
                raise DialplanError("Stasis without a hook")
            await _call(self.stasis, self.expand(step.data, ch), ch)
            return None
        if app == "Dial":
            ch.dialed.append(self.expand(step.data, ch))
            return None
        if app == "Hangup":
            ch.hangup_cause = self.expand(step.data, ch) or "16"
            return "hangup"
        raise DialplanError(f"application {app} is not simulated")

    def _goto(self, target: str, ch: Channel) -> tuple[str, str, str]:
        parts = [self.expand(p, ch) for p in target.split(",")]
        current_context = ch.trace[-1].split(",")[0]
        current_exten = ch.variables["EXTEN"]
        if len(parts) == 1:
            return current_context, current_exten, parts[0]
        if len(parts) == 2:
            return current_context, parts[0], parts[1]
        return parts[0], parts[1], parts[2]

    @staticmethod
    def _set(assignment: str, ch: Channel) -> None:
        name, _, value = assignment.partition("=")
        if name == "CHANNEL(hangup_handler_push)":
            ch.hangup_handlers.append(value)
        elif "(" in name:
            ch.functions[name] = value
        else:
            ch.variables[name] = value

    @staticmethod
    def _truthy(value: str) -> bool:
        value = value.strip()
        return value not in {"", "0"}

    def expand(self, text: str, ch: Channel) -> str:
        out = ""
        i = 0
        while i < len(text):
            if text.startswith("${", i):
                end = _matching(text, i + 1)
                out += self._variable(self.expand(text[i + 2 : end], ch), ch)
                i = end + 1
            elif text.startswith("$[", i):
                end = _matching(text, i + 1, "[", "]")
                out += self._expression(self.expand(text[i + 2 : end], ch))
                i = end + 1
            else:
                out += text[i]
                i += 1
        return out

    def _variable(self, expr: str, ch: Channel) -> str:
        name, paren, args = expr.partition("(")
        if not paren:
            return ch.variables.get(expr, "")
        args = args[:-1]
        if name == "URIENCODE":
            return quote(args, safe="")
        if name == "IF":
            cond, _, rest = args.partition("?")
            yes, _, no = rest.partition(":")
            return yes if self._truthy(cond) else no
        if name == "REGEX":
            match = re.fullmatch(r'"(.*)" (.*)', args)
            if not match:
                raise DialplanError(f"bad REGEX({args})")
            return "1" if re.search(match.group(1), match.group(2)) else "0"
        if name == "CUT":
            value, delim, field_no = args.rsplit(",", 2)
            value = ch.functions.get(value, ch.variables.get(value, ""))
            pieces = value.split(delim)
            index = int(field_no) - 1
            return pieces[index] if index < len(pieces) else ""
        key = f"{name}({args})"
        return ch.functions.get(key, "")

    @staticmethod
    def _expression(expr: str) -> str:
        match = re.fullmatch(r'\s*"(.*)"\s*(=|!=)\s*"(.*)"\s*', expr)
        if not match:
            raise DialplanError(f"expression not simulated: {expr!r}")
        left, op, right = match.groups()
        return "1" if (left == right) == (op == "=") else "0"


async def _call(hook: AppHook, data: str, channel: Channel) -> None:
    result = hook(data, channel)
    if inspect.isawaitable(result):
        await result


def _matching(text: str, start: int, open_: str = "{", close: str = "}") -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i
    raise DialplanError(f"unbalanced {open_}{close} in {text!r}")
