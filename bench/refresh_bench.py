"""Embedding-refresh benchmark: Ray Data inference on 2 actors against a single-process loop over
the same model and checkpoint, measured in the same run.

    python -m bench.refresh_bench [--items 10000000] [--users 1000000] [--workers 2] [--dir runs/bench_refresh]

One generated catalogue (`--items` ids in 4 domains) and `--users` user histories (Parquet, 5 to
20 items each), a SeqRec checkpoint (SASRec, 1 layer, d = 32, max_len 20) whose PS table holds
every item, then, each phase in its own process (so its peak RSS is its own):
  local: `infer.infer_local` over the item keys and the history files, one process
  ray:   `infer.infer_ray` with a `--workers`-actor Ray Data pool (one CPU each)
Both write the same bucketed Parquet (`infer.write_buckets`, in the driver), so the rates are
end to end: read, embed, bucket, write. Peak memory: the phase's driver process (ru_maxrss) and, for ray,
the largest Ray worker process and the sum over the driver and every Ray worker process, sampled
every 0.5 s. Item and user vectors are compared between the phases (max abs difference).

    python -m bench.refresh_bench --serve [--items 1000000] [--queries 2000] [--nprobe 16,32,64,128,256]

serves `EmbeddingReader.top_k` (k = 10) from a published version of `--items` clustered item
vectors (d = 32, 1000 topics) and `--queries` users drawn the same way: the exact blocked scan
against the faiss IVF index (xdtrain/serving/ann.py, one build timed) at each `--nprobe`, with the
IVF's recall@10 against the exact answer and its queries/s ratio to the exact scan (by wall clock and
by CPU time, the steadier of the two on a shared machine; the exact scan is timed twice, once for the
reference answer and once in the table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import peak_rss_mb, report_result, run_phase, timer
from xdtrain.outputs import claim_output_dir, remove_owned

DOMAINS = ["a", "b", "c", "d"]
MODEL = {"name": "seqrec", "backbone": "sasrec", "d": 32, "max_len": 20, "layers": 1, "dropout": 0.0}


def catalogue(items: int) -> dict[str, np.ndarray]:
    ids = np.arange(items, dtype=np.int64) * 7 + 3  # not a dense range
    return {d: part for d, part in zip(DOMAINS, np.array_split(ids, len(DOMAINS)))}


def model_data(items: int):
    from xdtrain.models import ModelData

    cat = catalogue(items)
    return ModelData(item_ids=np.concatenate(list(cat.values())), domains=DOMAINS, item_domains=cat)


def generate(root: Path, items: int, users: int) -> None:
    """User histories (50k users per file) and the checkpoint."""
    import torch

    from xdtrain.models import build_model
    from xdtrain.ps import LocalPS
    from xdtrain.train import checkpointing as ck

    rng = np.random.default_rng(0)
    ids = np.arange(items, dtype=np.int64) * 7 + 3
    (root / "users").mkdir(parents=True, exist_ok=True)
    for f, start in enumerate(range(0, users, 50_000)):
        n = min(50_000, users - start)
        lens = rng.integers(5, 21, n)
        flat = ids[rng.integers(0, items, int(lens.sum()))]
        hist = pa.ListArray.from_arrays(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32), pa.array(flat))
        pq.write_table(pa.table({"user_id": np.arange(start, start + n, dtype=np.int64), "history": hist}),
                       root / "users" / f"part-{f:05d}.parquet")
    data = model_data(items)
    torch.manual_seed(0)
    model = build_model(MODEL, data, seed=0)
    ps = LocalPS(1)
    for spec in model.sparse_tables():
        ps.create_table(spec)
    for a in range(0, items, 1 << 20):
        ps.pull("item", ids[a : a + (1 << 20)])  # admits every item (its seeded init)
    ck_dir = root / "checkpoint" / ck.checkpoint_name(0)
    ck.save_rank0(ck_dir, ck.EngineState(), model, torch.optim.Adam(model.parameters()))
    ck.save_cursor(ck_dir, 0, {})
    ps.checkpoint(ck.ps_url(ck_dir))
    ck.write_manifest(ck_dir)


class RSSSampler(threading.Thread):
    """Peak RSS of this process plus every Ray worker process, and of the largest worker, every 0.5 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.total_mb = self.worker_mb = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.wait(0.5):
            workers = []
            for p in me.children(recursive=True):  # this run's Ray only: its workers descend from this driver
                try:
                    if " ".join(p.cmdline()).startswith("ray::"):
                        workers.append(p.memory_info().rss / 2**20)
                except psutil.Error:
                    continue
            self.worker_mb = max(self.worker_mb, max(workers, default=0.0))
            self.total_mb = max(self.total_mb, me.memory_info().rss / 2**20 + sum(workers))


