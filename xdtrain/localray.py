"""Ray on this machine only: every Ray service on loopback, and a token file only its owner reads.

Left to itself, a local Ray (the embedded one `ray.init()` starts, or the nodes of
`cluster/local.py`) listens on every address: GCS and raylets on `::`, the agents on the host's IP,
so exposure rests on token authentication alone. Ray binds each server to the node's IP, and
resolves even an explicit 127.0.0.1 to the host's external IP unless its single-machine switch
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) is set. `bind_to_loopback` sets it for this process and
every process it starts (raylets, agents, workers, job drivers all resolve 127.0.0.1 then). The
switch also refuses `ray start` for a second node, so a cluster node is started through `ray_cli`,
which lets that one check pass and still hands the node 127.0.0.1 (tests/test_security.py and
tests/test_cluster.py check the listeners).

Ray writes `~/.ray/auth_token` with the default umask (0644): readable by every local user, and
the token is the cluster's only credential. `secure_token_file` creates it 0600 before Ray would,
or tightens one that exists.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

__all__ = ["bind_to_loopback", "exposed_listeners", "init_local", "ray_cli", "secure_token_file", "token_path"]

SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's node IP is 127.0.0.1


def bind_to_loopback() -> None:
    """Make Ray started or joined from this process, and from the processes it starts, use 127.0.0.1."""
    from ray._private import ray_constants

    os.environ[SINGLE_MACHINE] = "0"  # read at import time by the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported Ray already


def _loopback_node_ip(address: str | None = None) -> str:
    return "127.0.0.1"


def token_path() -> Path:
    """Where Ray reads its token from: $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def secure_token_file(create: bool = True) -> Path | None:
    """Make the token file 0600 (owner only), creating a new random token that way when there is none
    and `create`; returns its path (None when there is none). A token in $RAY_AUTH_TOKEN or a file
    of another owner is left alone."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_path()
    if not path.exists():
        if not create or os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
            return None
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it meanwhile: tighten that one below
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    st = path.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o600)
    return path


def init_local(**kwargs) -> None:
    """`ray.init(**kwargs)` for a new Ray on this machine: loopback only, token file 0600."""
    import ray

    bind_to_loopback()
    secure_token_file()
    ray.init(**kwargs)


def exposed_listeners(pids: list[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP listener of these processes and their descendants
    that is not on loopback: what `ss -ltnp` would show reachable from another machine."""
    import ipaddress

    import psutil

    tree: set[int] = set()
    for pid in pids:
        try:
            p = psutil.Process(pid)
            tree |= {pid, *(c.pid for c in p.children(recursive=True))}
        except psutil.NoSuchProcess:
            continue
    found = []
    for c in psutil.net_connections(kind="inet"):
        if c.status != psutil.CONN_LISTEN or c.pid not in tree:
            continue
        ip = ipaddress.ip_address(c.laddr.ip)
        ip = getattr(ip, "ipv4_mapped", None) or ip
        if not ip.is_loopback:
            try:
                name = psutil.Process(c.pid).name()
            except psutil.NoSuchProcess:
                name = "?"
            found.append((c.laddr.ip, c.laddr.port, name))
    return sorted(found)


def ray_cli(argv: list[str]) -> int:
    """Ray's own CLI (`ray start ...`) for a node of a cluster on this machine, on loopback: the node's
    processes inherit the single-machine switch; this one only passes the check that refuses a
    second node under it, and takes 127.0.0.1 as the node's IP."""
    import sys

    import ray.util
    from ray._private import ray_constants, services
    from ray.scripts.scripts import main

    bind_to_loopback()
    ray_constants.ENABLE_RAY_CLUSTER = True  # this process: `ray start --address` would abort otherwise
    services.get_node_ip_address = ray.util.get_node_ip_address = _loopback_node_ip
    sys.argv = ["ray", *argv]
    return main()

if __name__ == "__main__":
    import sys

    sys.exit(ray_cli(sys.argv[1:]))
