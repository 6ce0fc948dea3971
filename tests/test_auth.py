"""Auth modes against the real server: JWTs minted with PyJWT, static bearer tokens, and a
trusted proxy's header. Missing or bad credentials are a 401 problem with a Bearer challenge."""

from __future__ import annotations

import base64
import json
import random
import signal
import string
import time
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .conftest import TUS, Server, wait_for

SECRET = "jwt-secret-for-tests-0123456789abcdef"
AUDIENCE = "uploads"
ISSUER = "https://id.example.com"
COMPLETE = {"Upload-Complete": "?1"}
CLAIMS = ("--jwt-audience", AUDIENCE, "--jwt-issuer", ISSUER)


def mint(subject: str = "alice", *, key: object = SECRET, algorithm: str = "HS256", **claims: object) -> str:
    headers = {"kid": claims.pop("kid")} if "kid" in claims else None
    payload = {"sub": subject, "exp": int(time.time()) + 600, "aud": AUDIENCE, "iss": ISSUER, **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)  # type: ignore[arg-type]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def create(client: httpx.AsyncClient, server: Server, **headers: str) -> httpx.Response:
    return await client.post(server.files, headers={**TUS, "Upload-Length": "5", **headers})


@pytest.fixture(scope="module")
def jwt_server(start_module_server) -> Server:
    return start_module_server("--auth", "jwt", "--jwt-secret", SECRET, *CLAIMS)


async def test_a_valid_jwt_creates_an_upload_owned_by_its_subject(client, jwt_server) -> None:
    response = await create(client, jwt_server, **bearer(mint("alice")))
    assert response.status_code == 201
    details = json.loads(
        jwt_server.cli("inspect", "--json", Server.upload_id(response.headers["location"])).stdout
    )
    assert details["owner"] == "alice"


async def test_no_credentials_on_a_collection_is_a_401_with_a_bearer_challenge(client, jwt_server) -> None:
    for response in (
        await create(client, jwt_server),
        await client.post(jwt_server.url + "/chunks/", json={"size": 5}),
        await client.post(
            jwt_server.files, headers={"Upload-Draft-Interop-Version": "6", "Upload-Complete": "?1"}
        ),
    ):
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer realm="uploadsrv"'
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"] == "urn:uploadsrv:problem:unauthorized"


@pytest.mark.parametrize("version", ["4", "6"])
async def test_a_draft_401_echoes_the_interop_version_like_every_draft_answer(client, jwt_server, version):
    draft = {"Upload-Draft-Interop-Version": version, "Upload-Complete": "?1"}
    created = await client.post(jwt_server.files, headers={**draft, **bearer(mint())}, content=b"abc")
    location = created.headers["location"].split("?")[0]
    expired = bearer(mint(exp=int(time.time()) - 120))
    for response in (
        await client.post(jwt_server.files, headers=draft),
        await client.head(location, headers={"Upload-Draft-Interop-Version": version, **expired}),
    ):
        assert response.status_code == 401
        assert response.headers["upload-draft-interop-version"] == version
        assert "tus-resumable" not in response.headers


@pytest.mark.parametrize(
    ("case", "token"),
    [
        ("expired", lambda: mint(exp=int(time.time()) - 120)),
        ("wrong key", lambda: mint(key="another-secret-0123456789abcdef0123")),
        ("wrong audience", lambda: mint(aud="someone-else")),
        ("wrong issuer", lambda: mint(iss="https://evil.example.com")),
        ("missing exp", lambda: mint(exp=None)),
        ("no subject", lambda: mint(sub=None)),
        (
            "unsigned",
            lambda: jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none"),
        ),
        ("not a jwt", lambda: "garbage"),
    ],
)
async def test_a_bad_jwt_is_a_401_invalid_token(client, jwt_server, case, token) -> None:
    response = await create(client, jwt_server, **bearer(token()))
    assert response.status_code == 401, case
    assert response.headers["www-authenticate"].startswith('Bearer realm="uploadsrv", error="invalid_token"')
    assert response.json()["status"] == 401


async def test_a_bad_token_is_a_401_on_an_upload_url_too(client, jwt_server) -> None:
    location = (await create(client, jwt_server, **bearer(mint()))).headers["location"].split("?")[0]
    expired = mint(exp=int(time.time()) - 120)
    response = await client.head(location, headers={**TUS, **bearer(expired)})
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_a_jwt_within_the_leeway_is_accepted(client, jwt_server) -> None:
    assert (await create(client, jwt_server, **bearer(mint(exp=int(time.time()) - 5)))).status_code == 201