def phase(root: Path, mode: str, workers: int, batch: int, rows_per_bucket: int) -> dict:
    import torch

    from xdtrain.refresh import infer
    from xdtrain.train import checkpointing as ck

    torch.set_num_threads(1)
    ck_dir = root / "checkpoint" / ck.checkpoint_name(0)
    src = infer.ExportSource(MODEL, model_data(int(json.loads((root / "meta.json").read_text())["items"])),
                             str(ck_dir))
    users = str(root / "users")
    n_users = infer.dataset_rows(users)
    out = root / f"out-{mode}"
    sampler = RSSSampler()
    result: dict = {"mode": mode}
    if mode == "ray":
        import ray
        import ray.data

        ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        sampler.start()
    with timer() as t_load:
        loaded = infer.load_model(src) if mode == "local" else None
    keys = (loaded[0] if loaded else infer.export_model(src)).export_keys()["item"]
    result["load_seconds"] = t_load["seconds"]
    for name, rows, n in (("item", keys, keys.num_rows), ("user", users, n_users)):
        with timer() as t:
            if mode == "ray":
                import ray.data

                ds = (ray.data.from_arrow(infer.table_slices(rows, batch)) if name == "item"
                      else ray.data.read_parquet(rows))
                batches = infer.infer_ray(src, name, ds, workers, batch)
            else:
                parts = [rows] if name == "item" else (pq.read_table(f) for f in sorted(Path(rows).glob("*.parquet")))
                batches = infer.infer_local(src, name, parts, batch, loaded)
            meta = infer.write_buckets(batches, str(out / name), name, infer.num_buckets(n, rows_per_bucket))
        result[name] = {"rows": meta["rows"], "seconds": t["seconds"], "per_s": meta["rows"] / t["seconds"]}
        print(f"[{mode}] {name}: {meta['rows']:,} vectors in {t['seconds']:.1f} s", file=sys.stderr, flush=True)
    if mode == "ray":
        sampler.stop.set()
        result["ray_workers_peak_mb"] = sampler.worker_mb
        result["total_peak_mb"] = max(sampler.total_mb, peak_rss_mb())
    return result


def compare(root: Path, sample: int = 20_000) -> dict:
    """Max abs difference of the two phases' vectors over a sample of ids of each table."""
    from xdtrain.ps.export import read_export

    out = {}
    for name in ("item", "user"):
        a, b = (read_export(str(root / f"out-{m}" / name)) for m in ("local", "ray"))
        a, b = a.sort_by("id").slice(0, sample), b.sort_by("id").slice(0, sample)
        va = np.stack(a.column("vector").to_numpy(zero_copy_only=False))
        vb = np.stack(b.column("vector").to_numpy(zero_copy_only=False))
        out[name] = float(np.abs(va - vb).max())
    return out


