"""A multi-node Ray cluster on one machine, for development and for failure/elasticity tests.

Every node (the head and each worker) is its own `ray start --block` process tree with its own
raylet, object store and agents, started in a new session so that it outlives the command that
started it and can be stopped (SIGTERM: Ray shuts the node down cleanly) or killed (SIGKILL to
every process of the tree: what a crashed machine looks like to the rest of the cluster) on its
own. The cluster's state (address, each node's pid and spec) lives in `<root>/state.json`, so the
CLI works across invocations:

    python -m cluster.local up --workers 2 --worker-cpus 1 --ps 4 --trainer 1
    python -m cluster.local status
    python -m cluster.local kill worker-1      # or: stop worker-1 (graceful)
    python -m cluster.local add --cpus 1 --trainer 1
    python -m cluster.local down

Safety on a shared machine: all ports are picked free (no fixed 6379/8265/10001/52365), every
node and its agents listen on 127.0.0.1 only (`xdtrain.localray`), Ray's files live under `root`
(so no other `ray.init()` on the machine finds this cluster by accident), token authentication
stays on (Ray's default when `RAY_AUTH_MODE` is unset; clients need `RAY_AUTH_MODE=token`, see
`client_env()`) with a token file only its owner can read, and a signal goes only to a process
whose pid *and* start time match what this cluster recorded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from xdtrain.localray import secure_token_file
from xdtrain.outputs import MARKER, OutputError, claim_output_dir, is_owned, remove_owned, write_json_atomic

__all__ = ["ClusterError", "LocalCluster", "NodeSpec", "default_root"]

STATE_VERSION = 1
MAX_ROOT_LEN = 40  # Ray puts Unix sockets under <root>/ray/session_<date>_<pid>/sockets/ (108-byte limit)
# Faster failure detection than Ray's defaults, so a killed node leaves the cluster in seconds.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


class ClusterError(RuntimeError):
    """The local cluster cannot do what was asked (not up, node unknown, node failed to start...)."""


@dataclass
class NodeSpec:
    """What one node offers the scheduler: CPUs, GPUs, and the custom resources `ps` and `trainer`."""

    num_cpus: int = 1
    ps: float = 0
    trainer: float = 0
    num_gpus: int = 0
    resources: dict[str, float] = field(default_factory=dict)  # any other custom resources
    object_store_mb: int = 200

    def all_resources(self) -> dict[str, float]:
        custom = {"ps": self.ps, "trainer": self.trainer, **self.resources}
        return {k: v for k, v in custom.items() if v}


def default_root() -> Path:
    """Where the CLI keeps its cluster: $XDTRAIN_CLUSTER_DIR or /tmp/xdtrain-cluster-<uid>."""
    env = os.environ.get("XDTRAIN_CLUSTER_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"xdtrain-cluster-{os.getuid()}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _enable_token_auth() -> dict[str, str]:
    """Keep Ray's token authentication on for the nodes and for this process's GCS client.

    An explicit RAY_AUTH_MODE is respected; unset means token mode, with the token Ray keeps in
    ~/.ray/auth_token (generated here if missing, as `ray.init()` would for a new local cluster, but
    readable by its owner only).
    """
    if os.environ.get("RAY_AUTH_MODE") is None:
        from ray._private.authentication import authentication_token_setup as auth
        from ray._raylet import AuthenticationTokenLoader

        secure_token_file()  # created 0600 when missing (Ray's own would be world-readable)
        AuthenticationTokenLoader.instance().reset_cache()
        auth._enable_token_auth()  # sets RAY_AUTH_MODE=token here and refreshes Ray's cached config
    return {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}


def _is_ours(info: dict) -> bool:
    """Whether the process with the recorded pid is the one we started (same start time), even as a zombie."""
    try:
        return abs(psutil.Process(info["pid"]).create_time() - info["create_time"]) < 1e-3
    except psutil.Error:
        return False


def _process(info: dict) -> psutil.Process | None:
    """The recorded node process if it still runs (same pid and start time), else None."""
    try:
        p = psutil.Process(info["pid"])
        if _is_ours(info) and p.status() != psutil.STATUS_ZOMBIE:
            return p
    except psutil.Error:
        pass
    return None


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LocalCluster:
    """A head and worker nodes on this machine. Start with `LocalCluster.start(...)`, reattach with
    `LocalCluster.attach(root)`; `shutdown()` (or leaving a `with` block) stops every node."""

    def __init__(self, root: str | Path, state: dict) -> None:
        self.root = Path(root)
        self.state = state
        self._gcs = None  # a GCS client, connected on first use

    # --- lifecycle ----------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        root: str | Path | None = None,
        *,
        head: NodeSpec | None = None,
        workers: list[NodeSpec] | int = 0,
        dashboard: bool = True,
        system_config: dict | None = None,
        timeout: float = 120,
    ) -> LocalCluster:
        """Start a head node, then `workers` (specs, or a count of default `NodeSpec()`s) in parallel."""
        root = Path(root) if root is not None else default_root()
        if len(str(root)) > MAX_ROOT_LEN:
            raise ClusterError(
                f"cluster root {root} is longer than {MAX_ROOT_LEN} characters; Ray's "
                "socket paths under it would be too long, pick a shorter directory"
            )
        if (root / "state.json").exists():
            old = cls.attach(root)
            if _process(old.state["nodes"].get("head", {"pid": -1, "create_time": 0})):
                raise ClusterError(
                    f"a local cluster is already up at {old.address} (root {root}); "
                    "run `python -m cluster.local down` first"
                )
            old._remove_files()  # a stale state from a cluster that died with its machine
        try:
            claim_output_dir(root, "cluster root", overwrite_key=None)
            for sub in ("logs", "ray"):
                claim_output_dir(root / sub, f"cluster {sub} folder", overwrite_key=None)
        except OutputError as e:
            raise ClusterError(str(e)) from None
        port, dash_port = _free_port(), _free_port()
        state = {
            "version": STATE_VERSION,
            "address": f"127.0.0.1:{port}",
            "dashboard_url": f"http://127.0.0.1:{dash_port}" if dashboard else None,
            "next_worker": 1,
            "nodes": {},
        }
        cluster = cls(root, state)
        head_args = [
            "--head",
            f"--port={port}",
            f"--temp-dir={root / 'ray'}",
            f"--include-dashboard={'true' if dashboard else 'false'}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            f"--ray-client-server-port={_free_port()}",
            f"--system-config={json.dumps({**SYSTEM_CONFIG, **(system_config or {})})}",
        ]
        try:
            cluster._launch({"head": (head or NodeSpec(), head_args)}, timeout)
            specs = [NodeSpec() for _ in range(workers)] if isinstance(workers, int) else list(workers)
            cluster.add_nodes(specs, timeout=timeout)
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    @classmethod
    def attach(cls, root: str | Path | None = None) -> LocalCluster:
        """The cluster whose state is in `root` (as left by `start` in this or another process)."""
        root = Path(root) if root is not None else default_root()
        path = root / "state.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise ClusterError(
                f"no local cluster at {root} ({path} not found); start one with `up`"
            ) from None
        except json.JSONDecodeError as e:
            raise ClusterError(f"{path}: corrupt cluster state ({e})") from None
        if state.get("version") != STATE_VERSION:
            raise ClusterError(f"{path}: state version {state.get('version')!r}, expected {STATE_VERSION}")
        return cls(root, state)

    def shutdown(self, timeout: float = 30, keep_logs: bool = False) -> None:
        """Stop the workers, then the head (killing whatever does not stop in time); remove the state."""
        workers = [n for n in self.state["nodes"] if n != "head"]
        self._terminate(workers, timeout)
        self._terminate(["head"] if "head" in self.state["nodes"] else [], timeout)
        self._gcs = None
        if keep_logs:
            (self.root / "state.json").unlink(missing_ok=True)
        else:
            self._remove_files()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --- nodes --------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The GCS address to pass to `ray.init(address=...)` / `ray start --address`."""
        return self.state["address"]

    @property
    def dashboard_url(self) -> str | None:
        """The dashboard / job server (`JobSubmissionClient(dashboard_url)`), or None without one."""
        return self.state["dashboard_url"]

    def client_env(self) -> dict[str, str]:
        """Environment for a driver or `ray job submit` that should use this cluster."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}

    def add_node(self, spec: NodeSpec | None = None, *, timeout: float = 120) -> str:
        """Start one worker node and wait until the cluster sees it; returns its name (`worker-<n>`)."""
        return self.add_nodes([spec or NodeSpec()], timeout=timeout)[0]

    def add_nodes(self, specs: list[NodeSpec], *, timeout: float = 120) -> list[str]:
        """Start worker nodes in parallel, then wait for all of them."""
        todo = {}
        for spec in specs:
            todo[f"worker-{self.state['next_worker']}"] = (spec, [f"--address={self.address}"])
            self.state["next_worker"] += 1
        self._launch(todo, timeout)
        return list(todo)

    def stop_node(self, name: str, *, timeout: float = 30) -> None:
        """Shut a node down cleanly (SIGTERM: Ray drains it); kill it if it does not stop in `timeout`."""
        self._node(name)
        self._terminate([name], timeout)

    def kill_node(self, name: str, *, wait: bool = True, timeout: float = 60) -> None:
        """SIGKILL every process of the node at once (a machine dying); wait until the GCS marks it dead."""
        info = self._node(name)
        self._kill(info)
        del self.state["nodes"][name]
        self._save()
        if wait and name != "head":
            self.wait_for(name, alive=False, timeout=timeout)

    def node_names(self) -> list[str]:
        """The nodes this cluster started and has not stopped or killed."""
        return list(self.state["nodes"])

    def nodes(self) -> list[dict]:
        """The GCS node table, as `ray.nodes()` gives it (NodeName, NodeID, Alive, Resources, ...)."""
        if self._gcs is None:
            from ray._private.state import GlobalState
            from ray._raylet import GcsClientOptions

            _enable_token_auth()
            gcs = GlobalState()
            gcs._initialize_global_state(
                GcsClientOptions.create(
                    self.address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False
                )
            )
            self._gcs = gcs
        return self._gcs.node_table()

    def alive_nodes(self) -> dict[str, dict]:
        """Alive nodes by name, with their total resources."""
        return {n["NodeName"]: n for n in self.nodes() if n["Alive"]}

    def wait_for(self, name: str, *, alive: bool, timeout: float = 120) -> None:
        """Wait until the GCS lists `name` as alive (or no longer alive)."""
        deadline = time.monotonic() + timeout
        while True:
            if alive and name in self.state["nodes"] and _process(self.state["nodes"][name]) is None:
                log = self.state["nodes"][name]["log"]
                raise ClusterError(
                    f"node {name} exited while starting; last lines of {log}:\n{_log_tail(log)}"
                )
            try:
                if (name in self.alive_nodes()) == alive:
                    return
            except Exception:  # the head is still starting: its GCS does not answer yet
                if not alive and name == "head":
                    return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"node {name} did not become {'alive' if alive else 'dead'} in {timeout:.0f} s"
                )
            time.sleep(0.25)

    def status(self) -> list[dict]:
        """A row per node the GCS knows or this cluster started: name, pid, process/GCS state, resources."""
        try:
            listed = self.nodes()
        except Exception:  # the head is down: only the processes can be reported
            listed = []
        table = {n["NodeName"]: n for n in sorted(listed, key=lambda n: n["Alive"])}  # alive beats dead
        rows = []
        for name in list(self.state["nodes"]) + sorted(set(table) - set(self.state["nodes"])):
            info = self.state["nodes"].get(name)
            gcs = table.get(name)
            resources = gcs["Resources"] if gcs else (info or {}).get("resources", {})
            rows.append(
                {
                    "name": name,
                    "pid": info["pid"] if info else None,
                    "process": ("running" if _process(info) else "gone") if info else "-",
                    "gcs": ("ALIVE" if gcs["Alive"] else "DEAD") if gcs else "-",
                    "resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU", "ps", "trainer")},
                }
            )
        return rows

    # --- processes ----------------------------------------------------------------------------

    def _launch(self, todo: dict[str, tuple[NodeSpec, list[str]]], timeout: float, attempts: int = 2) -> None:
        """Start nodes together and wait for each. A node that gives up while starting is started again:
        `ray start` waits only 30 s for its raylet to register, too short on a busy 2-core machine."""
        for name, (spec, extra) in todo.items():
            self._spawn(name, spec, extra)
        for name, (spec, extra) in todo.items():
            for attempt in range(1, attempts + 1):
                try:
                    self.wait_for(name, alive=True, timeout=timeout)
                    break
                except ClusterError as e:
                    if attempt == attempts or "exited while starting" not in str(e):
                        raise
                    self._kill(self.state["nodes"][name])
                    self._spawn(name, spec, extra)

    def _spawn(self, name: str, spec: NodeSpec, extra: list[str]) -> None:
        log = self.root / "logs" / f"{name}.log"
        cmd = [
            sys.executable, "-m", "xdtrain.localray",  # Ray's CLI, with the node's IP resolved to loopback
            "start",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--node-name={name}",
            f"--num-cpus={spec.num_cpus}",
            f"--num-gpus={spec.num_gpus}",
            f"--resources={json.dumps(spec.all_resources())}",
            f"--object-store-memory={spec.object_store_mb * 1024**2}",
            f"--dashboard-agent-listen-port={_free_port()}",
            "--min-worker-port=0",
            "--max-worker-port=0",  # 0: any free port, no clash between nodes
            *extra,
        ]
        if name != "head":  # one log monitor per machine (the head's) is enough: nodes share the session dir
            cmd.append("--include-log-monitor=false")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **_enable_token_auth()}
        env.pop("RAY_ADDRESS", None)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self.state["nodes"][name] = {
            "pid": proc.pid,
            "create_time": psutil.Process(proc.pid).create_time(),
            "spec": asdict(spec),
            "resources": {"CPU": spec.num_cpus, "GPU": spec.num_gpus, **spec.all_resources()},
            "log": str(log),
        }
        self._save()

    def _terminate(self, names: list[str], timeout: float) -> None:
        """SIGTERM the nodes' `ray start --block` processes together; kill what is left after `timeout`."""
        infos = [self.state["nodes"][n] for n in names]
        procs = [(info, _process(info)) for info in infos]
        for _, p in procs:
            if p is not None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for info, p in procs:
            if p is not None:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except psutil.TimeoutExpired:
                    pass
            self._kill(info)  # leftovers of a clean stop, or everything of a stuck one
        for n in names:
            del self.state["nodes"][n]
        self._save()

    @staticmethod
    def _kill(info: dict) -> None:
        """SIGKILL the node's process tree and its process group (its own session, so nothing else)."""
        # The group id is the pid of the `ray start` launched with start_new_session. Signal the group
        # only if that pid is still ours or free: the kernel never hands out a pid that names a live group.
        group_is_ours = _is_ours(info) or not psutil.pid_exists(info["pid"])
        p = _process(info)
        if p is not None:
            try:
                tree = [p, *p.children(recursive=True)]
            except psutil.Error:
                tree = [p]
            for q in tree:
                try:
                    q.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(tree, timeout=10)
        if group_is_ours:
            try:
                os.killpg(info["pid"], signal.SIGKILL)  # orphans of a stopped node (reparented, same group)
            except (ProcessLookupError, PermissionError):
                pass

    def _node(self, name: str) -> dict:
        if name not in self.state["nodes"]:
            raise ClusterError(
                f"no running node {name!r} in this cluster; nodes: {sorted(self.state['nodes'])}"
            )
        return self.state["nodes"][name]

    def _save(self) -> None:
        write_json_atomic(self.root / "state.json", self.state)

    def _remove_files(self) -> None:
        """The state, Ray's folder and the logs (only as created by `start`), then the root if nothing
        else is left in it: the user's own files stay."""
        (self.root / "state.json").unlink(missing_ok=True)
        for sub in ("ray", "logs"):
            if is_owned(self.root / sub):
                try:
                    remove_owned(self.root / sub, self.root)
                except OSError:
                    pass  # a file still being written by a node that was just killed
        if is_owned(self.root) and os.listdir(self.root) == [MARKER]:
            os.unlink(self.root / MARKER)
            self.root.rmdir()


if __name__ == "__main__":  # `python -m cluster.local ...`: the CLI lives in cluster/cli.py
    from cluster.cli import main

    sys.exit(main())
