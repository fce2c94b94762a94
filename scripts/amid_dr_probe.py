"""Spec test F2 with the spec's extra MNAR factor (docs/amid.md): does AMID gain more over +MIM at K_u 25%
than at 75% when O's non-overlapping rows are not missing at random?

    python scripts/amid_dr_probe.py --seeds 0 1 2 --mnar 0 2 --out runs/amid_dr_probe.json

Spec test F's world and model (WORLD_F, MODEL_F in xdtrain/models/amid_local.py) with items of a
cluster drawn Zipf-like (`--item-skew`, so items differ in popularity) and O's non-overlapping rows
drawn ∝ popularity(target)^mnar (`AmidDataConfig.mnar`; 0 = uniform, the released files). Per world,
K_u and seed: test NDCG@10 (50 fixed negatives) of non-overlapping users at the best validation epoch
of each method (`--methods`, default backbone, mim, ips, amid), and AMID − MIM paired per seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xdtrain.data.synthetic.open_world import OpenWorld  # noqa: E402
from xdtrain.models import amid_local as al  # noqa: E402
from xdtrain.models.amid import AmidConfig  # noqa: E402


def run(world: OpenWorld, k_u: float, mnar: float, epochs: int, methods: list[str], model: dict) -> dict:
    rows, cat, valid, test = al.world_data(world, k_u, world.seed, mnar)
    out = {}
    for name in methods:
        cfg = AmidConfig(**{**model, **al.METHODS[name]})
        hist = al.fit_and_track(cfg, rows, valid, test, list(world.domains), cat, "uniform:50", world.seed, epochs,
                             batch_size=128)
        out[name] = al.valid_ndcg_by_overlap(hist)
        print(f"  mnar {mnar} K_u {k_u} seed {world.seed}: {name:<8} {out[name]}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--mnar", nargs="+", type=float, default=[0.0, 2.0])
    p.add_argument("--k-u", nargs="+", type=float, default=[0.25, 0.75])
    p.add_argument("--item-skew", type=float, default=1.0)
    p.add_argument("--methods", nargs="+", default=list(al.METHODS), choices=list(al.METHODS))
    p.add_argument("--lr2", type=float, default=al.MODEL_F["lr2"], help="stage 2 (eq. 15) learning rate")
    p.add_argument("--epochs", type=int, default=al.EPOCHS_F)
    p.add_argument("--out", default="runs/amid_dr_probe.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = {**al.MODEL_F, "lr2": args.lr2}
    res: dict = {}
    for mnar in args.mnar:
        for k_u in args.k_u:
            res[f"mnar {mnar}, K_u {k_u}"] = {
                str(s): run(OpenWorld(seed=s, item_skew=args.item_skew, **al.WORLD_F), k_u, mnar, args.epochs,
                            args.methods, model) for s in args.seeds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": res}, indent=2))
    print(f"\nnon-overlapping users' test NDCG@10 at the best validation epoch, mean ± std over seeds {args.seeds} "
          f"(item skew {args.item_skew}, lr2 {args.lr2})")
    print("| O drawn | K_u | " + " | ".join(args.methods) + " | AMID − MIM (paired) |")
    print("|---|---|" + "---|" * (len(args.methods) + 1))
    for key, by_seed in res.items():
        mnar, k_u = key.split(", ")
        cols = {m: np.array([by_seed[s][m]["overlap=false"] for s in by_seed]) for m in args.methods}
        gap = cols["amid"] - cols["mim"] if {"amid", "mim"} <= cols.keys() else None
        print(f"| {mnar} | {k_u.split()[1]} | " + " | ".join(f"{c.mean():.4f} ± {c.std():.4f}" for c in cols.values())
              + (f" | {gap.mean():+.4f} ± {gap.std():.4f} |" if gap is not None else " | - |"))


if __name__ == "__main__":
    main()
