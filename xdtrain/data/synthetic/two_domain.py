"""A two-domain world with shared user tastes (RecGURU spec sec. 9, item 15): the learning test's data.

Each user has a taste z_u in R^dim drawn from a mixture of `clusters` Gaussians; an overlapped user
keeps one z_u in both domains. Each domain has its own items, with vectors drawn around the same
cluster centres (what makes transfer possible). The domains' vocabularies are disjoint (A's ids from
1, B's from 100000), so phase-1 encodings of the two domains can be told apart without rotating
the item space (a rotation would change what z_u prefers in one domain). A sequence draws
P(next = v) ∝ exp(beta z_u·w_v + gamma cos(w_v, w_prev)), with no immediate repeat.

    inter, truth = two_domain_world(TwoDomainWorld(users_a=600, users_b=6000, overlap=0.1))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class TwoDomainWorld:
    domains: tuple[str, str] = ("a", "b")
    users_a: int = 600
    users_b: int = 6000
    overlap: float = 0.1  # overlapped users as a share of users_a
    items_a: int = 300
    items_b: int = 600
    len_a: tuple[int, int] = (4, 8)  # sequence length range (inclusive)
    len_b: tuple[int, int] = (15, 40)
    dim: int = 8
    clusters: int = 10
    beta: float = 3.0
    gamma: float = 1.0
    seed: int = 0


def two_domain_world(cfg: TwoDomainWorld) -> tuple[pa.Table, dict]:
    """(interactions: user_id, item_id, domain, timestamp; truth: z by user, w by domain, item ids)."""
    rng = np.random.default_rng(cfg.seed)
    centres = rng.normal(size=(cfg.clusters, cfg.dim))
    n_o = int(round(cfg.overlap * cfg.users_a))
    if n_o > min(cfg.users_a, cfg.users_b):
        raise ValueError(f"overlap {cfg.overlap} x {cfg.users_a} users exceeds the smaller domain")
    n_users = cfg.users_a + cfg.users_b - n_o
    z = centres[rng.integers(0, cfg.clusters, n_users)] + 0.3 * rng.normal(size=(n_users, cfg.dim))
    # users 0..users_a-1 are in A; the last n_o of them and users_a..n_users-1 are in B
    members = {0: np.arange(cfg.users_a), 1: np.arange(cfg.users_a - n_o, n_users)}
    cols: dict[str, list] = {"user_id": [], "item_id": [], "domain": [], "timestamp": []}
    truth = {"z": z, "w": {}, "items": {}}
    for k, (n_items, lens) in enumerate(((cfg.items_a, cfg.len_a), (cfg.items_b, cfg.len_b))):
        w = centres[rng.integers(0, cfg.clusters, n_items)] + 0.5 * rng.normal(size=(n_items, cfg.dim))
        ids = np.arange(n_items, dtype=np.int64) + (1 if k == 0 else 100_000)
        truth["w"][cfg.domains[k]], truth["items"][cfg.domains[k]] = w, ids
        unit = w / np.linalg.norm(w, axis=1, keepdims=True)
        for u in members[k]:
            L = int(rng.integers(lens[0], lens[1] + 1))
            base = cfg.beta * (w @ z[u])
            prev = -1
            for t in range(L):
                logit = base + (cfg.gamma * (unit @ unit[prev]) if prev >= 0 else 0.0)
                if prev >= 0:
                    logit[prev] = -np.inf
                p = np.exp(logit - logit.max())
                v = int(rng.choice(n_items, p=p / p.sum()))
                cols["user_id"].append(int(u))
                cols["item_id"].append(int(ids[v]))
                cols["domain"].append(cfg.domains[k])
                cols["timestamp"].append(t)
                prev = v
    types = {"user_id": pa.int64(), "item_id": pa.int64(), "domain": pa.string(), "timestamp": pa.int64()}
    inter = pa.table({c: pa.array(v, types[c]) for c, v in cols.items()})
    return inter, truth


def main(argv: list[str] | None = None) -> None:
    """python -m xdtrain.data.synthetic.two_domain --out DIR [--overlap 0.1] [--seed 0] [--users-a 600] ..."""
    import argparse

    from xdtrain.data.sequences import write_dataset

    ap = argparse.ArgumentParser(description="Write a two-domain world's interactions as Parquet (DIR/interactions)")
    ap.add_argument("--out", required=True)
    for name in ("users_a", "users_b", "items_a", "items_b", "seed"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(TwoDomainWorld, name))
    ap.add_argument("--overlap", type=float, default=TwoDomainWorld.overlap)
    args = ap.parse_args(argv)
    cfg = TwoDomainWorld(**{k: v for k, v in vars(args).items() if k != "out"})
    inter, _ = two_domain_world(cfg)
    print(write_dataset(inter, f"{args.out}/interactions", 65536))


if __name__ == "__main__":
    main()