def serve(root: Path, items: int, queries: int, nprobes: list[int], k: int = 10, dim: int = 32) -> None:
    """Exact vs IVF top-k from one published version (see the module doc)."""

    from xdtrain.refresh.infer import write_version
    from xdtrain.serving import EmbeddingReader

    rng = np.random.default_rng(0)
    topics = rng.standard_normal((1000, dim)).astype(np.float32)

    def draw(n: int) -> np.ndarray:
        return topics[rng.integers(0, len(topics), n)] + rng.standard_normal((n, dim)).astype(np.float32)

    def vector_table(vecs: np.ndarray) -> pa.Table:
        return pa.table({"id": np.arange(len(vecs), dtype=np.int64),
                         "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim)})

    out = root / "serve"
    clear(out, root)
    with timer() as t:
        write_version(str(out), "v1", {"item": vector_table(draw(items)), "user": vector_table(draw(queries))},
                      buckets=8)
    print(f"wrote {items:,} items and {queries:,} users (d = {dim}) in {t['seconds']:.1f} s; "
          f"load average {os.getloadavg()}")
    users = np.arange(queries)
    exact = EmbeddingReader(str(out), index_min_rows=items + 1)
    ivf = EmbeddingReader(str(out), index_min_rows=1)
    with timer() as t:
        assert exact.index_kind() == "exact"
    print(f"exact: matrix loaded in {t['seconds']:.1f} s")
    with timer() as t:
        index = ivf.ivf_index()
    assert index is not None
    print(f"ivf: nlist {index.nlist}, {index.threads} faiss threads, built in {t['seconds']:.1f} s "
          f"({t['cpu_seconds']:.1f} CPU s)")
    with timer() as t:
        want, _ = exact.top_k(users, k)
    base = t
    print(f"{'path':<9} {'queries/s':>9} {'ratio':>6} {'queries/CPU s':>13} {'ratio':>6} {'recall@10':>9}")
    for name, reader, nprobe in [("exact", exact, 0)] + [(f"ivf/{n}", ivf, n) for n in nprobes]:
        reader.nprobe = nprobe
        with timer() as t:
            got, _ = reader.top_k(users, k)
        recall = np.mean([len(set(g) & set(w)) / k for g, w in zip(got.tolist(), want.tolist())])
        print(f"{name:<9} {queries / t['seconds']:>9,.0f} {base['seconds'] / t['seconds']:>6.1f} "
              f"{queries / t['cpu_seconds']:>13,.0f} {base['cpu_seconds'] / t['cpu_seconds']:>6.1f} {recall:>9.3f}")
    print(f"peak RSS {peak_rss_mb():,.0f} MiB; load average {os.getloadavg()}")


def clear(path: Path, bench_dir: str | Path) -> None:
    """Remove an earlier run's `path`, only inside the bench's own claimed folder (outputs.remove_owned)."""
    if Path(path).exists():
        remove_owned(path, bench_dir, created=lambda _: True)  # everything in the claimed folder is the bench's


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--rows-per-bucket", type=int, default=262144)
    ap.add_argument("--dir", default="runs/bench_refresh")
    ap.add_argument("--reuse", action="store_true", help="keep the data and checkpoint a previous run generated")
    ap.add_argument("--phase", choices=["gen", "local", "ray"], help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help="top-k serving: exact scan against the IVF index")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--nprobe", default="16,32,64,128,256", help="IVF lists probed per query, comma-separated")
    args = ap.parse_args(argv)
    if not args.phase:  # the bench's own folder: refused when it holds files xdtrain did not write
        claim_output_dir(args.dir, "--dir")
    if args.serve:
        items = args.items if "--items" in " ".join(argv or sys.argv) else 1_000_000
        serve(Path(args.dir), items, args.queries, [int(x) for x in args.nprobe.split(",")])
        return 0
    root = Path(args.dir) / f"i{args.items}-u{args.users}"
    if args.phase == "gen":
        with timer() as t:
            generate(root, args.items, args.users)
        (root / "meta.json").write_text(json.dumps({"items": args.items, "users": args.users}))
        report_result({"seconds": t["seconds"]})
        return 0
    if args.phase:
        report_result(phase(root, args.phase, args.workers, args.batch, args.rows_per_bucket))
        return 0
    for m in ("local", "ray"):
        clear(root / f"out-{m}", args.dir)
    if not (args.reuse and (root / "meta.json").exists()):
        clear(root, args.dir)
    common = ["-m", "bench.refresh_bench", f"--items={args.items}", f"--users={args.users}",
              f"--workers={args.workers}", f"--batch={args.batch}", f"--rows-per-bucket={args.rows_per_bucket}",
              f"--dir={args.dir}"]
    print(f"load average before: {os.getloadavg()}")
    if (root / "meta.json").exists():
        print(f"reusing the {args.items:,} items, {args.users:,} users and the checkpoint in {root}")
    else:
        gen = run_phase([*common, "--phase", "gen"])
        print(f"generated {args.items:,} items, {args.users:,} users and the checkpoint in {gen['seconds']:.0f} s")
    res = {m: run_phase([*common, "--phase", m]) for m in ("local", "ray")}
    print(f"load average after: {os.getloadavg()}")
    print(f"{'phase':<6} {'table':<5} {'rows':>11} {'seconds':>8} {'vectors/s':>11} {'ratio':>6}")
    for m, r in res.items():
        for name in ("item", "user"):
            ratio = r[name]["per_s"] / res["local"][name]["per_s"]
            print(f"{m:<6} {name:<5} {r[name]['rows']:>11,} {r[name]['seconds']:>8.1f} {r[name]['per_s']:>11,.0f} "
                  f"{ratio:>6.2f}")
    print(f"peak RSS: local {res['local']['peak_rss_mb']:,.0f} MiB; ray driver {res['ray']['peak_rss_mb']:,.0f} MiB, "
          f"largest Ray worker {res['ray']['ray_workers_peak_mb']:,.0f} MiB, "
          f"driver + all Ray workers {res['ray']['total_peak_mb']:,.0f} MiB")
    print(f"max |local - ray| over 20k ids: {compare(root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
