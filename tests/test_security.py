"""Local Ray listens on loopback only, its token file is the owner's alone (the PS channel's own
checks are in test_ps_local.py)."""

from __future__ import annotations

import os
import stat

import pytest

from xdtrain.localray import exposed_listeners, secure_token_file


def test_the_embedded_ray_and_its_workers_listen_on_loopback_only(ray_cluster):
    if os.geteuid() != 0:
        pytest.skip("reading other processes' sockets needs root")

    @ray_cluster.remote
    class Echo:
        def ping(self) -> int:
            return 1

    a = Echo.remote()  # a worker process with its own gRPC server
    assert ray_cluster.get(a.ping.remote()) == 1
    assert exposed_listeners([os.getpid()]) == []
    ray_cluster.kill(a)


def test_the_token_file_is_created_and_kept_owner_only(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    path = tmp_path / ".ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert secure_token_file() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text()) == 64
    token = path.read_text()
    path.chmod(0o644)  # as Ray writes it
    assert secure_token_file() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == token  # tightened, same token
    path.unlink()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert secure_token_file() is None and not path.exists()  # no token where auth is off
