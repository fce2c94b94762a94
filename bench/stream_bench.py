"""Stream an interaction log: raw pyarrow.dataset scan vs the xdtrain reader, rows/s and peak RSS.

    python bench/stream_bench.py [--rows 100000000] [--batch-size 65536] [--shuffle-buffer 2000000]

Writes the log once (cached under data/bench/stream_<rows>, built in a temporary folder and
renamed when complete) in row-group-sized chunks, so generation memory is bounded too. Then each
phase streams the whole log in its own process (so its peak RSS is its own):
  raw       pyarrow.dataset(...).to_batches(batch_size) — the baseline
  reader    ParquetStreamReader, file order (shuffle_buffer=0)
  shuffled  ParquetStreamReader with a shuffle buffer
Each phase only counts rows, so the figures are the read path's cost alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if __package__ in (None, ""):  # run as a script: make `bench` and `xdtrain` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_ratio_table, report_result, run_phase, timer  # noqa: E402
from xdtrain.outputs import StagedDir  # noqa: E402

DOMAINS = ["books", "movies", "music", "games"]
SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("domain", pa.dictionary(pa.int32(), pa.string())),
        ("timestamp", pa.int64()),
    ]
)


def generate(out: Path, rows: int, row_group: int, groups_per_file: int, seed: int = 0) -> None:
    """Write `rows` synthetic interactions as files of `groups_per_file` row groups, one group at a time."""
    if out.exists():
        return
    with StagedDir(out, "bench data", replace=False) as stage:  # the cache counts as present only once complete
        _write_log(Path(stage.path), rows, row_group, groups_per_file, seed)


def _write_log(tmp: Path, rows: int, row_group: int, groups_per_file: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    dictionary = pa.array(DOMAINS)
    written, f = 0, 0
    while written < rows:
        with pq.ParquetWriter(tmp / f"part-{f:05d}.parquet", SCHEMA) as writer:
            for _ in range(groups_per_file):
                n = min(row_group, rows - written)
                if n == 0:
                    break
                codes = pa.array(rng.integers(0, len(DOMAINS), n, dtype=np.int32))
                batch = pa.record_batch(
                    [
                        pa.array(rng.integers(0, 10_000_000, n, dtype=np.int64)),
                        pa.array(rng.integers(0, 1_000_000, n, dtype=np.int64)),
                        pa.DictionaryArray.from_arrays(codes, dictionary),
                        pa.array(1_600_000_000 + written + np.arange(n, dtype=np.int64)),
                    ],
                    schema=SCHEMA,
                )
                writer.write_batch(batch, row_group_size=row_group)
                written += n
        f += 1


def phase(name: str, data: str, batch_size: int, shuffle_buffer: int) -> None:
    """Stream the whole log once and report rows, seconds and rows/s (run in its own process)."""
    rows = 0
    with timer() as t:
        if name == "raw":
            import pyarrow.dataset as pads

            for b in pads.dataset(data, format="parquet").to_batches(batch_size=batch_size):
                rows += b.num_rows
        else:
            from xdtrain.data.reader import ParquetStreamReader

            reader = ParquetStreamReader(
                data, batch_size=batch_size, shuffle_buffer=shuffle_buffer if name == "shuffled" else 0
            )
            for b in reader:
                rows += b.num_rows
    report_result(
        {
            "rows": rows,
            "seconds": t["seconds"],
            "rows_per_s": rows / t["seconds"],
            "cpu_seconds": t["cpu_seconds"],
            "rows_per_cpu_s": rows / t["cpu_seconds"],
        }
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000_000)
    p.add_argument("--row-group", type=int, default=1_000_000)
    p.add_argument("--groups-per-file", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=65_536)
    p.add_argument("--shuffle-buffer", type=int, default=2_000_000, help="rows")
    p.add_argument("--repeats", type=int, default=1, help="runs per phase; the fastest is reported")
    p.add_argument("--cache-dir", default="data/bench")
    p.add_argument("--phase", choices=["raw", "reader", "shuffled"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.phase:
        phase(a.phase, a.data, a.batch_size, a.shuffle_buffer)
        return

    data = Path(a.cache_dir) / f"stream_{a.rows}"
    if not data.exists():
        print(f"writing {a.rows:,} rows to {data} ...", flush=True)
        with timer() as t:
            generate(data, a.rows, a.row_group, a.groups_per_file)
        print(f"  done in {t['seconds']:.0f} s", flush=True)
    files = sorted(data.glob("*.parquet"))
    size_gb = sum(f.stat().st_size for f in files) / 1e9
    print(
        f"dataset {data}: {len(files)} files, {size_gb:.2f} GB; batch_size={a.batch_size:,}, "
        f"shuffle_buffer={a.shuffle_buffer:,} rows",
        flush=True,
    )

    # Phases interleave (raw, reader, shuffled, raw, ...) so that load from other users of the machine
    # hits them alike; the fastest run of each is reported.
    runs: dict[str, list[dict]] = {"raw": [], "reader": [], "shuffled": []}
    for _ in range(a.repeats):
        for name, done in runs.items():
            args = [
                "--phase",
                name,
                "--data",
                str(data),
                "--batch-size",
                str(a.batch_size),
                "--shuffle-buffer",
                str(a.shuffle_buffer),
            ]
            r = run_phase([str(Path(__file__).resolve()), *args])
            if r["rows"] != a.rows:
                raise RuntimeError(f"phase {name} streamed {r['rows']} rows, expected {a.rows}")
            print(
                f"  {name}: {r['rows_per_s']:,.0f} rows/s in {r['seconds']:.1f} s, "
                f"CPU {r['cpu_seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB",
                flush=True,
            )
            done.append(r)
    peak = {name: max(r["peak_rss_mb"] for r in done) for name, done in runs.items()}
    print("\nwall clock (fastest run of each; other users of the machine slow some runs down):")
    fastest = {n: {**max(d, key=lambda r: r["rows_per_s"]), "peak_rss_mb": peak[n]} for n, d in runs.items()}
    print_ratio_table(fastest, "rows_per_s", baseline="raw")
    print("\nCPU time, all threads (steadier under load; the least CPU of each):")
    leanest = {
        n: {**max(d, key=lambda r: r["rows_per_cpu_s"]), "peak_rss_mb": peak[n]} for n, d in runs.items()
    }
    print_ratio_table(leanest, "rows_per_cpu_s", baseline="raw")


if __name__ == "__main__":
    main()
