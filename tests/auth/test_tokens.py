from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, RSAKey

from pulse.auth.dev_tokens import mint_token
from pulse.auth.jwks import JwksCache, signing_keys
from pulse.auth.principal import Principal
from pulse.auth.tokens import TokenVerifier, principal_from_claims
from pulse.config import Settings
from pulse.errors import ApiError
from tests.auth.jwks_server import JwksServer, serve_jwks
from tests.support import TEST_SECRET, deeply_nested_token, until

RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "alg": "RS256", "use": "sig"})
EC = ECKey.generate_key("P-256", parameters={"kid": "ec-1", "alg": "ES256", "use": "sig"})
RSA_NEXT = RSAKey.generate_key(2048, parameters={"kid": "rsa-2", "alg": "RS256", "use": "sig"})


def claims(**extra: Any) -> dict[str, Any]:
    return {
        "sub": "user-1",
        "exp": int(time.time()) + 300,
        "roles": ["customer"],
        "tenant_id": "t1",
        **extra,
    }


def sign(key: RSAKey | ECKey, alg: str, body: dict[str, Any]) -> str:
    return jwt.encode({"alg": alg, "kid": key.kid}, body, key)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], body: dict[str, Any], hmac_secret: bytes | None) -> str:
    """A token built by hand, as an attacker would: alg none, or HMAC with any secret."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(body).encode())
    if hmac_secret is None:
        return signing_input + "."
    mac = hmac.new(hmac_secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(mac)


async def rejected(verifier: TokenVerifier, token: str) -> ApiError:
    with pytest.raises(ApiError) as info:
        await verifier.verify(token)
    return info.value


@pytest.fixture
def hs256() -> TokenVerifier:
    return TokenVerifier.from_settings(Settings(jwt_secret=TEST_SECRET))


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    with serve_jwks() as server:
        server.publish(RSA.as_dict(private=False), EC.as_dict(private=False))
        yield server


@pytest.fixture
def by_jwks(jwks: JwksServer) -> TokenVerifier:
    # The secret is configured too: it must not open an HMAC door next to the JWKS.
    return TokenVerifier.from_settings(Settings(jwt_secret=TEST_SECRET, jwks_url=jwks.url))


# --- HS256 -----------------------------------------------------------------


async def test_valid_hs256_token(hs256: TokenVerifier) -> None:
    token = mint_token(TEST_SECRET, tenant_id="t1", roles=["tenant-admin"], subject="alice")
    principal = await hs256.verify(token)
    assert principal.subject == "alice"
    assert principal.tenant_id == "t1"
    assert principal.roles == {"tenant-admin"}
    assert abs(principal.expires_at.timestamp() - (time.time() + 3600)) < 5


async def test_expired_token(hs256: TokenVerifier) -> None:
    token = mint_token(TEST_SECRET, tenant_id="t1", lifetime_s=-3600)
    assert (await rejected(hs256, token)).code == "token_expired"


async def test_expiry_within_leeway_is_accepted(hs256: TokenVerifier) -> None:
    token = mint_token(TEST_SECRET, tenant_id="t1", lifetime_s=-10)
    assert (await hs256.verify(token)).tenant_id == "t1"


async def test_expiry_beyond_leeway_is_rejected(hs256: TokenVerifier) -> None:
    token = mint_token(TEST_SECRET, tenant_id="t1", lifetime_s=-45)
    assert (await rejected(hs256, token)).code == "token_expired"


async def test_exp_is_required(hs256: TokenVerifier) -> None:
    body = claims()
    del body["exp"]
    token = jwt.encode({"alg": "HS256"}, body, OctKey.import_key(TEST_SECRET))
    error = await rejected(hs256, token)
    assert error.code == "invalid_token"
    assert "exp" in error.detail


@pytest.mark.parametrize("exp", [1e20, 300_000_000_000, 2**64])
async def test_exp_beyond_the_calendar_is_invalid(hs256: TokenVerifier, exp: float) -> None:
    """datetime.fromtimestamp raised OverflowError or ValueError: a 500."""
    token = jwt.encode({"alg": "HS256"}, claims(exp=exp), OctKey.import_key(TEST_SECRET))
    error = await rejected(hs256, token)
    assert error.code == "invalid_token"
    assert "exp" in error.detail


async def test_the_last_second_of_the_calendar_is_a_valid_exp(hs256: TokenVerifier) -> None:
    last = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    body = claims(exp=int(last.timestamp()))
    token = jwt.encode({"alg": "HS256"}, body, OctKey.import_key(TEST_SECRET))
    assert (await hs256.verify(token)).expires_at == last


@pytest.mark.parametrize("sub", ["a\u0000b", "\u001b[2J", "\ud800", "ad\u200bmin", "a\u2028b"])
async def test_a_sub_with_control_characters_is_invalid(hs256: TokenVerifier, sub: str) -> None:
    """The subject is stored with tickets and alert changes: PostgreSQL refuses NUL."""
    token = forge({"alg": "HS256"}, claims(sub=sub), TEST_SECRET.encode())
    error = await rejected(hs256, token)
    assert error.code == "invalid_token"
    assert "sub" in error.detail


async def test_wrong_signature(hs256: TokenVerifier) -> None:
    token = mint_token("another-secret-of-sufficient-length", tenant_id="t1")
    assert (await rejected(hs256, token)).code == "invalid_token"


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "a.b.c.d.e"])
async def test_malformed_tokens(hs256: TokenVerifier, token: str) -> None:
    assert (await rejected(hs256, token)).code == "invalid_token"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "header",
    [b"[1, 2]", b'"HS256"', b"{not json", b'{"alg": "HS256"', "\u00e9t\u00e9".encode()],
)
async def test_a_header_that_is_no_json_object_is_not_a_well_formed_jwt(
    hs256: TokenVerifier, header: bytes
) -> None:
    valid = mint_token(TEST_SECRET, tenant_id="t1")
    token = ".".join([_b64(header), *valid.split(".")[1:]])
    error = await rejected(hs256, token)
    assert (error.code, error.detail) == ("invalid_token", "The token is not a well-formed JWT.")


@pytest.mark.parametrize("token", ["\u00e9.b.c", "a.b", "."])
async def test_a_token_not_in_three_ascii_parts_is_not_a_well_formed_jwt(
    hs256: TokenVerifier, token: str
) -> None:
    assert (await rejected(hs256, token)).detail == "The token is not a well-formed JWT."


@pytest.mark.parametrize("crit", [5, None, True, [5], [None], "exp"])
async def test_a_crit_header_of_the_wrong_shape_is_an_invalid_token(
    hs256: TokenVerifier, crit: object
) -> None:
    """joserfc raised TypeError for these, which reached the client as a 500, for anyone
    without the secret (the header is read before the signature)."""
    token = forge({"alg": "HS256", "crit": crit}, claims(), b"not-the-secret")
    assert (await rejected(hs256, token)).code == "invalid_token"


@pytest.mark.parametrize("depth", [1000, 5000])
async def test_validly_signed_claims_nested_too_deeply_are_an_invalid_token(
    hs256: TokenVerifier, depth: int
) -> None:
    """joserfc reads the claims with the standard library's json after the signature
    is checked: a RecursionError, a 500 with its traceback (security audit, L2)."""
    error = await rejected(hs256, deeply_nested_token(depth))
    detail = "The token's claims are nested too deeply."
    assert (error.code, error.detail) == ("invalid_token", detail)


async def test_alg_none_is_rejected(hs256: TokenVerifier) -> None:
    token = forge({"alg": "none", "typ": "JWT"}, claims(), None)
    error = await rejected(hs256, token)
    assert error.code == "invalid_token"
    assert "'none'" in error.detail


async def test_other_hmac_algorithms_are_not_on_the_allow_list(hs256: TokenVerifier) -> None:
    token = jwt.encode(
        {"alg": "HS512"}, claims(), OctKey.import_key(TEST_SECRET), algorithms=["HS512"]
    )
    assert (await rejected(hs256, token)).code == "invalid_token"


async def test_no_verification_configured_rejects_everything() -> None:
    verifier = TokenVerifier.from_settings(Settings())
    token = mint_token(TEST_SECRET, tenant_id="t1")
    assert (await rejected(verifier, token)).code == "invalid_token"


async def test_issuer_and_audience_are_checked_when_configured() -> None:
    verifier = TokenVerifier.from_settings(
        Settings(jwt_secret=TEST_SECRET, jwt_issuer="https://idp/realm", jwt_audience="pulse")
    )

    def token(**extra: Any) -> str:
        return mint_token(TEST_SECRET, tenant_id="t1", **extra)

    ok = await verifier.verify(token(iss="https://idp/realm", aud=["account", "pulse"]))
    assert ok.tenant_id == "t1"
    assert "iss" in (await rejected(verifier, token(iss="https://evil", aud="pulse"))).detail
    assert "aud" in (await rejected(verifier, token(iss="https://idp/realm", aud="other"))).detail
    assert "aud" in (await rejected(verifier, token(iss="https://idp/realm"))).detail
    assert "iss" in (await rejected(verifier, token(aud="pulse"))).detail


async def test_issuer_and_audience_are_free_when_not_configured(hs256: TokenVerifier) -> None:
    token = mint_token(TEST_SECRET, tenant_id="t1", iss="anyone", aud="anything")
    assert (await hs256.verify(token)).tenant_id == "t1"


async def test_missing_roles_are_forbidden(hs256: TokenVerifier) -> None:
    token = mint_token(TEST_SECRET, tenant_id="t1", roles=["offline_access", "uma_authorization"])
    with pytest.raises(ApiError) as info:
        await hs256.verify(token)
    assert info.value.code == "forbidden"


# --- JWKS (RS256 / ES256) ---------------------------------------------------


async def test_rs256_and_es256_against_the_jwks(by_jwks: TokenVerifier, jwks: JwksServer) -> None:
    assert (await by_jwks.verify(sign(RSA, "RS256", claims()))).tenant_id == "t1"
    assert (await by_jwks.verify(sign(EC, "ES256", claims(tenant_id="t2")))).tenant_id == "t2"
    assert jwks.hits == 1  # cached after the first fetch


async def test_hs256_is_refused_when_a_jwks_is_configured(by_jwks: TokenVerifier) -> None:
    # Even signed with the configured secret: a JWKS deployment takes no HMAC tokens.
    token = mint_token(TEST_SECRET, tenant_id="t1")
    error = await rejected(by_jwks, token)
    assert error.code == "invalid_token"
    assert "'HS256'" in error.detail


async def test_algorithm_confusion_with_the_public_key(by_jwks: TokenVerifier) -> None:
    # The classic attack: HMAC-sign with the provider's public key as the secret.
    for public in (RSA.as_pem(private=False), json.dumps(RSA.as_dict(private=False)).encode()):
        token = forge({"alg": "HS256", "kid": "rsa-1"}, claims(), public)
        assert (await rejected(by_jwks, token)).code == "invalid_token"


async def test_alg_none_is_rejected_with_a_jwks(by_jwks: TokenVerifier) -> None:
    token = forge({"alg": "none", "kid": "rsa-1"}, claims(), None)
    assert (await rejected(by_jwks, token)).code == "invalid_token"


async def test_a_key_cannot_sign_for_another_algorithm(by_jwks: TokenVerifier) -> None:
    # ES256 signature, but the header names the RSA key.
    token = jwt.encode({"alg": "ES256", "kid": "rsa-1"}, claims(), EC)
    assert (await rejected(by_jwks, token)).code == "invalid_token"


async def test_wrong_key_signature_is_rejected(by_jwks: TokenVerifier) -> None:
    impostor = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
    token = jwt.encode({"alg": "RS256", "kid": "rsa-1"}, claims(), impostor)
    assert (await rejected(by_jwks, token)).code == "invalid_token"


def unnamed(key: RSAKey | ECKey, alg: str, body: dict[str, Any]) -> str:
    """A token signed by ``key`` whose header names no key (no ``kid``)."""
    return jwt.encode({"alg": alg}, body, key)


async def test_a_token_without_kid_is_verified_by_any_key_of_its_algorithm(
    jwks: JwksServer,
) -> None:
    """With a JWKS of more than one key, a correctly signed token without a kid was
    "signature not valid": joserfc takes the only key of a set and no other."""
    jwks.publish(
        RSA.as_dict(private=False), RSA_NEXT.as_dict(private=False), EC.as_dict(private=False)
    )
    verifier = TokenVerifier.from_settings(Settings(jwks_url=jwks.url))
    for key, alg in ((RSA, "RS256"), (RSA_NEXT, "RS256"), (EC, "ES256")):
        assert (await verifier.verify(unnamed(key, alg, claims()))).tenant_id == "t1", key.kid
    assert jwks.hits == 1  # no kid, nothing to refetch for

    stranger = RSAKey.generate_key(2048)
    error = await rejected(verifier, unnamed(stranger, "RS256", claims()))
    assert (error.code, error.detail) == ("invalid_token", "The token's signature is not valid.")
    assert jwks.hits == 1


async def test_without_kid_at_most_three_keys_are_tried(jwks: JwksServer) -> None:
    """The review: anyone may send a token without kid, and each key tried is a signature
    check (16 RSA keys: 1.77 ms against 0.08 ms for a token naming its key). Beyond
    MAX_KEYS_WITHOUT_KID keys of its algorithm, such a token is refused unchecked."""
    more = [RSAKey.generate_key(2048, parameters={"kid": f"rsa-{i}"}) for i in range(3, 5)]
    jwks.publish(*(k.as_dict(private=False) for k in (RSA, RSA_NEXT, *more, EC)))
    verifier = TokenVerifier.from_settings(Settings(jwks_url=jwks.url))
    error = await rejected(verifier, unnamed(RSA, "RS256", claims()))
    assert error.code == "invalid_token"
    assert error.detail == (
        "The token names no key (kid) and the identity provider has 4 keys for RS256: "
        "a token must name its key."
    )
    # A token naming its key is verified as ever; an ES256 one has one key to try.
    assert (await verifier.verify(sign(RSA, "RS256", claims()))).tenant_id == "t1"
    assert (await verifier.verify(unnamed(EC, "ES256", claims()))).tenant_id == "t1"


async def test_without_kid_a_key_signs_only_for_its_own_algorithm(jwks: JwksServer) -> None:
    rs512 = RSAKey.generate_key(2048, parameters={"kid": "rs512"})
    p384 = ECKey.generate_key("P-384", parameters={"kid": "p384"})
    jwks.publish(
        {**rs512.as_dict(private=False), "alg": "RS512"},
        p384.as_dict(private=False),
        RSA.as_dict(private=False),
        EC.as_dict(private=False),
    )
    verifier = TokenVerifier.from_settings(Settings(jwks_url=jwks.url))
    # A key declared for RS512 is not tried for RS256 (nor a P-384 key for ES256, which
    # joserfc would refuse outright): the keys after them are.
    token = jwt.encode({"alg": "RS256"}, claims(), rs512)
    assert (await rejected(verifier, token)).code == "invalid_token"
    assert (await verifier.verify(unnamed(RSA, "RS256", claims()))).tenant_id == "t1"
    assert (await verifier.verify(unnamed(EC, "ES256", claims()))).tenant_id == "t1"
    # The public keys are no HMAC secrets, kid or not; nor is "none" an algorithm.
    for public in (RSA.as_pem(private=False), EC.as_pem(private=False)):
        token = forge({"alg": "HS256"}, claims(), public)
        assert (await rejected(verifier, token)).code == "invalid_token"
    token = forge({"alg": "none"}, claims(), None)
    assert (await rejected(verifier, token)).code == "invalid_token"


async def test_unknown_kid_triggers_exactly_one_refetch(
    by_jwks: TokenVerifier, jwks: JwksServer
) -> None:
    await by_jwks.verify(sign(RSA, "RS256", claims()))
    assert jwks.hits == 1
    stranger = RSAKey.generate_key(2048, parameters={"kid": "nobody-knows"})
    token = sign(stranger, "RS256", claims())
    assert (await rejected(by_jwks, token)).code == "invalid_token"
    assert jwks.hits == 2
    # Repeated unknown kids within the refetch interval do not reach the provider.
    for _ in range(5):
        await rejected(by_jwks, token)
    assert jwks.hits == 2
    # Known keys keep working from the cache.
    assert (await by_jwks.verify(sign(EC, "ES256", claims()))).tenant_id == "t1"
    assert jwks.hits == 2


async def test_rotated_key_is_picked_up_by_one_refetch(
    by_jwks: TokenVerifier, jwks: JwksServer
) -> None:
    await by_jwks.verify(sign(RSA, "RS256", claims()))
    jwks.publish(RSA.as_dict(private=False), RSA_NEXT.as_dict(private=False))
    assert (await by_jwks.verify(sign(RSA_NEXT, "RS256", claims()))).tenant_id == "t1"
    assert jwks.hits == 2


async def test_concurrent_unknown_kids_share_one_fetch(
    by_jwks: TokenVerifier, jwks: JwksServer
) -> None:
    await by_jwks.verify(sign(RSA, "RS256", claims()))
    jwks.publish(RSA.as_dict(private=False), RSA_NEXT.as_dict(private=False))
    token = sign(RSA_NEXT, "RS256", claims())
    principals = await asyncio.gather(*(by_jwks.verify(token) for _ in range(10)))
    assert {p.tenant_id for p in principals} == {"t1"}
    assert jwks.hits == 2


async def test_first_use_fetches_once_for_concurrent_callers(
    by_jwks: TokenVerifier, jwks: JwksServer
) -> None:
    token = sign(EC, "ES256", claims())
    await asyncio.gather(*(by_jwks.verify(token) for _ in range(10)))
    assert jwks.hits == 1


async def test_refetch_is_allowed_again_after_the_interval(jwks: JwksServer) -> None:
    now = [1000.0]
    cache = JwksCache(jwks.url, refetch_interval_s=10, clock=lambda: now[0])
    verifier = TokenVerifier(jwks=cache)
    token = sign(RSA_NEXT, "RS256", claims())
    await rejected(verifier, token)  # first fetch
    await rejected(verifier, token)  # unknown kid: one refetch
    assert jwks.hits == 2
    jwks.publish(RSA_NEXT.as_dict(private=False))
    now[0] += 5
    await rejected(verifier, token)  # still inside the interval
    assert jwks.hits == 2
    now[0] += 6
    assert (await verifier.verify(token)).tenant_id == "t1"
    assert jwks.hits == 3


async def test_the_fetches_share_one_tls_context_built_off_the_event_loop(
    jwks: JwksServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    built: list[bool] = []
    build = httpx.create_ssl_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(threading.current_thread() is threading.main_thread())
        return build(*args, **kwargs)

    # httpx's clients build their own unless given one; the suite's conftest shares
    # httpx's default one, so count what the clients are given instead.
    given: list[object] = []
    init = httpx.AsyncClient.__init__

    def client(self: httpx.AsyncClient, *args: Any, **kwargs: Any) -> None:
        given.append(kwargs.get("verify", True))
        init(self, *args, **kwargs)

    monkeypatch.setattr(httpx, "create_ssl_context", counted)
    monkeypatch.setattr(httpx.AsyncClient, "__init__", client)
    now = [1000.0]
    cache = JwksCache(jwks.url, refetch_interval_s=10, clock=lambda: now[0])
    verifier = TokenVerifier(jwks=cache)
    token = sign(RSA_NEXT, "RS256", claims())
    for _ in range(3):
        await rejected(verifier, token)  # the first fetch, then unknown kids' refetches
        now[0] += 11
    assert jwks.hits == 3
    assert built == [False]  # once, in a thread
    assert len(given) == 3 and all(isinstance(v, ssl.SSLContext) for v in given)
    assert given[0] is given[1] is given[2]


async def test_keys_are_refreshed_when_old(jwks: JwksServer) -> None:
    now = [1000.0]
    cache = JwksCache(jwks.url, max_age_s=3600, clock=lambda: now[0])
    verifier = TokenVerifier(jwks=cache)
    await verifier.verify(sign(RSA, "RS256", claims()))
    jwks.publish(EC.as_dict(private=False))  # RSA withdrawn by the provider
    now[0] += 3601
    # Verified with the keys it has while they are refreshed, without waiting for it;
    # refused once the refresh is in.
    await verifier.verify(sign(RSA, "RS256", claims()))
    async with asyncio.timeout(10):
        while True:
            try:
                await verifier.verify(sign(RSA, "RS256", claims()))
            except ApiError as exc:
                assert exc.code == "invalid_token"
                break
            await asyncio.sleep(0.01)
    assert jwks.hits == 3  # the refresh, and the one refetch for a kid it no longer has


async def test_a_provider_that_stops_answering_stalls_no_request(jwks: JwksServer) -> None:
    """From the security audit: a fetch had a timeout per read only, and held the lock,
    so a provider sending a byte every 3 s kept a token with an unknown kid waiting for
    over a minute, and once the keys were an hour old, every request. A fetch now ends
    within its timeout, and old keys are refreshed in the background."""
    now = [1000.0]
    cache = JwksCache(jwks.url, max_age_s=60, timeout_s=2, clock=lambda: now[0])
    verifier = TokenVerifier(jwks=cache)
    await verifier.verify(sign(RSA, "RS256", claims()))
    jwks.drip_s = 0.2
    now[0] += 61  # old: refreshed in the background, from a provider that drips
    async with asyncio.timeout(1.5):  # under the fetch's timeout: it was not waited for
        for _ in range(5):
            assert (await verifier.verify(sign(RSA, "RS256", claims()))).tenant_id == "t1"
    # A first fetch is waited for, and gives up within its timeout.
    started = time.monotonic()
    async with asyncio.timeout(20):
        error = await rejected(
            TokenVerifier(jwks=JwksCache(jwks.url, timeout_s=0.5)), sign(RSA, "RS256", claims())
        )
    assert error.code == "keys_unavailable"
    assert time.monotonic() - started < 5, "the fetch outlived its timeout"


async def test_unreachable_jwks_is_unavailable_not_an_invalid_token(jwks: JwksServer) -> None:
    """Not the token's fault: a 401 sent every dashboard to its sign-in form (and said
    "retry shortly" with a status that means retrying will not help). A 503 with
    Retry-After, as for the database."""
    jwks.status = 503
    verifier = TokenVerifier(jwks=JwksCache(jwks.url))
    error = await rejected(verifier, sign(RSA, "RS256", claims()))
    assert (error.code, error.status) == ("keys_unavailable", 503)
    assert "retry shortly" in error.detail and error.headers["Retry-After"]


async def test_a_provider_outage_is_said_once_without_the_urls_credentials(
    jwks: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An operations audit: 200 requests during an outage wrote 202 warnings, each with
    the URL's password and API key. Now a line per 10 s for the fetches and one for the
    refusals, naming scheme, host and path only."""
    jwks.status = 404
    url = jwks.url.replace("http://", "http://idpuser:IDP-PASSWORD@") + "?api_key=JWKS-KEY"
    now = [1000.0]
    verifier = TokenVerifier(jwks=JwksCache(url, clock=lambda: now[0]))
    with caplog.at_level(logging.WARNING, logger="pulse.auth"):
        for _ in range(20):
            now[0] += 2  # past the retry interval: every request fetches again
            assert (await rejected(verifier, sign(RSA, "RS256", claims()))).status == 503
    assert jwks.hits == 20
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 2, lines
    assert all(jwks.url in line for line in lines), lines
    assert not [line for line in lines if "IDP" in line or "idpuser" in line or "JWKS-KEY" in line]
    assert "HTTP 404" in lines[0], lines


