"""Where AMID's MIM loses on the semi-synthetic open world (spec test F, docs/amid.md): the message path
taken apart, several seeds, non-overlapping and overlapping test users separately.

    python scripts/amid_mim_probe.py --seeds 0 1 2 --stay 0.6 0.0 --worlds aligned control \
        --out runs/amid_mim_probe.json

Per world (spec test F's world and model: WORLD_F, MODEL_F in xdtrain/models/amid_local.py; `--stay` =
the cluster chain's stickiness, 0 = items drawn i.i.d. from the user's interest mixture) and seed,
K_u 25%, test NDCG@10 at the best validation epoch of:
  backbone        no MIM
  mim             eq. 3-7 as configured (pairwise, cosine k 0.5, straight-through gate, self-message)
  mim self only   k = 2 (no cosine reaches it): only an overlapping user's own other-domain message
  mim oracle      eq. 3's groups replaced by the planted ones: a_ij = 1 iff receiver i's dominant cluster
                  equals sender j's (hard gate); everything after eq. 4 unchanged
  mim as released the released InterComp: no W1/W2, softmax over the batch, k 0.4, and its broadcast
                  (every user gets the same, batch-level message; spec §3.3)
and, for the trained `mim`, what its groups are on test rows (groups of mim_n rows, as at eval): the
share of (receiver, sender) pairs grouped, and how often a grouped / an ungrouped sender shares the
receiver's dominant cluster (against the base rate over all pairs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xdtrain.data.synthetic.open_world import OpenWorld, cluster_of  # noqa: E402
from xdtrain.models import amid_local as al  # noqa: E402
from xdtrain.models.amid import ITEM, Amid, AmidConfig  # noqa: E402
from xdtrain.nn.sparse import PAD_ID, Rows  # noqa: E402
from xdtrain.ps import LocalPS  # noqa: E402
from xdtrain.train.local_program import local_ps  # noqa: E402

VARIANTS = {"backbone": al.METHODS["backbone"], "mim": al.METHODS["mim"],
            "mim self only": {**al.METHODS["mim"], "mim_k": 2.0},
            "mim oracle": {**al.METHODS["mim"], "mim_gate": "hard"},
            "mim as released": {**al.METHODS["mim"], "code_compat": True, "mim_score": "softmax", "mim_k": 0.4,
                                "mim_w12": False, "mim_gate": "hard", "mim_self": "gate"}}


def dominant(world: OpenWorld, ids: Tensor) -> Tensor:
    """[N] each padded row's most frequent planted cluster (-1 for an empty row)."""
    out = []
    for row in ids.tolist():
        real = np.array([x for x in row if x != PAD_ID], dtype=np.int64)
        out.append(int(np.bincount(cluster_of(world, real), minlength=world.clusters).argmax()) if len(real) else -1)
    return torch.tensor(out)


