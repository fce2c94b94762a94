"""Amazon-2018 review files (Ni, Li & McAuley 2019) -> a domain pair's canonical interactions, as the
RecGURU authors prepare Sport-Cloth and Movie-Book (spec sec. 2.2):

  1. rating > 2 (overall >= 3) is a positive; 2. reviews after 2017-10-01 (unixReviewTime > 1506816000,
  strict); 3. verified only (the authors' code; `verified_only`); 4. the rating is dropped;
  5. one 5-core pass: drop items with < k users, then users with < k items (not iterated);
  6. time order, items re-coded 1..|V| per domain (sorted by asin); 7. users (reviewerID) re-coded
  0..|U|-1 over the pair, so a user in both domains is overlapped; 8. optional collapse of
  consecutive repeats of one item (the collected data's rule, not Amazon's).

    inter = amazon_pair({"sport": "Sports_5.json.gz", "cloth": "Clothing_5.json.gz"}, AmazonConfig())
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from xdtrain.data.schemas import DataError

FIELDS = ("reviewerID", "asin", "overall", "unixReviewTime")


@dataclass
class AmazonConfig:
    min_rating: float = 3.0  # rating > 2
    after: int = 1506816000  # unixReviewTime must be greater (2017-10-01 00:00 UTC)
    verified_only: bool = True
    k_core: int = 5
    collapse_repeats: bool = False


def read_reviews(path: str | Path, cfg: AmazonConfig) -> list[tuple[str, str, int]]:
    """(reviewerID, asin, time) of the reviews that pass filters 1-3; a bad line names file and line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                user, item, rating, t = (r[k] for k in FIELDS)
                rating, t = float(rating), int(t)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path} line {n}: not a review with {list(FIELDS)} ({e!r})") from None
            if rating >= cfg.min_rating and t > cfg.after and (r.get("verified", False) or not cfg.verified_only):
                out.append((str(user), str(item), t))
    return out


def five_core(reviews: list[tuple[str, str, int]], k: int) -> list[tuple[str, str, int]]:
    """One pass: items with fewer than k distinct users go, then users with fewer than k items."""
    users_of: dict[str, set] = {}
    for u, i, _ in reviews:
        users_of.setdefault(i, set()).add(u)
    reviews = [r for r in reviews if len(users_of[r[1]]) >= k]
    items_of: dict[str, int] = {}
    for u, _, _ in reviews:
        items_of[u] = items_of.get(u, 0) + 1
    return [r for r in reviews if items_of[r[0]] >= k]


def amazon_pair(paths: Mapping[str, str | Path], cfg: AmazonConfig | None = None) -> pa.Table:
    """Canonical interactions (user_id, item_id, domain, timestamp) of each domain's review file."""
    cfg = cfg or AmazonConfig()
    kept = {d: five_core(read_reviews(p, cfg), cfg.k_core) for d, p in paths.items()}
    user_code = {u: n for n, u in enumerate(sorted({r[0] for rs in kept.values() for r in rs}))}
    cols: dict[str, list] = {"user_id": [], "item_id": [], "domain": [], "timestamp": []}
    for d, rs in kept.items():
        item_code = {i: n + 1 for n, i in enumerate(sorted({r[1] for r in rs}))}
        rs = sorted(rs, key=lambda r: (user_code[r[0]], r[2], item_code[r[1]]))
        prev = None
        for u, i, t in rs:
            if cfg.collapse_repeats and prev == (u, i):
                continue
            prev = (u, i)
            cols["user_id"].append(user_code[u])
            cols["item_id"].append(item_code[i])
            cols["domain"].append(d)
            cols["timestamp"].append(t)
    types = {"user_id": pa.int64(), "item_id": pa.int64(), "domain": pa.string(), "timestamp": pa.int64()}
    return pa.table({c: pa.array(v, types[c]) for c, v in cols.items()})


def pair_stats(inter: pa.Table) -> dict[str, dict]:
    """Table 1's columns per domain: users, items, average sequence length, overlap (the pair's)."""
    dom = np.asarray(inter["domain"].to_pylist(), dtype=object)
    users = inter["user_id"].to_numpy()
    per = {d: set(users[dom == d].tolist()) for d in sorted(set(dom.tolist()))}
    overlap = len(set.intersection(*per.values())) if len(per) == 2 else 0
    items = inter["item_id"].to_numpy()
    return {d: {"users": len(u), "items": len(set(items[dom == d].tolist())),
                "avg_len": round(float((dom == d).sum()) / max(1, len(u)), 3), "overlap": overlap}
            for d, u in per.items()}