async def test_provider_outage_keeps_the_cached_keys(jwks: JwksServer) -> None:
    now = [1000.0]
    verifier = TokenVerifier(jwks=JwksCache(jwks.url, max_age_s=60, clock=lambda: now[0]))
    await verifier.verify(sign(RSA, "RS256", claims()))
    jwks.status = 500
    now[0] += 61
    assert (await verifier.verify(sign(RSA, "RS256", claims()))).tenant_id == "t1"
    await until(lambda: jwks.hits == 2)  # refreshed in the background, and failed
    assert (await verifier.verify(sign(RSA, "RS256", claims()))).tenant_id == "t1"


def test_symmetric_and_encryption_keys_are_dropped_from_a_jwks() -> None:
    oct_key = OctKey.generate_key(256, parameters={"kid": "shared"}).as_dict(private=True)
    enc_key = RSAKey.generate_key(2048, parameters={"kid": "enc", "use": "enc"}).as_dict(
        private=False
    )
    keys = signing_keys({"keys": [oct_key, enc_key, EC.as_dict(private=False)]})
    assert [key.kid for key in keys] == ["ec-1"]


# --- claims -> Principal ----------------------------------------------------


@pytest.mark.parametrize(
    ("organization", "tenant"),
    [
        ("acme", "acme"),
        ({"acme": {"id": "42"}, "other": {}}, "acme"),
        (["", 7, "acme", "other"], "acme"),
    ],
)
def test_organization_shapes(organization: object, tenant: str) -> None:
    principal = principal_from_claims(claims(organization=organization, tenant_id="fallback"))
    assert principal.tenant_id == tenant


