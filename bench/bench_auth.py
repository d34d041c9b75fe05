"""Cost of authentication per request: cold JWT verification versus a cache hit (median microseconds).

Run: .venv/bin/python -m bench.bench_auth [ROUNDS]
"""

from __future__ import annotations

import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from app.auth.keys import KeyRing, mint_token
from app.auth.tokens import Authenticator, Principal

SECRET = secrets.token_urlsafe(48)
INTERNAL = secrets.token_urlsafe(32)


def median_us(call: Callable[[], object], rounds: int) -> float:
    """Median wall time of one call, in microseconds, after a short warm-up."""
    for _ in range(min(rounds, 200)):
        call()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        start = clock()
        call()
        samples.append(clock() - start)
    return statistics.median(samples) / 1000


def write_public_key(folder: str, name: str, private_key) -> str:
    path = os.path.join(folder, f"{name}.pem")
    with open(path, "wb") as handle:
        handle.write(
            private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return path


def private_pem(private_key) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    with tempfile.TemporaryDirectory() as folder:
        files = {"rsa-1": write_public_key(folder, "rsa", rsa_key), "ec-1": write_public_key(folder, "ec", ec_key)}
        keyring = KeyRing.from_config(SECRET, "default", files)

    tokens = {
        "HS256": mint_token(role="sira_service", subject="svc", ttl_s=3600, secret=SECRET),
        "RS256": mint_token(
            role="sira_service", subject="svc", ttl_s=3600, private_key_pem=private_pem(rsa_key),
            kid="rsa-1", algorithm="RS256",
        ),
        "ES256": mint_token(
            role="sira_service", subject="svc", ttl_s=3600, private_key_pem=private_pem(ec_key),
            kid="ec-1", algorithm="ES256",
        ),
    }
    uncached = Authenticator(keyring, INTERNAL, cache_size=0)
    cached = Authenticator(keyring, INTERNAL)
    principal = Principal("svc", frozenset({"sira_service"}))

    rows = []
    for algorithm, token in tokens.items():
        header = f"Bearer {token}"
        cold = median_us(lambda header=header: uncached.authenticate(header), rounds)
        warm = median_us(lambda header=header: cached.authenticate(header), rounds)
        rows.append((f"cold verify {algorithm} ({len(token)} chars)", cold))
        rows.append((f"cached lookup {algorithm}", warm))
    internal_header = f"Bearer {INTERNAL}"
    rows.append(("internal service token", median_us(lambda: cached.authenticate(internal_header), rounds)))
    rows.append(("authorize (allowed)", median_us(lambda: cached.authorize(principal, "infer"), rounds)))

    print(f"auth cost per call, median of {rounds} rounds (python {sys.version.split()[0]})")
    for name, micros in rows:
        print(f"  {name:<36} {micros:9.2f} us")


if __name__ == "__main__":
    main()
