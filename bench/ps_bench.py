"""PS benchmark: the sharded Ray PS against in-process baselines, measured in the same run.

    python -m bench.ps_bench [--quick] [--rows 2000000] [--dim 64] [--shards 1 2 4] [--json out.json]

One table (rows x dim fp32, row-wise Adagrad), filled with every id 0..rows-1 first; the same
batches of distinct ids (4k, 16k, 64k; uniform and Zipf(1.1) over a shuffled id order; sorted
with --sorted, as the engine passes np.unique output; with --grouped, ordered by shard then id,
so that each shard's rows form one block of the output) go to:
  pull:  PSClient.pull            vs  W.index_select(0, ids) on one torch tensor (and np.take,
                                      and LocalPS.pull)
         PSClient.pull of routed ids (`PSClient.route(ids)`, done ahead of time as the engine's
         batch builder does: no dedup or routing in the pull, each shard writes one block of the
         output); `route` itself is timed too, and "routed+route" is the rate of both in series
  push:  PSClient.push + flush    vs  LocalPS.push (the in-process backend, same optimizer code);
         the client's replay log is on (default size) and emptied before each series, as a
         checkpoint would, so its cost is the steady-state copy per push
  memory per row: bytes the shards account for (arrays at capacity + id index) and the growth of
  the shard processes' RSS, against the floor (dim*4 + optimizer state + 8-byte key).
--ids hashed gives the PS each id scrambled by a 64-bit bijection (as hashed string ids look:
they use the shards' hash index, not the direct-mapped one compact ids get); the baselines keep
indexing rows 0..rows-1. --transport ray sends same-node data calls as Ray calls instead of
over the direct socket channel (for comparison).
Methods are timed in turns in each of --rounds rounds; each rate is the method's best round and
ratios are ratios of those (> 1: the PS is faster). On a shared machine compare ratios; the load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `xdtrain` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xdtrain.localray import init_local  # noqa: E402
from xdtrain.ps.ids import route_ids  # noqa: E402
from xdtrain.ps.init import mix64  # noqa: E402
from xdtrain.ps.local import LocalPS  # noqa: E402
from xdtrain.ps.optim import OptimizerSpec  # noqa: E402
from xdtrain.ps.table import TableSpec  # noqa: E402

FILL_CHUNK = 1 << 16


def scramble(ids: np.ndarray) -> np.ndarray:
    """A bijection of int64 ids onto arbitrary-looking 64-bit ids (like hashed strings)."""
    return mix64(np.ascontiguousarray(ids, dtype=np.int64).view(np.uint64)).view(np.int64)


def make_batches(
    n_rows: int, sizes: list[int], rows_per_point: int, seed: int = 0, dists=("uniform", "zipf"), sort=False
) -> dict:
    """{(dist, size): [distinct int64 id arrays]} with about rows_per_point ids per (dist, size)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_rows)  # popular ranks land on scattered ids
    ranks = np.arange(1, n_rows + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-1.1)
    cdf /= cdf[-1]
    out = {}
    for dist in dists:
        for size in sizes:
            batches = []
            for _ in range(max(3, rows_per_point // size)):
                got = np.empty(0, dtype=np.int64)
                while len(got) < size:
                    if dist == "uniform":
                        draw = rng.integers(0, n_rows, 2 * size)
                    else:
                        draw = perm[np.searchsorted(cdf, rng.random(8 * size))]
                    got = pd.unique(np.concatenate([got, draw]))
                got = np.sort(got[:size]) if sort else got[:size]
                batches.append(np.ascontiguousarray(got, dtype=np.int64))
            out[dist, size] = batches
    return out


def timed(fn, batches: list, warmup: int = 2) -> float:
    """Rows per second of fn over the batches (after a short warm-up)."""
    for b in batches[:warmup]:
        fn(b)
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def fill(ps, table: str, n_rows: int, ids_of=lambda x: x) -> None:
    for start in range(0, n_rows, FILL_CHUNK):
        ps.pull(table, ids_of(np.arange(start, min(start + FILL_CHUNK, n_rows))))


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):  # private memory: not the object store pages it touched
                return int(line.split()[1]) * 1024
    return 0


def series(name: str, fn, bs: list, ps=None) -> float:
    """Rows/s of one method over a series of batches (pushes are flushed inside fn)."""
    if ps is not None and hasattr(ps, "truncate_replay_log"):
        ps.truncate_replay_log()  # steady state: a checkpoint would have emptied the log
    return timed(fn, bs)


def measure_point(ps, local, weight, bs: list, ps_bs: list, g: torch.Tensor, rounds: int) -> dict:
    """Best rows/s of each method over the rounds, on one (dist, size).

    Methods are timed in turns within each round, so load changes on a shared machine hit the
    baseline and the PS alike; the best round is the one least disturbed by other processes.
    `bs` index rows 0..n-1 (the baselines); `ps_bs` are the same rows' ids as the PS knows them.
    """
    tb = [torch.from_numpy(b) for b in bs]
    routed = [ps.route(b) for b in ps_bs]
    w_np = weight.numpy()

    def push(p):
        def fn(b):
            p.push("t", b, g)
            p.flush()

        return fn

    runs: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, fn, target in (
            ("index_select", lambda b: weight.index_select(0, b), tb),
            ("np.take", lambda b: np.take(w_np, b, axis=0), bs),
            ("local pull", lambda b: local.pull("t", b), ps_bs),
            ("pull", lambda b: ps.pull("t", b), ps_bs),
            ("pull routed", lambda r: ps.pull("t", r), routed),
            ("route", lambda b: route_ids(b, ps.slot_map), ps_bs),  # not Router.route: it memoizes
            ("local push", push(local), ps_bs),
            ("push", push(ps), ps_bs),
        ):
            runs.setdefault(name, []).append(series(name, fn, target, ps if name == "push" else None))
    out = {k: float(np.max(v)) for k, v in runs.items()}
    out["pull ratio"] = out["pull"] / out["index_select"]
    out["pull/np.take"] = out["pull"] / out["np.take"]
    out["push ratio"] = out["push"] / out["local push"]
    out["routed ratio"] = out["pull routed"] / out["index_select"]
    out["routed+route"] = 1 / (1 / out["pull routed"] + 1 / out["route"])
    out["routed+route ratio"] = out["routed+route"] / out["index_select"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200k rows, 4k/16k batches, fewer repeats")
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--rows-per-point", type=int, default=1 << 20)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per point (the best is reported)")
    ap.add_argument("--dists", nargs="+", default=["uniform", "zipf"], choices=["uniform", "zipf"])
    ap.add_argument("--sorted", action="store_true", help="sorted batches (as np.unique returns them)")
    ap.add_argument("--grouped", action="store_true", help="batches ordered by shard, then id (no scatter)")
    ap.add_argument("--ids", choices=["dense", "hashed"], default="dense", help="the PS's id space")
    ap.add_argument("--transport", choices=["channel", "ray"], default="channel", help="same-node data calls")
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.sizes, args.rows_per_point, args.rounds = 200_000, [4096, 16384], 1 << 17, 2

    import ray

    from xdtrain.ps.client import PSClient

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    init_local(num_cpus=4, resources={"ps": 8}, include_dashboard=False, log_to_driver=False)
    n, dim = args.rows, args.dim
    spec = TableSpec("t", dim, optimizer=OptimizerSpec("rowwise_adagrad", lr=0.01))
    batches = make_batches(n, args.sizes, args.rows_per_point, dists=args.dists, sort=args.sorted)
    ids_of = scramble if args.ids == "hashed" else (lambda x: x)
    ps_batches = {k: [ids_of(b) for b in bs] for k, bs in batches.items()}
    rng = np.random.default_rng(1)
    grads = {s: torch.from_numpy(rng.standard_normal((s, dim)).astype(np.float32)) for s in args.sizes}
    print(
        f"table {n:,} x {dim} fp32, row-wise Adagrad; "
        f"batches {args.sizes}{' sorted' if args.sorted else ''}{' grouped' if args.grouped else ''}; "
        f"ids {args.ids}; transport {args.transport}; torch threads {torch.get_num_threads()}; "
        f"{args.rounds} rounds; load average {load()}"
    )

    weight = torch.randn(n, dim)  # the pull baseline: one tensor, index_select
    local = LocalPS(1)  # the push baseline: the in-process backend
    local.create_table(spec)
    fill(local, "t", n, ids_of)
    info = local.shard_info()[0]["t"]
    memory = {"local": {"rows": info["rows"], "accounted": info["bytes"] / info["rows"]}}

    results = {}
    for shards in args.shards:
        ps = PSClient(shards, direct_channel=args.transport == "channel")
        ps.create_table(spec)
        pids = ps.shard_pids()
        rss0 = sum(rss_bytes(p) for p in pids)
        t0 = time.perf_counter()
        fill(ps, "t", n, ids_of)
        fill_s = time.perf_counter() - t0
        infos = ps.shard_info()
        rows = sum(i["t"]["rows"] for i in infos)
        memory[f"ray x{shards}"] = {
            "rows": rows,
            "accounted": sum(i["t"]["bytes"] for i in infos) / rows,
            "rss": (sum(rss_bytes(p) for p in pids) - rss0) / rows,
            "fill_rows_per_s": rows / fill_s,
        }
        for dist, size in batches:
            bs, ps_bs = batches[dist, size], ps_batches[dist, size]
            if args.grouped:  # the same ids, each shard's in one block: shards write rows without scattering
                orders = [np.lexsort((b, ps.slot_map.shard_of(b))) for b in ps_bs]
                bs, ps_bs = [b[o] for b, o in zip(bs, orders)], [b[o] for b, o in zip(ps_bs, orders)]
            point = measure_point(ps, local, weight, bs, ps_bs, grads[size], args.rounds)
            results[dist, size, shards] = point
        ps.close()

    print("\nrows/s, best of rounds; ratio = PS / baseline")
    print("pull baseline: index_select on one tensor; push baseline: LocalPS.push (same optimizer code)")
    head = f"{'dist':<8} {'ids':>6} {'shards':>6} | {'pull':>10} {'idx_sel':>10} {'ratio':>6} {'np.take':>10}"
    head += f" {'ratio':>6} {'local':>10} | {'push':>10} {'local':>10} {'ratio':>6}"
    head += f" | {'routed':>10} {'ratio':>6} {'route':>10} {'+route':>10} {'ratio':>6}"
    print(head)
    for dist, size in batches:
        for shards in args.shards:
            r = results[dist, size, shards]
            print(
                f"{dist:<8} {size:>6} {shards:>6} | {r['pull']:>10,.0f} {r['index_select']:>10,.0f}"
                f" {r['pull ratio']:>6.2f} {r['np.take']:>10,.0f} {r['pull/np.take']:>6.2f}"
                f" {r['local pull']:>10,.0f}"
                f" | {r['push']:>10,.0f} {r['local push']:>10,.0f} {r['push ratio']:>6.2f}"
                f" | {r['pull routed']:>10,.0f} {r['routed ratio']:>6.2f} {r['route']:>10,.0f}"
                f" {r['routed+route']:>10,.0f} {r['routed+route ratio']:>6.2f}"
            )
    floor = spec.bytes_floor_per_row()
    print(f"\nmemory per row (floor {floor} B = {dim}*4 vector + 4 row-wise Adagrad + 8 key)")
    for name, m in memory.items():
        rss = f"  RSS growth {m['rss']:.0f} B ({m['rss'] / floor:.2f}x)" if "rss" in m else ""
        fill_rate = f"  fill {m['fill_rows_per_s']:,.0f} rows/s" if "fill_rows_per_s" in m else ""
        print(f"{name:<10} accounted {m['accounted']:.0f} B ({m['accounted'] / floor:.2f}x){rss}{fill_rate}")
    print(f"load average at the end {load()}")
    if args.json:
        flat = {"|".join(map(str, k)): v for k, v in results.items()}
        Path(args.json).write_text(json.dumps({"rates": flat, "memory": memory}, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