@pytest.mark.parametrize("organization", [None, "", [], {}, [""]])
def test_tenant_id_is_the_fallback(organization: object) -> None:
    assert principal_from_claims(claims(organization=organization)).tenant_id == "t1"


def test_roles_come_from_realm_access_and_roles() -> None:
    principal = principal_from_claims(
        claims(
            realm_access={"roles": ["tenant-admin", "offline_access"]},
            roles=["customer", "something-else"],
        )
    )
    assert principal.roles == {"tenant-admin", "customer"}
    only_realm = claims(realm_access={"roles": ["customer"]})
    del only_realm["roles"]
    assert principal_from_claims(only_realm).roles == {"customer"}


def test_no_known_role_is_forbidden() -> None:
    body = claims(realm_access={"roles": ["default-roles-pulse"]})
    del body["roles"]
    with pytest.raises(ApiError, match="none of the roles"):
        principal_from_claims(body)


def test_a_non_operator_needs_a_tenant() -> None:
    body = claims()
    del body["tenant_id"]
    with pytest.raises(ApiError, match="names no tenant"):
        principal_from_claims(body)


@pytest.mark.parametrize("tenant", ["Acme Corporation", ".", ".."])
def test_a_non_operator_needs_a_valid_tenant(tenant: str) -> None:
    with pytest.raises(ApiError, match="not a valid tenant id"):
        principal_from_claims(claims(organization=tenant))


def test_operators_have_no_tenant_of_their_own() -> None:
    principal = principal_from_claims(claims(roles=["operator"], organization="acme"))
    assert principal == Principal(
        subject="user-1",
        tenant_id=None,
        roles=frozenset({"operator"}),
        expires_at=principal.expires_at,
    )
    assert principal.is_operator


def test_expires_at_is_the_exp_claim() -> None:
    principal = principal_from_claims(claims(exp=1_900_000_000))
    assert principal.expires_at == datetime.fromtimestamp(1_900_000_000, UTC)