class OracleGroups(Amid):
    """Amid whose eq. 3 scores are the planted groups: +1 where receiver and sender share a dominant
    cluster, -1 elsewhere (so any k in (-1, 1] groups exactly those)."""

    def __init__(self, world: OpenWorld, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.world, self._dom = world, None
        for z, mim in enumerate(self.mim):
            mim.group_scores = lambda s1, m1, s2, m2, z=z: self._oracle(z)

    def encode(self, b: dict[str, Tensor], items: Rows) -> tuple[list[Tensor], list[Tensor]]:
        self._dom = (dominant(self.world, b["d1"]), dominant(self.world, b["d2"]))
        return super().encode(b, items)

    def _oracle(self, z: int) -> Tensor:
        mine, theirs = self._dom[z], self._dom[1 - z]
        return torch.where(mine[:, None] == theirs[None, :], 1.0, -1.0)


@torch.no_grad()
def group_stats(model: Amid, ps: LocalPS, world: OpenWorld, test) -> dict[str, float]:
    """How the trained MIM groups test rows (Z1 <- Z2 and Z2 <- Z1 pooled), self-pairs excluded."""
    model.eval()
    grouped, same = [], []
    for c in range(0, test.num_rows, model.cfg.mim_n):
        t = test.slice(c, model.cfg.mim_n)
        b = model.inputs(t["seq_d1"].to_pylist(), t["seq_d2"].to_pylist(), t["domain_id"].to_numpy(),
                         t["overlap"].to_numpy(zero_copy_only=False))
        ids = torch.cat([b["d1"].reshape(-1), b["d2"].reshape(-1)])
        uniq = np.unique(ids[ids != PAD_ID].numpy())
        states, masks = model.encode(b, Rows(uniq, ps.pull(ITEM, uniq)))
        dom = (dominant(world, b["d1"]), dominant(world, b["d2"]))
        for z in (0, 1):
            mim = model.mim[z]
            a = mim.groups(mim.group_scores(states[z], masks[z], states[1 - z], masks[1 - z]), masks[1 - z])
            pairs = masks[z].any(1)[:, None] & masks[1 - z].any(1)[None, :] & ~torch.eye(len(a), dtype=torch.bool)
            grouped.append(a[pairs] > 0)
            same.append((dom[z][:, None] == dom[1 - z][None, :])[pairs])
    g, s = torch.cat(grouped), torch.cat(same)
    return {"grouped share": g.float().mean().item(), "same | grouped": s[g].float().mean().item(),
            "same | not grouped": s[~g].float().mean().item() if (~g).any() else float("nan"),
            "same, base rate": s.float().mean().item()}


def run(world: OpenWorld, seed: int, epochs: int, variants: list[str]) -> dict:
    rows, cat, valid, test = al.world_data(world, 0.25, seed)
    out, tag = {}, f"seed {seed} {'aligned' if world.aligned else 'control'} stay {world.stay}"
    for name in variants:
        cfg = AmidConfig(**{**al.MODEL_F, **VARIANTS[name]})
        torch.manual_seed(seed)
        model = (OracleGroups(world, cfg, list(world.domains), cat, seed) if name == "mim oracle"
                 else Amid(cfg, list(world.domains), cat, seed))
        ps = local_ps(model)
        hist = al.fit_and_track(cfg, rows, valid, test, list(world.domains), cat, "uniform:50", seed, epochs,
                             batch_size=128, model=model, ps=ps)
        out[name] = al.valid_ndcg_by_overlap(hist)
        if name == "mim":
            out["groups"] = {k: round(v, 4) for k, v in group_stats(model, ps, world, rows.test).items()}
        print(f"  {tag}: {name:<14} {out[name]}", flush=True)
    if "groups" in out:
        print(f"  {tag}: trained mim's groups {out['groups']}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--stay", nargs="+", type=float, default=[0.6, 0.0])
    p.add_argument("--worlds", nargs="+", default=["aligned"], choices=["aligned", "control"],
                   help="control: the second domain's interest mixtures drawn independently")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=al.EPOCHS_F)
    p.add_argument("--out", default="runs/amid_mim_probe.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    res = {}
    for kind in args.worlds:
        for stay in args.stay:
            world = {**al.WORLD_F, "stay": stay, "aligned": kind == "aligned"}
            worlds = {s: OpenWorld(seed=s, **world) for s in args.seeds}
            res[f"{kind}, stay {stay}"] = {str(s): run(w, s, args.epochs, args.variants) for s, w in worlds.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    for world, by_seed in res.items():
        print(f"\nworld {world}, K_u 25%, test NDCG@10 at the best validation epoch, mean ± std over seeds "
              f"{args.seeds}\n| variant | all | overlapping | non-overlapping | non-overlapping − backbone |")
        print("|---|---|---|---|---|")
        base = np.array([by_seed[s]["backbone"]["overlap=false"] if "backbone" in by_seed[s] else np.nan
                         for s in by_seed])
        for name in args.variants:
            cols = [np.array([by_seed[s][name][g] for s in by_seed]) for g in ("all", "overlap=true", "overlap=false")]
            gain = cols[2] - base
            print(f"| {name} | " + " | ".join(f"{c.mean():.4f} ± {c.std():.4f}" for c in cols)
                  + f" | {gain.mean():+.4f} ± {gain.std():.4f} |")
        for k in next(iter(by_seed.values())).get("groups", {}):
            print(f"trained mim's groups, {k}: " + ", ".join(f"{by_seed[s]['groups'][k]:.3f}" for s in by_seed))


if __name__ == "__main__":
    main()
