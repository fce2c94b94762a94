"""Local multi-node Ray (`cluster.local`) and the job runtime_env (`cluster.runtime_env`).

The multi-node tests never call ray.init in this process (the session's `ray_cluster` fixture may
own it): nodes are separate `ray start` process trees, inspected through the GCS client of
`LocalCluster.nodes()` or through a driver run in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from cluster.cli import main
from cluster.local import ClusterError, LocalCluster, NodeSpec
from cluster.runtime_env import EXCLUDES, REPO_ROOT, job_runtime_env
from xdtrain.localray import exposed_listeners


@pytest.fixture
def short_root():
    """A cluster root short enough for Ray's socket paths (pytest's tmp_path is too long)."""
    root = Path(tempfile.mkdtemp(prefix="xdc-"))
    yield root
    if (root / "state.json").exists():  # a failed test must not leave nodes running
        LocalCluster.attach(root).shutdown()
    subprocess.run(["rm", "-rf", str(root)], check=False)


# --- runtime_env ----------------------------------------------------------------------------------


def test_runtime_env_ships_the_code_not_the_venv_data_or_runs():
    from ray._private.runtime_env.packaging import _get_excludes
    from ray.runtime_env import RuntimeEnv

    env = job_runtime_env({"XDTRAIN_X": "1", "HF_HUB_OFFLINE": "0"})
    assert env["working_dir"] == str(REPO_ROOT) and (REPO_ROOT / "pyproject.toml").exists()
    assert env["env_vars"]["XDTRAIN_X"] == "1" and env["env_vars"]["HF_HUB_OFFLINE"] == "0"  # caller wins
    assert job_runtime_env()["env_vars"]["HF_HUB_OFFLINE"] == "1"
    RuntimeEnv(**env)  # Ray accepts it
    excluded = _get_excludes(REPO_ROOT, env["excludes"])  # Ray's own matcher, as used when packaging
    for path in [
        ".venv/bin/python",
        "data/external/ml-1m.inter",
        "runs/demo/metrics.json",
        ".git/HEAD",
        "xdtrain/__pycache__/cli.cpython-311.pyc",
        "bench/results/x.json",
    ]:
        assert excluded(REPO_ROOT / path), path
    for path in [
        "xdtrain/data/reader.py",
        "jobs/__init__.py",
        "cluster/local.py",
        "configs/x.yaml",
        "xdtrain/data/synthetic/world.py",
        "pyproject.toml",
    ]:
        assert not excluded(REPO_ROOT / path), path
    assert job_runtime_env(excludes=["/docs"])["excludes"] == EXCLUDES + ["/docs"]
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        job_runtime_env(working_dir="/nonexistent/dir")


# --- local cluster: no nodes needed --------------------------------------------------------------


def test_node_spec_resources():
    assert NodeSpec(2, ps=4, trainer=1).all_resources() == {"ps": 4, "trainer": 1}
    assert NodeSpec(1, resources={"big_mem": 1}).all_resources() == {"big_mem": 1}  # zeros are left out


def test_bad_roots_and_states_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ClusterError, match="longer than 40 characters"):
        LocalCluster.start(tmp_path / ("x" * 50))
    with pytest.raises(ClusterError, match=r"no local cluster at .*state.json not found"):
        LocalCluster.attach(tmp_path)
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ClusterError, match=r"state.json: corrupt cluster state"):
        LocalCluster.attach(tmp_path)
    assert main(["status", "--root", str(tmp_path / "none")]) == 2
    assert "cluster.local: no local cluster at" in capsys.readouterr().err
    state = {"version": 1, "address": "127.0.0.1:1", "dashboard_url": None, "next_worker": 1, "nodes": {}}
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ClusterError, match=r"no running node 'worker-9' in this cluster"):
        LocalCluster.attach(tmp_path).kill_node("worker-9")


def test_signals_go_only_to_processes_this_cluster_started(tmp_path):
    # A recorded pid now used by another process (different start time) is never signalled.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        node = {"pid": other.pid, "create_time": psutil.Process(other.pid).create_time() - 100, "log": "x"}
        state = {
            "version": 1,
            "address": "127.0.0.1:1",
            "dashboard_url": None,
            "next_worker": 2,
            "nodes": {"worker-1": node},
        }
        (tmp_path / "state.json").write_text(json.dumps(state))
        cluster = LocalCluster.attach(tmp_path)
        cluster.kill_node("worker-1", wait=False)
        time.sleep(0.3)
        assert other.poll() is None  # still running
        assert cluster.node_names() == [] and json.loads((tmp_path / "state.json").read_text())["nodes"] == {}
    finally:
        other.kill()
        other.wait()


# --- local cluster: real nodes ---------------------------------------------------------------------


def test_kill_a_node_and_add_one_back(short_root, ray_cluster):
    """Head + 1 worker through the Python API: resources visible, a killed worker leaves, a new one joins.
    The session's own local Ray (`ray_cluster`, in this process) is not disturbed by any of it."""
    ray = ray_cluster
    session_nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    t0 = time.monotonic()
    with LocalCluster.start(
        short_root, head=NodeSpec(1), workers=[NodeSpec(1, ps=2, trainer=1)], dashboard=False
    ) as cluster:
        alive = cluster.alive_nodes()
        assert set(alive) == {"head", "worker-1"}
        if os.geteuid() == 0:  # every node's services on loopback only (reading their sockets needs root)
            assert exposed_listeners([n["pid"] for n in cluster.state["nodes"].values()]) == []
        assert alive["worker-1"]["Resources"]["ps"] == 2 and alive["worker-1"]["Resources"]["trainer"] == 1
        assert alive["head"]["Resources"]["CPU"] == 1 and "ps" not in alive["head"]["Resources"]
        # Ray's address file stays under our root: no other `ray.init()` on the machine finds this cluster.
        port = cluster.address.rsplit(":", 1)[1]
        assert (short_root / "ray" / "ray_current_cluster").read_text().strip().endswith(f":{port}")
        default = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        assert not default.exists() or not default.read_text().strip().endswith(f":{port}")

        pid = cluster.state["nodes"]["worker-1"]["pid"]
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        assert any(p.name() == "raylet" for p in tree)
        cluster.kill_node("worker-1")  # waits until the GCS marks it dead
        assert set(cluster.alive_nodes()) == {"head"}
        assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert [n["Alive"] for n in cluster.nodes() if n["NodeName"] == "worker-1"] == [False]

        assert cluster.add_node(NodeSpec(1, trainer=2)) == "worker-2"
        alive = cluster.alive_nodes()
        assert set(alive) == {"head", "worker-2"} and alive["worker-2"]["Resources"]["trainer"] == 2
        rows = {r["name"]: r for r in cluster.status()}
        assert (rows["worker-2"]["process"], rows["worker-2"]["gcs"]) == ("running", "ALIVE")
        assert (rows["worker-1"]["process"], rows["worker-1"]["gcs"]) == ("-", "DEAD")
        pids = [info["pid"] for info in cluster.state["nodes"].values()]
    assert not short_root.exists()  # shutdown removed state, Ray's temp dir and logs
    assert not [
        p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]
    print(f"scenario took {time.monotonic() - t0:.1f} s")
    assert [n["NodeID"] for n in ray.nodes() if n["Alive"]] == session_nodes
    assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42


