"""Who sends a request: `--auth none|header|bearer|jwt`, and upload URLs that carry their
own authority.

One ASGI middleware turns each request to the upload endpoints into an `Identity` (the
owner, and the upload a signed URL grants, if any) or a 401, and counts the owner's
requests in flight. The protocols build the core's `Caller` from that identity; the core
decides what the owner may see.

Signed upload URLs: with auth on, every upload URL the server hands out ends in
`?sig=<expires>.<owner>.<mac>`, an HMAC over the upload id, the owner and the expiry. A
request bearing a valid one acts as that owner for that upload only, without a token, so
a phone's background retries (iOS resumes IETF uploads by itself) keep working when the
app's token has expired.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Settings
from .core.errors import TooManyRequests, Unauthorized, UploadError
from .core.quotas import OwnerQuotas
from .protocols import ietf
from .protocols.common import ANONYMOUS, IDENTITY, Identity, error_headers, error_problem, status_of

log = logging.getLogger("uploadsrv.auth")

MODES = ("none", "header", "bearer", "jwt")
SIGNATURE_PARAM = "sig"
#: Asymmetric JWT algorithms accepted with --jwt-public-key.
PUBLIC_KEY_ALGORITHMS = ("RS256", "ES256")
#: Verified JWTs remembered (a client sends the same token with every PATCH; verifying
#: one costs 0.1-0.4 ms of CPU, looking it up under a microsecond).
VERIFIED_CACHE = 4096


class ConfigError(ValueError):
    """Auth settings that cannot work; the message names the flag."""


#: A request's headers as the ASGI scope holds them.
RawHeaders = Sequence[tuple[bytes, bytes]]


class Authenticator(Protocol):
    def authenticate(self, headers: RawHeaders) -> str | None:
        """The subject the credentials name; None when there are none; Unauthorized when bad."""
        ...


def _values(headers: RawHeaders, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]


# -- the modes -------------------------------------------------------------------


class HeaderAuth:
    """A trusted proxy in front authenticates and names the subject in a header."""

    def __init__(self, name: str) -> None:
        self._name = name.lower().encode("latin-1")

    def authenticate(self, headers: RawHeaders) -> str | None:
        values = _values(headers, self._name)
        if len(values) > 1:  # a client's own header next to the proxy's: trust neither
            raise Unauthorized(f"more than one {self._name.decode()} header")
        value = values[0].strip() if values else b""
        return value.decode("latin-1") if value else None


def _bearer(headers: RawHeaders) -> str | None:
    """The token of `Authorization: Bearer <token>`; None without the header."""
    values = _values(headers, b"authorization")
    if not values:
        return None
    if len(values) > 1:
        raise Unauthorized("more than one Authorization header", invalid_token=True)
    scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization must be 'Bearer <token>'", invalid_token=True)
    return token.strip()


class TokenFileAuth:
    """Static API tokens: `token subject` per line of `--tokens-file`, reloaded on SIGHUP."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._subjects = self._read()

    def _read(self) -> dict[bytes, str]:
        """Subjects by the sha256 of their token: a lookup that leaks nothing of the token."""
        try:
            text = self.path.read_text()
        except OSError as error:
            raise ConfigError(f"--tokens-file: cannot read {self.path}: {error.strerror}") from None
        subjects = {}
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 2:
                raise ConfigError(f"--tokens-file: {self.path} line {number} is not 'token subject'")
            subjects[_digest(fields[0])] = fields[1]
        return subjects

    def reload(self) -> None:
        """Read the file again; a broken file keeps the tokens already loaded."""
        try:
            self._subjects = self._read()
        except ConfigError as error:
            log.error("tokens file not reloaded", extra={"error": str(error)})
        else:
            log.info("tokens file reloaded", extra={"tokens": len(self._subjects)})

    def authenticate(self, headers: RawHeaders) -> str | None:
        token = _bearer(headers)
        if token is None:
            return None
        subject = self._subjects.get(_digest(token))
        if subject is None:
            raise Unauthorized("unknown token", invalid_token=True)
        return subject


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def authenticator(settings: Settings) -> Authenticator | None:
    """The configured mode's authenticator; None for `--auth none`."""
    if settings.auth == "none":
        return None
    if settings.auth == "header":
        if not settings.owner_header:
            raise ConfigError("--auth header needs --owner-header NAME")
        return HeaderAuth(settings.owner_header)
    if settings.auth == "bearer":
        if settings.tokens_file is None:
            raise ConfigError("--auth bearer needs --tokens-file FILE")
        return TokenFileAuth(settings.tokens_file)
    if settings.auth == "jwt":
        from .jwt_auth import JwtAuth  # PyJWT and cryptography: 9 MB of RSS, loaded only for this mode

        return JwtAuth(settings)
    raise ConfigError(f"--auth: {settings.auth!r} is not one of {', '.join(MODES)}")


