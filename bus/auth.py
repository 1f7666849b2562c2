"""CurveZMQ on the bus (docs/security.md#curvezmq): encryption plus an allow-list of client keys.

Keys are zmq's certificate files (``zmq.auth.create_certificates``): ``NAME.key`` holds the public
key, ``NAME.key_secret`` both. The server side (``apply_server``) loads its secret key, makes the
socket a CURVE server and starts a ZAP handler (``zmq.auth.thread.ThreadAuthenticator``, one per
zmq context) that accepts exactly the public keys found in ``allowed_clients_dir``; any other key
fails the handshake, so an unknown client never gets an answer. The client side (``apply_client``)
loads its own key pair and pins the server's public key.

Directory layout made by ``make_layout`` (what ``or1 keys`` and ``BusConfig.curve_dir`` use):
``DIR/server.key[_secret]`` for the learner, ``DIR/clients/NAME.key[_secret]`` per client, so
``DIR/clients`` is also the server's allow-list (it only reads the public ``.key`` files). Secret
key files are written 0600 and the directories 0700; a server refuses a secret key that other
users can read (``check_secret_key``) unless told otherwise (``bus.allow_readable_keys``).

**A client's key decides its role.** The name of its key file is its role, alone or followed by a
separator and anything (``actor``, ``actor-node7``, ``reward_b``, ``admin2``): ``key_role``. The
authenticator reports that name as the connection's ZAP User-Id (``NamingAuthenticator``), the
bus server stores it on the peer (``Peer.key``), and the learner refuses a Hello whose role is not
its key's (an admin key, or the learner's admin_key, for the admin role).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from bus.messages import ROLES

SERVER_NAME = "server"
CLIENTS_DIR = "clients"
_KEY_ROLE = re.compile(rf"^({'|'.join(ROLES)})(?:[-_.0-9].*)?$")


def key_role(name: str) -> str | None:
    """The role a client key named `name` grants (see the module docstring), or None."""
    m = _KEY_ROLE.match(name)
    return m.group(1) if m else None


def make_keys(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Create ``NAME.key`` and ``NAME.key_secret`` (0600) in `directory` (0700); returns (public, secret)."""
    Path(directory).mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


class KeyFileError(PermissionError):
    """A secret key other users can read: say which file and how to fix it."""


def check_secret_key(path: str | Path, allow_readable: bool = False) -> None:
    """Refuse a secret key file that users other than its owner and group can read (the mode
    Kubernetes gives Secret files with fsGroup, 0440, is fine). Follows links, as the file read is
    the target."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IROTH | stat.S_IWOTH) and not allow_readable:
        raise KeyFileError(f"{path} is readable by other users (mode {stat.filemode(mode)}): run `chmod 600 {path}` "
                           f"(or start with --set bus.allow_readable_keys=true to go on anyway)")


def make_layout(directory: str | Path, clients: list[str]) -> None:
    """Keys for a learner and the named clients, in the layout ``CurveConfig.server_from_dir`` reads.
    Every client name must grant a role (``key_role``)."""
    bad = [n for n in clients if key_role(n) is None]
    if bad:
        raise ValueError(f"client key names {bad} grant no role: name them {', '.join(ROLES)}, optionally "
                         f"followed by -SUFFIX (e.g. actor-node7)")
    make_keys(directory, SERVER_NAME)
    for name in clients:
        make_keys(Path(directory) / CLIENTS_DIR, name)


class NamingAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, reporting a client's key *name* (its file's stem in the allow-list) as
    the connection's User-Id, so the server knows which key, hence which role, each peer holds."""

    def __init__(self, ctx: zmq.Context, allowed_clients_dir: str | Path):
        super().__init__(ctx)
        self.names: dict[bytes, str] = {}
        for f in sorted(Path(allowed_clients_dir).glob("*.key")):
            public, _ = zmq.auth.load_certificate(str(f))
            self.names[public] = f.stem

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names.get(z85.encode(client_public_key), "")


@dataclass(frozen=True)
class CurveConfig:
    """Server side: `secret_key_file` + `allowed_clients_dir`. Client side: `secret_key_file` (its own
    key pair) + `server_public_key_file`."""

    secret_key_file: str
    allowed_clients_dir: str | None = None
    server_public_key_file: str | None = None

    @classmethod
    def server(cls, secret_key_file: str | Path, allowed_clients_dir: str | Path) -> "CurveConfig":
        return cls(str(secret_key_file), allowed_clients_dir=str(allowed_clients_dir))

    @classmethod
    def client(cls, secret_key_file: str | Path, server_public_key_file: str | Path) -> "CurveConfig":
        return cls(str(secret_key_file), server_public_key_file=str(server_public_key_file))

    @classmethod
    def server_from_dir(cls, directory: str | Path) -> "CurveConfig":
        d = Path(directory)
        return cls.server(d / f"{SERVER_NAME}.key_secret", d / CLIENTS_DIR)

    @classmethod
    def client_from_dir(cls, directory: str | Path, name: str) -> "CurveConfig":
        d = Path(directory)
        return cls.client(d / CLIENTS_DIR / f"{name}.key_secret", d / f"{SERVER_NAME}.key")


def apply_server(socket: zmq.Socket, cfg: CurveConfig, ctx: zmq.Context) -> ThreadAuthenticator:
    """Make `socket` a CURVE server allowing only `cfg.allowed_clients_dir`; call before bind.
    Returns the running authenticator (stop it when the socket's context ends)."""
    if cfg.allowed_clients_dir is None:
        raise ValueError("a CURVE server needs allowed_clients_dir")
    if not Path(cfg.allowed_clients_dir).is_dir():
        raise FileNotFoundError(f"allowed clients directory {cfg.allowed_clients_dir} does not exist")
    public, secret = zmq.auth.load_certificate(cfg.secret_key_file)
    if secret is None:
        raise ValueError(f"{cfg.secret_key_file} holds no secret key")
    auth = NamingAuthenticator(ctx, cfg.allowed_clients_dir)
    auth.start()
    auth.configure_curve(domain="*", location=str(cfg.allowed_clients_dir))
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return auth


def apply_client(socket: zmq.Socket, cfg: CurveConfig) -> None:
    """Give `socket` its key pair and pin the server's public key; call before connect."""
    if cfg.server_public_key_file is None:
        raise ValueError("a CURVE client needs server_public_key_file")
    public, secret = zmq.auth.load_certificate(cfg.secret_key_file)
    if secret is None:
        raise ValueError(f"{cfg.secret_key_file} holds no secret key")
    server_public, _ = zmq.auth.load_certificate(cfg.server_public_key_file)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = server_public


def server_curve(curve_dir: str | None, allow_readable: bool = False) -> CurveConfig | None:
    """The learner's (and a relay's) CURVE server config from `bus.curve_dir`, or None (plaintext).
    A relay serves with the learner's key pair, so pullers pin one server key whichever source
    they are sent to: nodes started with --relay-bind need DIR/server.key_secret too. KeyFileError
    when that secret key is readable by others (unless `allow_readable`)."""
    if not curve_dir:
        return None
    cfg = CurveConfig.server_from_dir(curve_dir)
    check_secret_key(cfg.secret_key_file, allow_readable)
    return cfg


def client_curve(curve_dir: str | None, name: str, key: str = "") -> CurveConfig | None:
    """A client's CURVE config from `bus.curve_dir` (its key pair DIR/clients/KEY.key_secret, KEY being
    `key` (bus.client_key) or else its role `name`), or None (plaintext)."""
    return CurveConfig.client_from_dir(curve_dir, key or name) if curve_dir else None
