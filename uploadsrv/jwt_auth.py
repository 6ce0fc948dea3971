"""`--auth jwt`: bearer JWTs verified with PyJWT. Its own module, imported only in that
mode: PyJWT and cryptography add some 9 MB to every server process's RSS."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .auth import PUBLIC_KEY_ALGORITHMS, VERIFIED_CACHE, ConfigError, RawHeaders, _bearer
from .config import Settings
from .core.errors import Unauthorized


class JwtAuth:
    """`Authorization: Bearer <JWT>`: HS256 with `--jwt-secret`, RS256/ES256 with a PEM or
    JWKS `--jwt-public-key`; `exp` is required, `aud` and `iss` checked when configured."""

    def __init__(self, settings: Settings) -> None:
        self._secret = settings.jwt_secret
        self._keys = _public_keys(settings.jwt_public_key) if settings.jwt_public_key else {}
        if not self._secret and not self._keys:
            raise ConfigError("--auth jwt needs --jwt-secret or --jwt-public-key")
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._claim = settings.jwt_subject_claim
        self._leeway = settings.jwt_leeway
        self._required = ["exp", *(["aud"] if self._audience else []), *(["iss"] if self._issuer else [])]
        self._verified: dict[str, tuple[str, float]] = {}  #: token -> (subject, good until)

    def authenticate(self, headers: RawHeaders) -> str | None:
        token = _bearer(headers)
        if token is None:
            return None
        known = self._verified.get(token)
        if known is not None and time.time() < known[1]:
            return known[0]
        return self._verify(token)

    def _verify(self, token: str) -> str:
        try:
            claims = self._decode(token)
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired", invalid_token=True) from None
        except jwt.InvalidTokenError as error:
            raise Unauthorized(f"invalid token: {error}"[:200], invalid_token=True) from None
        subject = claims.get(self._claim)
        if not isinstance(subject, str) or not subject:
            raise Unauthorized(f"the token has no {self._claim!r} claim", invalid_token=True)
        self._remember(token, subject, claims["exp"])
        return subject

    def _remember(self, token: str, subject: str, expires: object) -> None:
        if not isinstance(expires, int | float) or not 0 < expires < 1e11:  # PyJWT took it; we need not
            return
        if len(self._verified) >= VERIFIED_CACHE:
            self._verified.clear()
        self._verified[token] = (subject, float(expires) + self._leeway)

    def _decode(self, token: str) -> dict[str, object]:
        """The verified claims, with the key its header names (by `alg`, and `kid` if any)."""
        header = jwt.get_unverified_header(token)
        algorithm = str(header.get("alg"))
        keys = self._keys_for(header.get("alg"), header.get("kid"))
        for key in keys[:-1]:  # a JWKS may hold several keys without ids: try each
            try:
                return self._decode_with(token, key, algorithm)
            except jwt.InvalidSignatureError:
                continue
        return self._decode_with(token, keys[-1], algorithm)

    def _keys_for(self, algorithm: object, kid: object) -> list[object]:
        """The keys that may have signed a token with this header: the shared secret for
        HS256, else the public keys of its algorithm whose id matches (or that have none)."""
        if algorithm == "HS256" and self._secret:
            return [self._secret]
        keys = [
            key
            for (key_id, key_algorithm), key in self._keys.items()
            if key_algorithm == algorithm and (kid is None or key_id is None or key_id == kid)
        ]
        if not keys:
            raise jwt.InvalidAlgorithmError(f"no key for algorithm {str(algorithm)[:10]!r}")
        return keys

    def _decode_with(self, token: str, key: object, algorithm: str) -> dict[str, object]:
        return jwt.decode(
            token,
            key,  # type: ignore[arg-type]  # a key PyJWT loaded itself; decode's annotation lists fewer kinds
            algorithms=[algorithm],
            audience=self._audience,
            issuer=self._issuer,
            leeway=self._leeway,
            options={"require": self._required},
        )


def _public_keys(path: Path) -> dict[tuple[str | None, str], object]:
    """Verification keys by (kid, algorithm) from a PEM public key or a JWKS file."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"--jwt-public-key: cannot read {path}: {error.strerror}") from None
    try:
        if text.lstrip().startswith("{"):
            keys = {}
            for jwk in jwt.PyJWKSet.from_dict(json.loads(text)).keys:
                if jwk.algorithm_name in PUBLIC_KEY_ALGORITHMS:
                    keys[(jwk.key_id, jwk.algorithm_name)] = jwk.key
            if not keys:
                raise ConfigError(f"--jwt-public-key: {path} has no RS256 or ES256 key")
            return keys
        key = load_pem_public_key(text.encode())
    except (ValueError, jwt.PyJWKError) as error:
        raise ConfigError(
            f"--jwt-public-key: {path} is neither a PEM public key nor a JWKS: {error}"
        ) from None
    if isinstance(key, rsa.RSAPublicKey):
        return {(None, "RS256"): key}
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        return {(None, "ES256"): key}
    raise ConfigError(f"--jwt-public-key: {path} is not an RSA or P-256 key")
