"""Spec test F1 in an open world with trends (docs/amid.md): can AMID's MIM help non-overlapping users
when the users of one MIM group share something their own sequences barely show?

    python scripts/amid_trend_probe.py --seeds 0 1 2 --worlds aligned control --out runs/amid_trend_probe.json

Spec test F's world and model (WORLD_F, MODEL_F in xdtrain/models/amid_local.py) plus time periods
(`OpenWorld.periods`): each period has a trending interest cluster, and each of the last `--trend-items`
items of a user's domain lists comes from it with probability `--trend`. Aligned: the same cluster in
both domains; control: a user's second-domain trend is that of an independent random period. Training
batches and eval groups (`mim_n` consecutive rows) follow time, i.e. the period. Per world and seed,
K_u (`--k-u`, default 25%), test NDCG@10 at the best validation epoch of:
  backbone              no MIM
  mim                   eq. 3-7 as configured
  mim, mixed groups     the same, but each eval MIM group drawn across periods (rows shuffled first)
  mim, mixed batches    the same, but trained on batches shuffled across periods
  mim as released       the released InterComp (batch-global message; spec §3.3)
  amid                  MIM + the DR estimator (Alg. 1), for F2 (`--variants mim amid --k-u 0.25 0.75`)
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
from xdtrain.models.amid import Amid, AmidConfig  # noqa: E402

RELEASED = {**al.METHODS["mim"], "code_compat": True, "mim_score": "softmax", "mim_k": 0.4, "mim_w12": False,
            "mim_gate": "hard", "mim_self": "gate"}
VARIANTS = {"backbone": al.METHODS["backbone"], "mim": al.METHODS["mim"], "mim, mixed groups": al.METHODS["mim"],
            "mim, mixed batches": al.METHODS["mim"], "mim as released": RELEASED, "amid": al.METHODS["amid"]}


class MixedGroups(Amid):
    """Eval MIM groups drawn across periods: each domain's eval rows shuffled before the groups are cut."""

    def eval_groups(self, idx: np.ndarray) -> list[np.ndarray]:
        return super().eval_groups(np.random.default_rng(self.seed).permutation(idx))


def run(world: OpenWorld, k_u: float, seed: int, epochs: int, variants: list[str], mim_n: int) -> dict:
    rows, cat, valid, test = al.world_data(world, k_u, seed)
    by_time = al.period_groups(world, rows)
    out = {}
    for name in variants:
        cfg = AmidConfig(**{**al.MODEL_F, **VARIANTS[name], "mim_n": mim_n})
        model = MixedGroups(cfg, list(world.domains), cat, seed) if name == "mim, mixed groups" else None
        torch.manual_seed(seed)
        hist = al.fit_and_track(cfg, rows, valid, test, list(world.domains), cat, "uniform:50", seed, epochs,
                             batch_size=128, model=model, groups=None if name == "mim, mixed batches" else by_time)
        out[name] = al.valid_ndcg_by_overlap(hist)
        where = f"{'aligned' if world.aligned else 'control'} K_u {k_u} seed {seed}"
        print(f"  {where}: {name:<18} {out[name]}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--worlds", nargs="+", default=["aligned", "control"], choices=["aligned", "control"])
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "amid"], choices=list(VARIANTS))
    p.add_argument("--k-u", nargs="+", type=float, default=[0.25])
    p.add_argument("--periods", type=int, default=al.TREND_F["periods"])
    p.add_argument("--trend", type=float, default=al.TREND_F["trend"])
    p.add_argument("--trend-items", type=int, default=al.TREND_F["trend_items"])
    p.add_argument("--mim-n", type=int, default=al.MIM_N_TREND, help="eval MIM group size (rows of one target domain)")
    p.add_argument("--epochs", type=int, default=al.EPOCHS_F)
    p.add_argument("--out", default="runs/amid_trend_probe.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    res = {f"{w}, K_u {k}": {str(s): run(OpenWorld(seed=s, aligned=w == "aligned", periods=args.periods,
                                                  trend=args.trend, trend_items=args.trend_items, **al.WORLD_F),
                                        k, s, args.epochs, args.variants, args.mim_n) for s in args.seeds}
           for w in args.worlds for k in args.k_u}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": res}, indent=2))
    print(f"\nnon-overlapping users' test NDCG@10 at the best validation epoch, mean ± std over seeds {args.seeds}; "
          "gain = variant − backbone, paired per seed")
    gains = "backbone" in args.variants
    heads = [f"{v} | gain" if v != "backbone" and gains else v for v in args.variants]
    print("| world, K_u | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * ((2 * len(args.variants) - 1) if gains else len(args.variants)))
    for w, by_seed in res.items():
        cols = {v: np.array([by_seed[s][v]["overlap=false"] for s in by_seed]) for v in args.variants}
        cells = []
        for v, c in cols.items():
            cells.append(f"{c.mean():.4f} ± {c.std():.4f}")
            if v != "backbone" and gains:
                g = c - cols["backbone"]
                cells.append(f"{g.mean():+.4f} ± {g.std():.4f}")
        print(f"| {w} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