async def test_other_authorization_schemes_are_a_401(client, jwt_server) -> None:
    response = await create(client, jwt_server, Authorization="Basic YWxpY2U6c2VjcmV0")
    assert response.status_code == 401


async def test_health_metrics_openapi_options_and_preflight_need_no_credentials(client, jwt_server) -> None:
    assert (await client.get(jwt_server.url + "/healthz")).status_code == 200
    assert (await client.get(jwt_server.url + "/metrics")).status_code == 200
    assert (await client.get(jwt_server.url + "/openapi.json")).status_code == 200
    assert (await client.options(jwt_server.files)).status_code == 204
    preflight = await client.options(
        jwt_server.files,
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, tus-resumable, upload-length",
        },
    )
    assert preflight.status_code == 200
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()


async def test_a_401_carries_cors_headers_for_browsers(client, jwt_server) -> None:
    response = await create(client, jwt_server, Origin="https://app.example.com")
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == "*"
    assert "www-authenticate" in response.headers["access-control-expose-headers"].lower()


def _pem(key: object) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def test_rs256_with_a_pem_public_key(client, start_server, tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "key.pem").write_bytes(_pem(private))
    server = start_server("--auth", "jwt", "--jwt-public-key", str(tmp_path / "key.pem"), *CLAIMS)
    assert (await create(client, server, **bearer(mint(key=private, algorithm="RS256")))).status_code == 201
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert (await create(client, server, **bearer(mint(key=other, algorithm="RS256")))).status_code == 401
    # an HS256 token "signed" with the public key must not pass (algorithm confusion)
    forged = jwt.encode(
        {"sub": "x", "exp": int(time.time()) + 60}, "not-the-key-0123456789abcdef01234", "HS256"
    )
    assert (await create(client, server, **bearer(forged))).status_code == 401


