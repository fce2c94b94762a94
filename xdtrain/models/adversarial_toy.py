"""A small WGAN-GP (Gulrajani et al. 2017) as an engine program: the example of docs/engine.md.

Not a recommender method; it exercises what the adversarial methods need (RecGURU): two
streams, two optimizers, a 5:1 critic/generator plan with the other side frozen, named
losses, and a gradient penalty that back-propagates through a gradient.

"Real" samples are users of stream `train`, as the mean of their items' PS rows; "fake" ones are
users of the cycling stream `aux`, through the generator MLP (generator = MLP + the item table).

  critic step:  L_D = E[D(fake)] - E[D(real)] + lambda * E[(||grad D(x_hat)|| - 1)^2]   (WGAN-GP, Alg. 1)
                x_hat = eps * real + (1 - eps) * fake, eps ~ U[0, 1]
  gen step:     L_G = -E[D(fake)]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from xdtrain.eval.evaluator import EmbeddingScorer
from xdtrain.nn.losses import gradient_penalty
from xdtrain.nn.program import OptimSpec, Phase, Step, StreamSpec
from xdtrain.nn.sparse import PAD_ID, Pull, Rows
from xdtrain.ps import OptimizerSpec, TableSpec

ITEM = "item"


@dataclass
class AdversarialToyConfig:
    d: int = 16
    hidden: int = 32
    max_len: int = 20
    critic_steps: int = 5  # critic iterations per generator iteration (WGAN-GP n_critic)
    gp_weight: float = 10.0  # lambda
    lr: float = 1e-4  # both sides (WGAN-GP: Adam, lr 1e-4, betas (0.5, 0.9))
    beta1: float = 0.5
    beta2: float = 0.9
    aux_batch: int = 32  # global rows of the `aux` stream per iteration
    item_lr: float = 0.05  # the PS-side optimizer of the item rows
    item_optimizer: str = "sgd"  # or "adam" (ps.sync then sums the workers' rows before one step)
    epochs: int = 0  # 0 = train.epochs


class AdversarialToy(nn.Module):
    def __init__(self, cfg: AdversarialToyConfig, item_ids: np.ndarray, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.item_ids = np.unique(np.asarray(item_ids, dtype=np.int64))
        self.generator = nn.Sequential(nn.Linear(cfg.d, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, cfg.d))
        self.critic = nn.Sequential(nn.Linear(cfg.d, cfg.hidden), nn.LeakyReLU(0.2), nn.Linear(cfg.hidden, 1))

    @classmethod
    def from_data(cls, cfg: AdversarialToyConfig, data, seed: int = 0) -> AdversarialToy:
        return cls(cfg, data.item_ids, seed)

    # ---- the program --------------------------------------------------------------------------
    def streams(self) -> dict[str, StreamSpec]:
        return {"train": StreamSpec(), "aux": StreamSpec(batch_size=self.cfg.aux_batch, cycle=True, seed=1)}

    def optimizers(self) -> dict[str, OptimSpec]:
        betas = (self.cfg.beta1, self.cfg.beta2)
        return {"critic": OptimSpec(params=("critic.",), tables=(), lr=self.cfg.lr, betas=betas),
                "gen": OptimSpec(params=("generator.",), tables=(ITEM,), lr=self.cfg.lr, betas=betas)}

    def plan(self) -> list[Phase]:
        both = ("train", "aux")
        return [Phase("adversarial", steps=(Step("critic", both, repeat=self.cfg.critic_steps),
                                            Step("gen", both)), epochs=self.cfg.epochs or None)]

    def sparse_tables(self) -> list[TableSpec]:
        return [TableSpec(ITEM, self.cfg.d, init="normal", init_scale=0.1,
                          optimizer=OptimizerSpec(self.cfg.item_optimizer, lr=self.cfg.item_lr), seed=self.seed)]

    # ---- batches --------------------------------------------------------------------------------
    def make_batch(self, rows: pa.Table, rng: np.random.Generator, stream: str = "train") -> dict[str, Tensor]:
        """The last `max_len` items of each user (PAD_ID-padded) and, for `aux`, the GP mixing weights."""
        seqs = [np.asarray(s, dtype=np.int64)[-self.cfg.max_len:] for s in rows["items"].to_pylist()]
        items = torch.full((len(seqs), self.cfg.max_len), PAD_ID, dtype=torch.int64)
        for i, s in enumerate(seqs):
            items[i, : len(s)] = torch.from_numpy(s)
        out = {"items": items}
        if stream == "aux":
            out["eps"] = torch.from_numpy(rng.random((len(seqs), 1)).astype(np.float32))
        return out

    def sparse_ids(self, batch: dict) -> dict[str, Tensor]:
        ids = torch.cat([b["items"].reshape(-1) for b in batch.values()])
        return {ITEM: ids[ids != PAD_ID]}

    # ---- losses ---------------------------------------------------------------------------------
    @staticmethod
    def _mean_rows(items: Tensor, rows: Rows) -> Tensor:
        mask = items != PAD_ID
        safe = torch.where(mask, items, rows.ids[0])
        x = rows(safe) * mask.unsqueeze(-1)
        return x.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)

    def forward(self, batch: dict, emb: dict[str, Rows], step: str = "gen") -> dict[str, Tensor]:
        real = self._mean_rows(batch["train"]["items"], emb[ITEM])
        fake = self.generator(self._mean_rows(batch["aux"]["items"], emb[ITEM]))
        if step == "gen":
            return {"gen": -self.critic(fake).mean()}
        real, fake = real.detach(), fake.detach()
        gp = gradient_penalty(self.critic, real, fake, batch["aux"]["eps"])
        wdist = self.critic(fake).mean() - self.critic(real).mean()
        return {"critic": wdist, "gp": gp, "loss": wdist + self.cfg.gp_weight * gp}

    # ---- evaluation: a user is the mean of their history's rows ------------------------------------
    @torch.no_grad()
    def scorer(self, rows: pa.Table, pull: Pull) -> EmbeddingScorer:
        users = torch.zeros(rows.num_rows, self.cfg.d)
        for i, h in enumerate(rows["history"].to_pylist()):
            h = np.unique(np.asarray(h, dtype=np.int64)[-self.cfg.max_len:])
            if h.size:
                users[i] = pull(ITEM, h).mean(0)
        items = pull(ITEM, self.item_ids)
        return EmbeddingScorer(torch.arange(rows.num_rows), users, torch.from_numpy(self.item_ids), items, key="row")
