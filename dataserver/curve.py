"""ZeroMQ CURVE: encryption and authentication for consumers beyond this machine.

``dataserver keys DIR`` makes a key pair for the server and one for consumers::

    DIR/server.key, DIR/server.key_secret        the server's (keep the secret one on it)
    DIR/client.key, DIR/client.key_secret        a consumer's (copy both to the trainer host)
    DIR/authorized/client.key                    public keys the server lets in

``dataserver serve --curve-keys DIR`` loads the server's secret key and admits only consumers
whose public key is in ``DIR/authorized``; ``RemoteSequence(curve_keys=DIR)`` (or
``$DATASERVER_CURVE_KEYS``) needs ``server.key`` and ``client.key_secret``. Standard library and
pyzmq only: the client uses it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from dataserver.errors import ConfigError

__all__ = ["client_keys", "make_keys", "secure_client", "secure_server"]


def make_keys(directory: str | Path) -> list[Path]:
    """Create the server's and a consumer's key pairs and authorize the consumer's."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    made = []
    for name in ("server", "client"):
        if not (d / f"{name}.key_secret").exists():
            public, secret = zmq.auth.create_certificates(str(d), name)
            os.chmod(secret, 0o600)
            made += [Path(public), Path(secret)]
    authorized = d / "authorized"
    authorized.mkdir(mode=0o700, exist_ok=True)
    shutil.copy(d / "client.key", authorized / "client.key")
    return made


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, private = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the CURVE key {path} ({exc}); make keys with "
                          "`dataserver keys DIR`") from None
    if secret and private is None:
        raise ConfigError(f"{path} holds no secret key; pass the *.key_secret file's folder")
    return public, private


def secure_server(sock: zmq.Socket[Any], ctx: zmq.Context[Any], directory: str) -> Any:
    """Make ``sock`` a CURVE server admitting the keys in DIR/authorized; returns the
    authenticator thread (stop it at shutdown)."""
    from zmq.auth.thread import ThreadAuthenticator

    d = Path(directory)
    public, secret = _load(d / "server.key_secret", secret=True)
    if not (d / "authorized").is_dir():
        raise ConfigError(f"--curve-keys {d}: no authorized/ folder of consumer public keys")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(d / "authorized"))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth


def client_keys(directory: str | None) -> tuple[bytes, bytes, bytes] | None:
    """(server public, client public, client secret) from DIR, or None without keys."""
    directory = directory or os.environ.get("DATASERVER_CURVE_KEYS")
    if not directory:
        return None
    d = Path(directory)
    server_public, _ = _load(d / "server.key", secret=False)
    public, secret = _load(d / "client.key_secret", secret=True)
    assert secret is not None
    return server_public, public, secret


def secure_client(sock: zmq.Socket[Any], keys: tuple[bytes, bytes, bytes] | None) -> None:
    if keys is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys
