"""NATS decentralized auth for the tests: NKeys, signed JWTs and .creds files.

What `nsc` would make, minted in-process: an operator, a system account, an
account with JetStream enabled and its users. The server trusts the operator
(`operator:` in its config) and learns the accounts from a MEMORY resolver
preloaded with their JWTs; a user's JWT, signed by its account, goes with
its seed into a .creds file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import nkeys  # type: ignore[import-untyped]

# No limit at all; an account's JetStream is off unless its limits say otherwise.
UNLIMITED = -1
_JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Keys:
    """One NKey pair: `public` names an entity (O…, A…, U…), `seed` (S…) is its secret."""

    seed: str
    public: str

    @classmethod
    def new(cls, prefix: int) -> Keys:
        seed: bytes = nkeys.encode_seed(os.urandom(32), prefix)
        pair = nkeys.from_seed(seed)
        return cls(seed.decode(), bytes(pair.public_key).decode())

    def sign(self, data: bytes) -> bytes:
        return bytes(nkeys.from_seed(self.seed.encode()).sign(data))


def encode(issuer: Keys, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A JWT about `subject` signed by `issuer`, laid out as nats-io/jwt v2 does."""
    claims: dict[str, Any] = {
        "jti": "",
        "iat": int(time.time()),
        "iss": issuer.public,
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    # The id is the base32 SHA-512/256 of the claims without one.
    digest = hashlib.new("sha512_256", json.dumps(claims).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    signed = f"{_b64url(json.dumps(_JWT_HEADER).encode())}.{_b64url(json.dumps(claims).encode())}"
    return f"{signed}.{_b64url(issuer.sign(signed.encode()))}"


def account_jwt(operator: Keys, account: Keys, name: str, jetstream: bool) -> str:
    limits: dict[str, Any] = {
        "subs": UNLIMITED,
        "data": UNLIMITED,
        "payload": UNLIMITED,
        "imports": UNLIMITED,
        "exports": UNLIMITED,
        "wildcards": True,
        "conn": UNLIMITED,
        "leaf": UNLIMITED,
    }
    if jetstream:
        limits |= {
            "mem_storage": UNLIMITED,
            "disk_storage": UNLIMITED,
            "streams": UNLIMITED,
            "consumer": UNLIMITED,
        }
    return encode(operator, account.public, name, {"type": "account", "limits": limits})


def user_jwt(account: Keys, user: Keys, name: str) -> str:
    return encode(
        account,
        user.public,
        name,
        {
            "type": "user",
            "pub": {},
            "sub": {},
            "subs": UNLIMITED,
            "data": UNLIMITED,
            "payload": UNLIMITED,
        },
    )


def creds(jwt: str, seed: str) -> str:
    """A .creds file's text, as `nsc generate creds` writes it."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{jwt}\n"
        "------END NATS USER JWT------\n"
        "\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n"
        "\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed}\n"
        "------END USER NKEY SEED------\n"
        "\n"
        "*************************************************************\n"
    )


@dataclass(frozen=True)
class Operator:
    """An operator with a system account and one JetStream-enabled account `app`."""

    keys: Keys
    system: Keys
    app: Keys

    @classmethod
    def new(cls) -> Operator:
        return cls(
            Keys.new(nkeys.PREFIX_BYTE_OPERATOR),
            Keys.new(nkeys.PREFIX_BYTE_ACCOUNT),
            Keys.new(nkeys.PREFIX_BYTE_ACCOUNT),
        )

    def server_config(self) -> str:
        """nats-server configuration that trusts this operator and knows both accounts.

        No `jetstream {}` block: EmbeddedNats enables JetStream and sets its
        store_dir on the command line, and nats-server refuses a store_dir set twice.
        """
        operator = encode(
            self.keys,
            self.keys.public,
            "test-operator",
            {"type": "operator", "system_account": self.system.public},
        )
        preload = {
            self.app.public: account_jwt(self.keys, self.app, "app", jetstream=True),
            self.system.public: account_jwt(self.keys, self.system, "SYS", jetstream=False),
        }
        return "\n".join(
            [
                f"operator: {operator}",
                f"system_account: {self.system.public}",
                "resolver: MEMORY",
                "resolver_preload: {",
                *(f"  {account}: {jwt}" for account, jwt in preload.items()),
                "}",
                "",
            ]
        )
