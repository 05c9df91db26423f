"""A seal only this user can make: an HMAC-SHA256 under a per-user secret key kept outside every results folder.

    mac = seal("export", digest, run_dir, temperature)   # written beside what it vouches for
    verify(mac, "export", digest, run_dir, temperature)  # True only for a seal this user's key made

A SHA-256 stored next to a file proves nothing about who wrote it: whoever can replace the file
can rewrite the digest beside it. An HMAC can be made only with the key, and the key is not in
the folder: ~/.config/breakhis/secret.key (32 random bytes, created 0600 on first use), or the
file $BREAKHIS_SECRET names. A key file that others could read or write, or that another user
owns, is refused: a seal it made would prove nothing.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from .errors import UserError

KEY_ENV = "BREAKHIS_SECRET"  # the key file's path, instead of the default
KEY_BYTES = 32


def key_path() -> Path:
    return Path(os.environ.get(KEY_ENV) or Path.home() / ".config" / "breakhis" / "secret.key").expanduser()


def _key() -> bytes:
    """This user's secret key, created on first use."""
    path = key_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass  # made before (or by a process racing this one): read it below
    except OSError as e:
        raise UserError(f"cannot create the secret key {path} that seals trusted files ({e.strerror or e}); "
                        f"set {KEY_ENV} to a file path you can write") from None
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
    try:
        st = path.stat()
        key = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read the secret key {path} ({e.strerror or e}); set {KEY_ENV} to another path") from None
    if stat.S_IMODE(st.st_mode) & 0o077 or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
        raise UserError(f"the secret key {path} is not private to you (mode {stat.S_IMODE(st.st_mode):o}, owner "
                        f"{st.st_uid}): anyone who can read or write it can forge seals; delete it (a new one is made, "
                        f"and files sealed with the old one must be sealed again) or chmod 600 it")
    if len(key) < KEY_BYTES:  # an interrupted first write, or not ours
        raise UserError(f"the secret key {path} is damaged ({len(key)} bytes, need {KEY_BYTES}); delete it "
                        f"(a new one is made, and files sealed with the old one must be sealed again)")
    return key


def _message(parts: tuple) -> bytes:
    # NUL cannot occur in a path or a digest: the parts cannot run into each other
    return b"\0".join(str(p).encode("utf-8", "surrogateescape") for p in parts)


def seal(*parts) -> str:
    """The hex HMAC-SHA256 of the parts (their str()) under this user's key."""
    return hmac.new(_key(), _message(parts), hashlib.sha256).hexdigest()


def verify(mac, *parts) -> bool:
    """Whether mac is this user's seal of the parts."""
    return isinstance(mac, str) and hmac.compare_digest(mac, seal(*parts))
