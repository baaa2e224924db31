"""SHA-256 for snapshot checksums, without loading OpenSSL.

Why: a restore's start-up is most of what it costs, and `import hashlib` loads
OpenSSL's libcrypto (`_hashlib`): ~7 ms here, ~90 ms in the lab, where everything on
the host side is emulated. CPython's own SHA-256 (`_sha256`, built into Debian's
interpreter) gives the same digests for the few kilobytes a restore checks; hashlib is
the fallback for an interpreter built without it.
"""

from __future__ import annotations

try:
    from _sha256 import sha256
except ImportError:  # pragma: no cover (an interpreter without CPython's own modules)
    from hashlib import sha256

__all__ = ["sha256"]
