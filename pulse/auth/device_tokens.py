"""Device provision tokens: shown once, stored only as a hash, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_device_token() -> tuple[str, bytes]:
    """Return a fresh token and the hash to store for it."""
    token = "pdt_" + secrets.token_urlsafe(32)
    return token, hash_device_token(token)


def hash_device_token(token: str) -> bytes:
    # Tokens carry 256 random bits, so a plain (unsalted) hash cannot be brute-forced.
    return hashlib.sha256(token.encode()).digest()


def device_token_matches(token: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_device_token(token), stored_hash)
