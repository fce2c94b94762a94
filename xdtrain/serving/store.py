"""The versioned embedding store at any fsspec URL: the layout the refresh job publishes into and
`EmbeddingReader` serves from.

    <out>/                         claimed by the job (.xdtrain-owned)
      CURRENT                      the served version's name, one line, replaced atomically: the publish point
      HISTORY.json                 published versions, oldest first: [{version, published(_at), checkpoint, step}]
      v=<version>/                 one version (.xdtrain-owned)
        item/part-00000.parquet    rows (id, vector[, domain]) bucketed by hash(id) (`bucket_of`) ...
        item/_MANIFEST.json        ... listed (files, rows, dim) once every part is written
        user/...
        report.json                the validation report of this version (a failed check: the version is `failed`)
        VERSION.json               its tables, checkpoint and checks; written last: the version counts from then on

A version without VERSION.json is unfinished (a killed refresh): nothing serves or lists it as
published, and re-running the same refresh resumes it. One whose report.json says a check failed
is `failed` (`version_state`). `CURRENT` only ever names a finished version, so a reader that
opens CURRENT sees one version whole. `publish` appends to the history first and flips CURRENT
second; `rollback` flips CURRENT to an earlier finished version; `prune` keeps the current version
and the `keep` versions published before it, and deletes failed versions checked before CURRENT
was published.
"""

from __future__ import annotations

import json
import time
from datetime import datetime

import numpy as np

from xdtrain.config import ConfigError
from xdtrain.data.schemas import DataError
from xdtrain.outputs import is_owned, remove_owned, resolve, write_json_atomic, write_text_atomic

CURRENT = "CURRENT"
HISTORY = "HISTORY.json"
VERSION_FILE = "VERSION.json"
REPORT_FILE = "report.json"
PREFIX = "v="


def version_dir(out: str, version: str) -> str:
    return f"{out.rstrip('/')}/{PREFIX}{version}"


def table_dir(out: str, version: str, table: str) -> str:
    return f"{version_dir(out, version)}/{table}"


def part_name(bucket: int) -> str:
    return f"part-{bucket:05d}.parquet"


def bucket_of(ids: np.ndarray, buckets: int) -> np.ndarray:
    """The bucket (file) of each raw id: a 64-bit mix of the id, modulo `buckets`, so that ids that
    are dense ranges or multiples still spread evenly."""
    x = np.asarray(ids, dtype=np.int64).view(np.uint64).copy()
    with np.errstate(over="ignore"):  # splitmix64's finaliser; wrap-around is the point
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x % np.uint64(max(int(buckets), 1))).astype(np.int64)


def read_json(out: str, rel: str) -> dict | list | None:
    fs, root = resolve(out)
    path = f"{root}/{rel}"
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def read_current(out: str) -> str | None:
    """The version CURRENT names, or None before the first publish."""
    fs, root = resolve(out)
    try:
        with fs.open(f"{root}/{CURRENT}", "rb") as f:
            return f.read().decode("utf-8").strip() or None
    except FileNotFoundError:
        return None


def read_version(out: str, version: str) -> dict | None:
    """VERSION.json of a finished version; None while it is unfinished or absent."""
    info = read_json(out, f"{PREFIX}{version}/{VERSION_FILE}")
    return info if isinstance(info, dict) else None


def require_version(out: str, version: str) -> dict:
    info = read_version(out, version)
    if info is None:
        raise DataError(f"{version_dir(resolve(out)[1], version)}: not a finished embedding version "
                        f"(no {VERSION_FILE}); finished ones: {finished_versions(out) or 'none'}")
    return info


def history(out: str) -> list[dict]:
    got = read_json(out, HISTORY)
    return got if isinstance(got, list) else []


def version_names(out: str) -> list[str]:
    """Every v=<name> folder under `out`, finished or not, by name."""
    fs, root = resolve(out)
    if not fs.exists(root):
        return []
    names = [p.rstrip("/").rpartition("/")[2] for p in fs.ls(root, detail=False)]
    return sorted(n[len(PREFIX):] for n in names if n.startswith(PREFIX))


def finished_versions(out: str) -> list[str]:
    return [v for v in version_names(out) if read_version(out, v) is not None]


def version_state(out: str, version: str) -> tuple[str, str]:
    """("finished" | "failed" | "unfinished", why): failed when its report.json names a failed check
    (the version was written whole and checked, and never published)."""
    if read_version(out, version) is not None:
        return "finished", ""
    report = read_json(out, f"{PREFIX}{version}/{REPORT_FILE}")
    failed = [e for e in report.get("checks", []) if not e.get("ok")] if isinstance(report, dict) else []
    if not failed:
        return "unfinished", ""
    return "failed", f"check '{failed[0]['check']}' failed on table '{failed[0]['table']}': {failed[0]['detail']}"


def _published_at(entry: dict) -> float:
    if "published_at" in entry:
        return float(entry["published_at"])
    try:  # a history written before published_at: its time to the second
        return datetime.strptime(entry.get("published"), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (TypeError, ValueError):
        return float("-inf")  # unknown: nothing counts as older


def failed_before_current(out: str) -> list[str]:
    """Failed versions whose checks ran before CURRENT was published (a refresh since has superseded them)."""
    current = read_current(out)
    published = next((_published_at(h) for h in reversed(history(out)) if h.get("version") == current),
                     float("-inf"))
    old = []
    for v in version_names(out):
        if v != current and version_state(out, v)[0] == "failed":
            report = read_json(out, f"{PREFIX}{v}/{REPORT_FILE}")
            if float(report.get("checked_at", float("inf"))) < published:
                old.append(v)
    return old


def publish(out: str, version: str, info: dict) -> None:
    """Make finished `version` the one served: record it in the history, then flip CURRENT."""
    require_version(out, version)
    fs, root = resolve(out)
    past = [h for h in history(out) if h.get("version") != version]
    entry = {"version": version, "published": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "published_at": time.time(),
             "checkpoint": info.get("checkpoint", ""), "step": info.get("step")}
    write_json_atomic(f"{root}/{HISTORY}", past + [entry], fs)
    write_text_atomic(f"{root}/{CURRENT}", version + "\n", fs)


def rollback(out: str, to: str = "") -> tuple[str | None, str]:
    """Serve `to` (a finished version), by default the one published before the current one.
    Returns (previous CURRENT, new CURRENT)."""
    fs, root = resolve(out)
    current = read_current(out)
    if not to:
        order = [h["version"] for h in history(out) if read_version(out, h["version"]) is not None]
        if current not in order or order.index(current) == 0:
            raise ConfigError(f"embeddings rollback: {root} has no version published before "
                              f"{current!r} (finished: {finished_versions(out) or 'none'}); name one with version=<v>")
        to = order[order.index(current) - 1]
    require_version(out, to)
    write_text_atomic(f"{root}/{CURRENT}", to + "\n", fs)
    return current, to


def prune(out: str, keep: int) -> list[str]:
    """Delete published versions other than the current one and the `keep` most recently published
    others, and failed versions checked before CURRENT was published that the job created (its
    marker); an unfinished version, or a finished one not yet flipped, is left to the refresh that
    resumes it. Returns the deleted versions."""
    fs, root = resolve(out)
    current = read_current(out)
    others = [h["version"] for h in history(out) if h.get("version") != current]
    kept = {current, *(others[-keep:] if keep > 0 else [])}
    doomed = [v for v in dict.fromkeys(others) if v not in kept and v in version_names(out)]
    doomed += [v for v in failed_before_current(out) if is_owned(version_dir(root, v), fs)]
    for v in doomed:
        remove_owned(version_dir(root, v), out)
    return doomed