# -- signed upload URLs ------------------------------------------------------------


class UrlSigner:
    """Signs and verifies upload URLs; `previous` keys still verify, for rotation."""

    def __init__(
        self, key: bytes, previous: bytes | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._keys = [key, *([previous] if previous else [])]
        self._clock = clock

    def query(self, upload_id: str, owner: str, lifetime: float | None) -> str:
        """`sig=...` for the upload's URL, valid for `lifetime` seconds (None: for ever)."""
        expires = 0 if lifetime is None else int(self._clock() + lifetime) + 1
        return f"{SIGNATURE_PARAM}={self.sign(upload_id, owner, expires)}"

    def sign(self, upload_id: str, owner: str, expires: int) -> str:
        """`<expires>.<owner, base64url>.<mac, base64url>`; expires 0 never expires."""
        return f"{expires}.{_b64(owner.encode())}.{_b64(self._mac(self._keys[0], upload_id, owner, expires))}"

    def verify(self, upload_id: str, signature: str) -> Identity | None:
        """The identity a signature grants for `upload_id`, however old (the core weighs
        its expiry against the upload's); None if it is not ours for this upload."""
        expires_text, _, rest = signature.partition(".")
        owner_text, _, mac_text = rest.partition(".")
        if not expires_text.isascii() or not expires_text.isdigit() or len(expires_text) > 12:
            return None
        try:
            owner = base64.urlsafe_b64decode(owner_text + "=" * (-len(owner_text) % 4)).decode()
            mac = base64.urlsafe_b64decode(mac_text + "=" * (-len(mac_text) % 4))
        except (ValueError, UnicodeDecodeError):
            return None
        expires = int(expires_text)
        for key in self._keys:
            if hmac.compare_digest(mac, self._mac(key, upload_id, owner, expires)):
                return Identity(owner, grant=upload_id, grant_expires=float(expires) if expires else None)
        return None

    @staticmethod
    def _mac(key: bytes, upload_id: str, owner: str, expires: int) -> bytes:
        message = f"uploadsrv upload URL\n{upload_id}\n{expires}\n{owner}".encode()
        return hmac.new(key, message, hashlib.sha256).digest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def url_signer(settings: Settings) -> UrlSigner | None:
    """The signer of upload URLs with auth on: `--url-secret`, else derived from the JWT secret."""
    if settings.auth == "none":
        return None
    previous = settings.url_secret_previous.encode() if settings.url_secret_previous else None
    if settings.url_secret:
        return UrlSigner(settings.url_secret.encode(), previous)
    if settings.jwt_secret:
        derived = hmac.new(settings.jwt_secret.encode(), b"uploadsrv upload URLs", hashlib.sha256).digest()
        return UrlSigner(derived, previous)
    raise ConfigError("--url-secret is needed with --auth header or bearer, or a JWT public key only")


def prepare(settings: Settings) -> list[str]:
    """Check the auth settings before the server starts (ConfigError names the flag), and
    give a server that cannot derive a URL key a random one for this run (its worker
    processes share it through the environment); returns warnings."""
    warnings = []
    if settings.auth != "none" and not settings.url_secret and not settings.jwt_secret:
        settings.url_secret = secrets.token_urlsafe(32)
        warnings.append("no --url-secret: signed upload URLs stop working when the server restarts")
    authenticator(settings)
    url_signer(settings)
    return warnings


# -- the middleware ----------------------------------------------------------------


class AuthMiddleware:
    """Authenticates requests to the upload and chunk endpoints, in one place.

    A collection (`POST /files/`, `POST /chunks/`) needs credentials: 401 without. A request
    for one upload with a valid signed URL acts as its owner, whatever else it carries;
    without one, bad credentials are a 401 and no credentials are anonymous, which the core
    answers exactly as an unknown upload (404). OPTIONS (capabilities, CORS preflight)
    and every other route pass untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticator: Authenticator,
        signer: UrlSigner,
        prefixes: tuple[str, ...],
        quotas: OwnerQuotas | None = None,
    ) -> None:
        self.app = app
        self._authenticator = authenticator
        self._signer = signer
        self._prefixes = prefixes
        self._quotas = quotas

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = self._target(scope)
        if target is None:
            await self.app(scope, receive, send)
            return
        try:
            identity = self._identify(scope, target)
        except Unauthorized as error:
            await _refuse(error, scope, receive, send)
            return
        scope[IDENTITY] = identity
        owner = identity.owner
        if self._quotas is None or owner is None:
            await self.app(scope, receive, send)
            return
        try:
            await self._quotas.begin_request(owner)
        except TooManyRequests as error:
            await _refuse(error, scope, receive, send)
            return
        await _counted(self._quotas, owner, self.app, scope, receive, send)

    def _target(self, scope: Scope) -> str | None:
        """'' for a collection, the upload id for one upload, None for other routes."""
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            return None
        path: str = scope["path"]
        for prefix in self._prefixes:
            if path.startswith(prefix):
                return path[len(prefix) :].split("/", 1)[0]
        return None

    def _identify(self, scope: Scope, target: str) -> Identity:
        if target:
            query: bytes = scope.get("query_string", b"")
            if SIGNATURE_PARAM.encode() + b"=" in query:
                signature = dict(parse_qsl(query.decode("latin-1"))).get(SIGNATURE_PARAM, "")
                granted = self._signer.verify(target, signature)
                if granted is not None:
                    return granted
        owner = self._authenticator.authenticate(scope["headers"])
        if owner is None:
            if not target:
                raise Unauthorized("this request needs credentials")
            return ANONYMOUS
        return Identity(owner)


async def _refuse(error: UploadError, scope: Scope, receive: Receive, send: Send) -> None:
    response = error_problem(error, status_of(error), {**error_headers(error), **_echoed(scope)})
    await response(scope, receive, send)


def _echoed(scope: Scope) -> dict[str, str]:
    """What every answer of the request's protocol carries: tus its version, the draft
    the interop version the request named."""
    fields = dict(scope["headers"])
    if b"tus-resumable" in fields:
        return {"Tus-Resumable": "1.0.0"}
    interop = ietf.supported_version(fields.get(b"upload-draft-interop-version", b"").decode("latin-1"))
    return {} if interop is None else {ietf.HEADER: str(interop.version)}


async def _counted(
    quotas: OwnerQuotas, owner: str, app: ASGIApp, scope: Scope, receive: Receive, send: Send
) -> None:
    """Serve a request counted as in flight for `owner` until its answer is about to be
    complete for the client, so a client that has its answer may send the next request at
    once: before the last part of a body, or before the head of an answer without one
    (the server writes a head at once, and a HEAD's or a 204's ends there)."""
    ended = False
    head_only = scope["method"] == "HEAD"

    async def end() -> None:
        nonlocal ended
        if not ended:
            ended = True
            await quotas.end_request(owner)

    async def send_counted(message: Message) -> None:
        if _completes(message, head_only):
            await end()
        await send(message)

    try:
        await app(scope, receive, send_counted)
    finally:
        await end()


def _completes(message: Message, head_only: bool) -> bool:
    """Whether the client has the whole answer once `message` is sent: the last part of a
    body, or a head that is all of it (a HEAD's, a 204 or 304, Content-Length 0)."""
    if message["type"] == "http.response.body":
        return not message.get("more_body", False)
    if message["type"] != "http.response.start":
        return False
    if head_only or message["status"] in (204, 304):
        return True
    return any(name.lower() == b"content-length" and value == b"0" for name, value in message["headers"])