DRIVER = """
import json, ray
ray.init(log_to_driver=False)
@ray.remote(num_cpus=0, resources={"ps": 1})
def on_ps():
    return ray.get_runtime_context().get_node_id()
ps_node = ray.get(on_ps.remote())
print(json.dumps({"resources": ray.cluster_resources(),
                  "nodes": {n["NodeName"]: n["Alive"] for n in ray.nodes() if n["Alive"]},
                  "ps_node": [n["NodeName"] for n in ray.nodes() if n["NodeID"] == ps_node][0]}))
"""


def run_cli(root: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "cluster.local", *args, "--root", str(root)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def run_driver(root: Path) -> dict:
    env_lines = run_cli(root, "env").split()
    env = dict(os.environ, **dict(kv.split("=", 1) for kv in env_lines if "=" in kv))
    out = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cli_across_invocations_with_a_driver(short_root):
    """`python -m cluster.local` up / status / kill / add / down as separate processes; a real driver
    sees the resources, places a `ps` task on a worker, and sees the killed node leave `ray.nodes()`."""
    run_cli(short_root, "up", "--workers", "2", "--worker-cpus", "1", "--ps", "4", "--trainer", "1")
    status = json.loads(run_cli(short_root, "status", "--json"))
    assert status["address"].startswith("127.0.0.1:") and status["dashboard_url"].startswith(
        "http://127.0.0.1:"
    )
    assert {r["name"]: r["gcs"] for r in status["nodes"]} == {
        "head": "ALIVE",
        "worker-1": "ALIVE",
        "worker-2": "ALIVE",
    }
    seen = run_driver(short_root)
    assert (seen["resources"]["CPU"], seen["resources"]["ps"], seen["resources"]["trainer"]) == (3, 8, 2)
    assert seen["nodes"] == {"head": True, "worker-1": True, "worker-2": True}
    assert seen["ps_node"] in ("worker-1", "worker-2")  # the head has no `ps`

    # The dashboard (job server) listens on localhost and, with token auth on, refuses anonymous calls.
    url = status["dashboard_url"] + "/api/version"
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(url, timeout=30)
    token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.status == 200 and "ray_version" in json.loads(r.read())

    run_cli(short_root, "kill", "worker-1")
    run_cli(short_root, "add", "--cpus", "1", "--ps", "2")
    seen = run_driver(short_root)
    assert seen["nodes"] == {"head": True, "worker-2": True, "worker-3": True}  # worker-1 has left
    assert (seen["resources"]["CPU"], seen["resources"]["ps"]) == (3, 6)

    pids = [r["pid"] for r in status["nodes"]]
    run_cli(short_root, "down")
    assert not short_root.exists()
    assert not [
        p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]
