"""`python -m cluster.local up|add|stop|kill|status|env|down`: the local cluster from the shell.

Each command is a separate process; they share the cluster through `<root>/state.json`
(see cluster/local.py). Errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from cluster.local import ClusterError, LocalCluster, NodeSpec

__all__ = ["main"]


def _print_status(cluster: LocalCluster) -> None:
    print(f"address    {cluster.address}")
    print(f"dashboard  {cluster.dashboard_url or '(none)'}")
    print(f"root       {cluster.root}")
    print(f"{'node':<10} {'pid':>8} {'process':<8} {'gcs':<6} resources")
    for row in cluster.status():
        res = " ".join(f"{k}={v:g}" for k, v in sorted(row["resources"].items()))
        print(f"{row['name']:<10} {row['pid'] or '-':>8} {row['process']:<8} {row['gcs']:<6} {res}")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--root",
        default=None,
        help="cluster directory (default: $XDTRAIN_CLUSTER_DIR "
        "or /tmp/xdtrain-cluster-<uid>); keep it short, Ray puts sockets under it",
    )
    p = argparse.ArgumentParser(
        prog="python -m cluster.local", description="A multi-node Ray cluster on this machine."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", parents=[common], help="start a head and N worker nodes")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--head-cpus", type=int, default=1)
    up.add_argument("--head-ps", type=float, default=0)
    up.add_argument("--head-trainer", type=float, default=0)
    up.add_argument("--worker-cpus", type=int, default=1)
    up.add_argument("--ps", type=float, default=4, help="`ps` resource per worker node")
    up.add_argument("--trainer", type=float, default=1, help="`trainer` resource per worker node")
    up.add_argument("--gpus", type=int, default=0, help="GPUs per worker node")
    up.add_argument("--object-store-mb", type=int, default=200)
    up.add_argument("--no-dashboard", action="store_true", help="no dashboard/job server on the head")
    up.add_argument("--timeout", type=float, default=120)
    add = sub.add_parser("add", parents=[common], help="add worker node(s)")
    add.add_argument("--count", type=int, default=1)
    add.add_argument("--cpus", type=int, default=1)
    add.add_argument("--ps", type=float, default=0)
    add.add_argument("--trainer", type=float, default=0)
    add.add_argument("--gpus", type=int, default=0)
    add.add_argument("--object-store-mb", type=int, default=200)
    add.add_argument("--timeout", type=float, default=120)
    for name, text in (("stop", "shut one node down cleanly"), ("kill", "SIGKILL all processes of one node")):
        cmd = sub.add_parser(name, parents=[common], help=text)
        cmd.add_argument("node", help="node name, e.g. worker-1 (see `status`)")
    status = sub.add_parser("status", parents=[common], help="nodes as this cluster and the GCS see them")
    status.add_argument("--json", action="store_true")
    sub.add_parser("env", parents=[common], help="print `export` lines for drivers and `ray job submit`")
    down = sub.add_parser("down", parents=[common], help="stop every node and remove the cluster's files")
    down.add_argument("--keep-logs", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "up":
            worker = NodeSpec(
                args.worker_cpus, args.ps, args.trainer, args.gpus, object_store_mb=args.object_store_mb
            )
            head = NodeSpec(
                args.head_cpus, args.head_ps, args.head_trainer, object_store_mb=args.object_store_mb
            )
            cluster = LocalCluster.start(
                args.root,
                head=head,
                workers=[worker] * args.workers,
                dashboard=not args.no_dashboard,
                timeout=args.timeout,
            )
            _print_status(cluster)
            print("use it:  " + " ".join(f"{k}={v}" for k, v in cluster.client_env().items()))
            return 0
        cluster = LocalCluster.attach(args.root)
        if args.cmd == "add":
            spec = NodeSpec(args.cpus, args.ps, args.trainer, args.gpus, object_store_mb=args.object_store_mb)
            print("added", " ".join(cluster.add_nodes([spec] * args.count, timeout=args.timeout)))
        elif args.cmd == "stop":
            cluster.stop_node(args.node)
            print(f"stopped {args.node}")
        elif args.cmd == "kill":
            cluster.kill_node(args.node)
            print(f"killed {args.node}")
        elif args.cmd == "status":
            if args.json:
                print(
                    json.dumps(
                        {
                            "address": cluster.address,
                            "dashboard_url": cluster.dashboard_url,
                            "nodes": cluster.status(),
                        },
                        indent=2,
                    )
                )
            else:
                _print_status(cluster)
        elif args.cmd == "env":
            print("\n".join(f"export {k}={v}" for k, v in cluster.client_env().items()))
        elif args.cmd == "down":
            cluster.shutdown(keep_logs=args.keep_logs)
            print("cluster stopped")
    except ClusterError as e:
        print(f"cluster.local: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
