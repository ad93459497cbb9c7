"""Signing keys published at a JWKS URL (an OIDC provider such as Keycloak).

Keys are fetched on first use and cached. A token whose ``kid`` the cache does
not know triggers one refetch, because providers rotate keys by publishing the
new one shortly before signing with it. Unknown kids are also what an attacker
can send at will, so such refetches are rate limited; and only one fetch runs at
a time: callers that queued behind it reuse its result.

A fetch ends within ``timeout_s`` whatever the provider does (a deadline for the
whole of it, body included, not per read), and reads at most ``MAX_DOCUMENT_BYTES``.
Keys past ``max_age_s`` are refreshed in the background while a token whose
``kid`` they know is verified with them: a provider that stopped answering
stalled every request once the keys were an hour old (the security audit: one
byte every 3 s kept requests waiting for over a minute).

The URL is logged as ``shown_url`` makes it, without the credentials a provider's
URL may hold (``user:password@``, an ``api_key`` in its query); and a provider's
outage is said once per 10 s (``Throttled``), not at every retry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from pulse.logs import Throttled

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 1024 * 1024


class JwksUnavailable(Exception):
    """No signing keys could be had from the JWKS URL."""


def shown_url(url: str) -> str:
    """``url`` as logs may show it: scheme, host, port and path, never the user,
    password, query or fragment."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


class JwksCache:
    def __init__(
        self,
        url: str,
        *,
        refetch_interval_s: float = 10.0,
        max_age_s: float = 3600.0,
        retry_after_failure_s: float = 1.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.shown_url = shown_url(url)
        self._outage = Throttled(log)
        self._refetch_interval_s = refetch_interval_s
        self._max_age_s = max_age_s
        self._retry_after_failure_s = retry_after_failure_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._keys: KeySet | None = None
        self._kids: frozenset[str] = frozenset()
        self._fetched_at = -math.inf
        self._unknown_kid_fetch_at = -math.inf
        self._failed_at = -math.inf
        self._attempts = 0
        self._lock = asyncio.Lock()
        self._refreshing: asyncio.Task[None] | None = None  # keys past max_age_s
        self._tls: ssl.SSLContext | None = None

    async def keys_for(self, kid: str | None) -> KeySet:
        """The key set to verify a token with this ``kid``, fetching it if needed.

        The set may still lack ``kid`` (an unknown key, refetch refused by the
        rate limit); verification then fails as it should.
        """
        if self._keys is not None and self._knows(kid):
            if self._too_old():
                self._refresh_in_background()
            return self._keys
        attempts_seen = self._attempts
        async with self._lock:
            # Someone else fetched while we queued: use that rather than fetch again.
            if self._attempts == attempts_seen and self._should_fetch(kid):
                await self._fetch()
        if self._keys is None:
            raise JwksUnavailable(f"no signing keys from {self.shown_url}")
        return self._keys

    def _refresh_in_background(self) -> None:
        if self._refreshing is not None and not self._refreshing.done():
            return
        if self._clock() - self._failed_at < self._retry_after_failure_s:
            return
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        async with self._lock:
            if self._too_old():  # not fetched by another caller meanwhile
                await self._fetch()

    def _knows(self, kid: str | None) -> bool:
        # A token without kid is matched against the set as it is (joserfc picks
        # the only key); refetching would not make it any more specific.
        return kid is None or kid in self._kids

    def _too_old(self) -> bool:
        return self._clock() - self._fetched_at >= self._max_age_s

    def _should_fetch(self, kid: str | None) -> bool:
        now = self._clock()
        if now - self._failed_at < self._retry_after_failure_s:
            return False
        if self._keys is None or self._too_old():
            return True
        if self._knows(kid):
            return False
        if now - self._unknown_kid_fetch_at < self._refetch_interval_s:
            return False
        self._unknown_kid_fetch_at = now
        return True

    async def _fetch(self) -> None:
        self._attempts += 1
        try:
            import httpx  # loaded only where a JWKS is configured

            if self._tls is None:
                # Once, and off the event loop: a client left to build its own loads
                # the CA bundle again, about 50 ms of the loop's CPU at every fetch
                # (and an unknown kid, which anyone can send, asks for one every
                # refetch_interval_s).
                self._tls = await asyncio.to_thread(httpx.create_ssl_context)
            async with (
                asyncio.timeout(self._timeout_s),
                httpx.AsyncClient(timeout=self._timeout_s, verify=self._tls) as client,
                client.stream("GET", self.url, headers={"Accept": "application/json"}) as response,
            ):
                response.raise_for_status()
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise ValueError(f"the document is over {MAX_DOCUMENT_BYTES} bytes")
            keys = signing_keys(json.loads(body))
        except TimeoutError:
            self._failed_at = self._clock()
            self._outage.warning(
                "could not fetch signing keys from %s within %g s", self.shown_url, self._timeout_s
            )
            return
        except (httpx.HTTPError, ValueError, JoseError) as exc:
            # Keep serving with the keys we had: a provider hiccup must not log everyone out.
            self._failed_at = self._clock()
            self._outage.warning(
                "could not fetch signing keys from %s: %s", self.shown_url, _reason(exc, self.url)
            )
            return
        self._keys = keys
        self._kids = frozenset(key.kid for key in keys if key.kid)
        self._fetched_at = self._clock()
        log.info("fetched %d signing keys from %s", len(keys.keys), self.shown_url)


def _reason(exc: Exception, url: str) -> str:
    """What went wrong, without the URL (httpx's status errors quote it whole)."""
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code} {exc.response.reason_phrase}".rstrip()
    return str(exc).replace(url, shown_url(url)) or type(exc).__name__


def signing_keys(document: Any) -> KeySet:
    """The asymmetric signature keys of a JWKS document.

    Symmetric (``oct``) keys are dropped: a key that anyone holding it can sign
    with has no place in a public key set, and accepting one would reopen the
    HMAC algorithm confusion the allow-list closes. So are encryption keys.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("the JWKS document has no 'keys' list")
    keys = [
        key
        for key in document["keys"]
        if isinstance(key, dict) and key.get("kty") != "oct" and key.get("use", "sig") == "sig"
    ]
    return KeySet.import_key_set({"keys": keys})