async def test_es256_and_rs256_from_a_jwks_file_by_key_id(client, start_server, tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = []
    for kid, private, algorithm in (("ec-1", ec_key, "ES256"), ("rsa-1", rsa_key, "RS256")):
        algo = jwt.algorithms.ECAlgorithm if algorithm == "ES256" else jwt.algorithms.RSAAlgorithm
        jwk = json.loads(algo.to_jwk(private.public_key()))
        keys.append({**jwk, "kid": kid, "alg": algorithm, "use": "sig"})
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": keys}))
    server = start_server("--auth", "jwt", "--jwt-public-key", str(tmp_path / "jwks.json"), *CLAIMS)
    for kid, private, algorithm in (("ec-1", ec_key, "ES256"), ("rsa-1", rsa_key, "RS256")):
        good = mint(key=private, algorithm=algorithm, kid=kid)
        assert (await create(client, server, **bearer(good))).status_code == 201, algorithm
    wrong_kid = mint(key=ec_key, algorithm="ES256", kid="rsa-1")
    assert (await create(client, server, **bearer(wrong_kid))).status_code == 401


async def test_bearer_tokens_from_a_file_reloaded_on_sighup(client, start_server, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# token subject\ntok-alice-1 alice\ntok-bob-1 bob\n")
    server = start_server("--auth", "bearer", "--tokens-file", str(tokens))
    response = await create(client, server, **bearer("tok-alice-1"))
    assert response.status_code == 201
    upload = response.headers["location"].split("?")[0]
    assert (await client.head(upload, headers={**TUS, **bearer("tok-alice-1")})).status_code == 200
    assert (await client.head(upload, headers={**TUS, **bearer("tok-bob-1")})).status_code == 404
    unknown = await create(client, server, **bearer("tok-mallory"))
    assert unknown.status_code == 401 and 'error="invalid_token"' in unknown.headers["www-authenticate"]

    tokens.write_text("tok-alice-2 alice\n")
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: httpx.head(upload, headers={**TUS, **bearer("tok-alice-2")}).status_code == 200,
        what="the new token to be accepted",
    )
    assert (await create(client, server, **bearer("tok-alice-1"))).status_code == 401


async def test_owner_header_alone_means_header_mode(client, start_server) -> None:
    server = start_server("--owner-header", "X-User")
    assert (await create(client, server)).status_code == 401
    response = await create(client, server, **{"X-User": "alice"})
    assert response.status_code == 201
    upload = response.headers["location"].split("?")[0]
    assert (await client.head(upload, headers={**TUS, "X-User": "alice"})).status_code == 200
    assert (await client.head(upload, headers={**TUS, "X-User": "bob"})).status_code == 404
    two = [("Tus-Resumable", "1.0.0"), ("Upload-Length", "5"), ("X-User", "bob"), ("X-User", "alice")]
    assert (await client.post(server.files, headers=two)).status_code == 401


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--auth", "jwt"], "--auth jwt needs --jwt-secret or --jwt-public-key"),
        (["--auth", "bearer"], "--auth bearer needs --tokens-file FILE"),
        (["--auth", "bearer", "--tokens-file", "/nonexistent/tokens"], "--tokens-file: cannot read"),
        (["--auth", "header"], "--auth header needs --owner-header NAME"),
        (["--auth", "kerberos"], "--auth: 'kerberos' is not one of none, header, bearer, jwt"),
    ],
)
def test_bad_auth_settings_end_in_one_line_and_status_2(tmp_path: Path, flags, message) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "uploadsrv", "serve", "--data-dir", str(tmp_path), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _odd_tokens(rng: random.Random) -> list[str]:
    """Tokens a client or an attacker might send: garbage, odd headers, odd claims (validly signed)."""
    alphabet = string.ascii_letters + string.digits + "-_.=+/ \t\"'\\,;"
    now = int(time.time())
    signed_claims = [
        {"sub": "alice", "exp": "tomorrow"},
        {"sub": "alice", "exp": 10**400},
        {"sub": "alice", "exp": 1e300},
        {"sub": 42, "exp": now + 60, "aud": AUDIENCE, "iss": ISSUER},
        {"sub": "", "exp": now + 60, "aud": AUDIENCE, "iss": ISSUER},
        {"sub": "alice", "exp": now + 60, "aud": {"a": 1}, "iss": ISSUER},
        {"sub": "alice", "exp": now + 60, "aud": AUDIENCE, "iss": ISSUER, "nbf": now + 3600},
        {"sub": "alice", "exp": now + 60, "aud": AUDIENCE, "iss": ISSUER, "iat": "yesterday"},
    ]
    tokens = [jwt.encode(claims, SECRET, "HS256") for claims in signed_claims]
    for header in ({"alg": 123}, {"kid": {"x": 1}}, {"alg": "RS256"}, {"alg": "none"}, {"typ": None}):
        body = base64.urlsafe_b64encode(json.dumps({"sub": "a", "exp": now + 60}).encode()).decode()
        head = base64.urlsafe_b64encode(json.dumps(header).encode()).decode()
        tokens.append(f"{head}.{body}.c2ln")
    for _ in range(40):
        tokens.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))).strip() or "x")
        parts = [base64.urlsafe_b64encode(rng.randbytes(rng.randint(0, 60))).decode() for _ in range(3)]
        tokens.append(".".join(parts))
    return tokens


async def test_odd_credentials_and_signatures_never_give_a_5xx(client, jwt_server) -> None:
    rng = random.Random(14)
    upload = (await create(client, jwt_server, **bearer(mint()))).headers["location"]
    bare = upload.split("?")[0]
    statuses = set()
    for token in _odd_tokens(rng):
        for authorization in (f"Bearer {token}", token, f"bearer  {token}"):
            headers = {**TUS, "Upload-Length": "5", "Authorization": authorization}
            statuses.add((await client.post(jwt_server.files, headers=headers)).status_code)
        sig = "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 80)))
        response = await client.head(bare, params={"sig": sig}, headers=TUS)
        statuses.add(response.status_code)
        forged = f"{rng.randint(0, 10**15)}.{token[:40]}.{token[-30:]}"
        statuses.add((await client.head(bare, params={"sig": forged}, headers=TUS)).status_code)
    assert statuses <= {401, 404}, statuses
    for far in (10**400, 1e300):  # validly signed, if odd: accepted, and no overflow
        token = jwt.encode({"sub": "alice", "exp": far, "aud": AUDIENCE, "iss": ISSUER}, SECRET, "HS256")
        assert (await create(client, jwt_server, **bearer(token))).status_code == 201
    assert "Traceback" not in jwt_server.log.read_text()
