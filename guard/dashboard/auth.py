"""Who may see the dashboard: password hashes, signed session cookies, CSRF tokens, login limits.

No secret is ever stored or compared in the clear: the password setting holds an scrypt hash
(``hash_password``), the API token is kept in memory only as its SHA-256, and every comparison
is constant-time (``hmac.compare_digest``). A session is a cookie signed with HMAC-SHA256 under a
key derived from the session secret *and* the password hash, so changing the password ends every
session; logging out revokes the session id until it would have expired. Each session has its
own CSRF token, derived from its id, that every state-changing request must echo.
No I/O here besides the clock; nothing in this module logs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass

from guard.errors import ConfigurationError

#: scrypt cost: 2**15 x 8 x 128 bytes = 32 MiB and ~0.1 s per check, which bounds guessing.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
_HASH_BYTES = 32
SCHEME = "scrypt"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=_SCRYPT_MAXMEM,
        dklen=_HASH_BYTES,
    )


def hash_password(password: str) -> str:
    """``scrypt:<n>:<r>:<p>:<salt>:<hash>`` for ``GUARD_DASHBOARD_PASSWORD_HASH``.

    No ``$`` in it (unlike the crypt formats), so shells, systemd and Compose files take it as
    it is; salt and hash are unpadded base64url.
    """
    if len(password) < 8:
        raise ConfigurationError("the dashboard password needs at least 8 characters")
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"{SCHEME}:{SCRYPT_N}:{SCRYPT_R}:{SCRYPT_P}:{_b64(salt)}:{_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (a ``hash_password`` result); slow on purpose."""
    try:
        scheme, n_text, r_text, p_text, salt_text, digest_text = encoded.split(":")
        n, r, p = int(n_text), int(r_text), int(p_text)
        salt, expected = _unb64(salt_text), _unb64(digest_text)
    except ValueError:
        return False
    if scheme != SCHEME or not (2 <= n <= 2**20 and 1 <= r <= 32 and 1 <= p <= 16):
        return False
    try:
        actual = _scrypt(password, salt, n, r, p)
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(actual, expected)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in browser: who, which session, until when (epoch seconds)."""

    user: str
    sid: str
    expires: float


class Sessions:
    """Issues, checks and revokes signed session cookies, and the CSRF token of each session."""

    def __init__(self, secret: str, password_hash: str, lifetime: float) -> None:
        base = secret.encode("utf-8") if secret else secrets.token_bytes(32)
        self._key = hmac.new(base, b"session|" + password_hash.encode(), hashlib.sha256).digest()
        self._lifetime = lifetime
        self._revoked: dict[str, float] = {}

    def _sign(self, payload: bytes) -> str:
        return _b64(hmac.new(self._key, payload, hashlib.sha256).digest())

    def issue(self, user: str, now: float | None = None) -> tuple[str, Session]:
        """A new session and its cookie value."""
        at = time.time() if now is None else now
        session = Session(user=user, sid=secrets.token_urlsafe(18), expires=at + self._lifetime)
        payload = json.dumps(
            {"u": session.user, "s": session.sid, "e": int(session.expires)},
            separators=(",", ":"),
        ).encode()
        return f"{_b64(payload)}.{self._sign(payload)}", session

    def check(self, cookie: str, now: float | None = None) -> Session | None:
        """The session of a cookie value, or ``None`` if forged, expired or logged out."""
        at = time.time() if now is None else now
        payload_text, _, signature = cookie.partition(".")
        try:
            payload = _unb64(payload_text)
        except ValueError:
            return None
        if not hmac.compare_digest(self._sign(payload), signature):
            return None
        try:
            raw = json.loads(payload)
            session = Session(user=str(raw["u"]), sid=str(raw["s"]), expires=float(raw["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if self.alive(session, at) else None

    def alive(self, session: Session, now: float | None = None) -> bool:
        """Whether ``session`` has neither expired nor logged out."""
        at = time.time() if now is None else now
        return session.expires > at and session.sid not in self._revoked

    def revoke(self, session: Session, now: float | None = None) -> None:
        """Log ``session`` out for good (until it would have expired anyway)."""
        at = time.time() if now is None else now
        self._revoked = {sid: end for sid, end in self._revoked.items() if end > at}
        self._revoked[session.sid] = session.expires

    def csrf_token(self, session: Session) -> str:
        return self._sign(b"csrf|" + session.sid.encode())

    def csrf_ok(self, session: Session, token: str) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(session), token)


class LoginLimiter:
    """At most ``attempts`` failed logins per client address in ``window`` seconds, and at most
    ``global_attempts`` from everyone (a spread-out guessing attack), before refusing outright."""

    def __init__(
        self, attempts: int = 5, window: float = 300.0, global_attempts: int = 100
    ) -> None:
        self._attempts = attempts
        self._window = window
        self._global_attempts = global_attempts
        self._failures: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()

    def _trim(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self._window:
            times.popleft()

    def retry_after(self, client: str, now: float | None = None) -> float:
        """Seconds before ``client`` may try again (0: now)."""
        at = time.time() if now is None else now
        self._trim(self._all, at)
        times = self._failures.get(client)
        if times is not None:
            self._trim(times, at)
            if not times:
                del self._failures[client]
                times = None
        waits = [0.0]
        if times is not None and len(times) >= self._attempts:
            waits.append(times[0] + self._window - at)
        if len(self._all) >= self._global_attempts:
            waits.append(self._all[0] + self._window - at)
        return max(waits)

    def failed(self, client: str, now: float | None = None) -> None:
        at = time.time() if now is None else now
        self._failures.setdefault(client, deque()).append(at)
        self._all.append(at)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)
