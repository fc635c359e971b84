"""certkeeper: keeps a self-hosted mail server's TLS certificates, DKIM keys and MTA-STS policy alive.

The flow, one module per step: config → renewal (plan) → issuer / dns (ACME and
DNS work) → store (files on disk) → hooks (reloads) → verification (what the
services really serve). ``daemon`` composes them; ``cli`` exposes them.
"""

__version__ = "0.1.0"
