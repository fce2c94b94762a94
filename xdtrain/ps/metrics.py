"""Client-side PS metrics: rows and bytes per operation, throughput, latency percentiles.

`PSStats` is plain Python (used by both backends, read with `client.stats()`). `RayMetrics`
mirrors the same numbers into `ray.util.metrics` so they reach the Ray dashboard/Prometheus;
it is created only by the Ray client.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

_LATENCY_WINDOW = 4096
_LATENCY_BOUNDS_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]


class PSStats:
    """Counters per operation ('pull', 'push', ...) plus a window of recent latencies."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._t0 = time.perf_counter()
        self._ops: dict[str, dict] = {}
        self.events: dict[str, int] = {}

    def record(self, op: str, rows: int, nbytes: int, seconds: float) -> None:
        s = self._ops.setdefault(
            op, {"calls": 0, "rows": 0, "bytes": 0, "lat": deque(maxlen=_LATENCY_WINDOW)}
        )
        s["calls"] += 1
        s["rows"] += int(rows)
        s["bytes"] += int(nbytes)
        s["lat"].append(seconds)

    def event(self, name: str, n: int = 1) -> None:
        """Count a rare event (shard recovered, replay log overflowed, prefetch patched, ...)."""
        self.events[name] = self.events.get(name, 0) + n

    def summary(self) -> dict:
        """{op: calls, rows, bytes, rows_per_s, bytes_per_s (over wall time since reset), p50/p90/p99_ms}."""
        wall = max(time.perf_counter() - self._t0, 1e-9)
        out: dict = {"wall_s": wall, "events": dict(self.events)}
        for op, s in self._ops.items():
            lat = np.asarray(s["lat"], dtype=np.float64) * 1e3
            p50, p90, p99 = np.percentile(lat, [50, 90, 99]) if len(lat) else (0.0, 0.0, 0.0)
            out[op] = {
                "calls": s["calls"],
                "rows": s["rows"],
                "bytes": s["bytes"],
                "rows_per_s": s["rows"] / wall,
                "bytes_per_s": s["bytes"] / wall,
                "p50_ms": float(p50),
                "p90_ms": float(p90),
                "p99_ms": float(p99),
            }
        return out


class RayMetrics:
    """The same counters as Ray metrics (xdtrain_ps_rows, xdtrain_ps_bytes, xdtrain_ps_latency_s)."""

    def __init__(self, name: str) -> None:
        from ray.util import metrics

        tags = ("ps", "op", "table")
        self._tags = {"ps": name}
        self.rows = metrics.Counter("xdtrain_ps_rows", "rows moved by the PS client", tag_keys=tags)
        self.bytes = metrics.Counter("xdtrain_ps_bytes", "bytes moved by the PS client", tag_keys=tags)
        self.latency = metrics.Histogram(
            "xdtrain_ps_latency_s", "PS call latency", boundaries=_LATENCY_BOUNDS_S, tag_keys=tags
        )
        self.shard_rows = metrics.Gauge(
            "xdtrain_ps_shard_rows", "rows held per shard", tag_keys=tags + ("shard",)
        )
        self.shard_bytes = metrics.Gauge(
            "xdtrain_ps_shard_bytes", "bytes held per shard", tag_keys=tags + ("shard",)
        )

    def record(self, op: str, table: str, rows: int, nbytes: int, seconds: float) -> None:
        tags = {**self._tags, "op": op, "table": table}
        if rows:
            self.rows.inc(rows, tags=tags)
        if nbytes:
            self.bytes.inc(nbytes, tags=tags)
        self.latency.observe(seconds, tags=tags)

    def shards(self, per_shard: list[dict]) -> None:
        for k, info in enumerate(per_shard):
            for table, d in info.items():
                tags = {**self._tags, "op": "hold", "table": table, "shard": str(k)}
                self.shard_rows.set(d["rows"], tags=tags)
                self.shard_bytes.set(d["bytes"], tags=tags)
