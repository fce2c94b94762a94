"""AMID (Xu et al., "Rethinking Cross-Domain Sequential Recommendation under Open-World
Assumptions", WWW '24) and its baselines, as one engine program. Spec: shared/specs/amid.md.

  θ  one backbone per domain (`enc.0`, `enc.1`: SASRec / GRU4Rec / BERT4Rec) over a shared PS item
     table, the MIM per direction (`mim.0`: Z1 <- Z2, `mim.1`: Z2 <- Z1; xdtrain/nn/mim.py) and
     the prediction layer of eq. 7, r̂ = σ(MLP(Mean(S*) || v)) (`predict`, shared by the domains)
  φ  the imputation head ê = g_φ(Mean(S*) || v) (`impute`)
  ψ  the propensity head p̂ = g_ψ(Mean(S*) || v || overlap) (`propensity`), clipped to [p_min, 1]

Rows are (user, target domain) samples (xdtrain/data/amid_rows.py); each gives its target and one
negative from the target domain (not among the user's items there), resampled every epoch, and
the error e is the per-candidate BCE (or MSE / MAE), the row's o copied to its candidates.

Alg. 1 (joint learning, the released schedule): each phase epoch is one pass over O with
optimizer `main` (all of θ, φ, ψ; lr 5e-4) on eq. 13 plus the propensity's BCE on o over a cycling
stream of D, then one pass over D with optimizer `dr` (θ only, lr 5e-6, a second Adam: `shared`)
on eq. 15. Baselines by flags: `mim: false, estimator: none` (the backbone), `mim: true,
estimator: none` (+MIM), `mim: false, estimator: ips` (+IPS, IPSCDR-style: DR with ê ≡ 0),
`mim: true, estimator: dr` (AMID).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xdtrain.nn import make_backbone
from xdtrain.nn.dr import domain_mean, stage1_loss, stage2_loss
from xdtrain.nn.mim import MIM, masked_mean
from xdtrain.nn.program import OptimSpec, Phase, Step, StreamSpec
from xdtrain.nn.sparse import PAD_ID, Pull, Rows
from xdtrain.ps import OptimizerSpec, TableSpec

ITEM = "item"
THETA = ("enc.", "mim.", "predict.")  # the prediction model: what stage 2 updates


@dataclass
class AmidConfig:
    backbone: Literal["sasrec", "gru4rec", "bert4rec"] = "sasrec"
    d: int = 64
    max_len: int = 20  # T: the last T items of each domain list
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    hidden: int = 32  # prediction / imputation / propensity MLP hidden size (code: 32)
    init_std: float = 0.02
    # MIM (xdtrain/nn/mim.py)
    mim: bool = True
    mim_k: float = 0.5
    mim_score: Literal["cosine", "softmax", "raw"] = "cosine"
    mim_w12: bool = True
    mim_gate: Literal["straight_through", "hard", "soft"] = "straight_through"
    mim_tau: float = 0.1
    mim_self: Literal["force", "gate"] = "force"
    mim_aggregate: Literal["mean", "sum", "wc"] = "mean"
    mim_n: int = 256  # W_C slots (aggregate wc) and the eval group size (users per MIM batch)
    code_compat: bool = False  # the released batch-global MIM broadcast
    # DRE
    estimator: Literal["none", "naive", "ips", "dr"] = "dr"
    error: Literal["bce", "mse", "mae"] = "bce"
    lam1: float = 0.01  # λ1 (run.sh dr_e_w)
    propensity: Literal["bce", "free"] = "bce"  # bce: fit p̂ to o on D; free: only through the losses (code)
    p_min: float = 0.05
    stage2_code_compat: bool = False  # the released stage 2: mean(ê² + o (e² - ê²)² / p̂), every parameter
    # the program
    lr: float = 5e-4
    lr2: float = 5e-6
    epochs: int = 0  # 0 = train.epochs
    item_optimizer: str = "adam"
    item_lr: float = 5e-4


def _mlp(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class Amid(nn.Module):
    def __init__(self, cfg: AmidConfig, domains: list[str], item_domains: dict[str, np.ndarray], seed: int = 0):
        super().__init__()
        if len(domains) != 2:
            raise ValueError(f"AMID needs two domains, got {domains}")
        self.cfg, self.seed, self.domains = cfg, seed, list(domains)
        self.pools = [np.unique(np.asarray(item_domains[d], dtype=np.int64)) for d in self.domains]
        self.item_ids = np.unique(np.concatenate(self.pools))
        self.enc = nn.ModuleList([make_backbone(cfg) for _ in range(2)])
        self.mim = nn.ModuleList([MIM(cfg.d, cfg.mim_k, cfg.mim_score, cfg.mim_w12, cfg.mim_gate, cfg.mim_tau,
                                      cfg.mim_self, cfg.mim_aggregate, cfg.mim_n, cfg.code_compat)
                                  for _ in range(2)]) if cfg.mim else None
        self.predict = _mlp(2 * cfg.d, cfg.hidden)
        self.debias = cfg.estimator in ("ips", "dr")
        self.impute = _mlp(2 * cfg.d, cfg.hidden) if cfg.estimator == "dr" else None
        self.propensity = _mlp(2 * cfg.d + 1, cfg.hidden) if self.debias else None

    @classmethod
    def from_data(cls, cfg: AmidConfig, data, seed: int = 0) -> Amid:
        return cls(cfg, data.domains, data.item_domains, seed)

    # ---- the program (Alg. 1) ---------------------------------------------------------------------
    def streams(self) -> dict[str, StreamSpec]:
        out = {"O": StreamSpec(dataset="O")}
        if self.debias:
            out["D"] = StreamSpec(dataset="D", seed=1)
            if self.cfg.propensity == "bce":
                out["P"] = StreamSpec(dataset="D", cycle=True, seed=2)  # o-labelled rows for p̂ in stage 1
        return out

    def optimizers(self) -> dict[str, OptimSpec]:
        out = {"main": OptimSpec(params=("",), lr=self.cfg.lr)}
        if self.debias:
            code = self.cfg.stage2_code_compat
            out["dr"] = OptimSpec(params=("",) if code else THETA, tables=(ITEM,) if code else (),
                                  lr=self.cfg.lr2, shared=True)
        return out

    def plan(self) -> list[Phase]:
        epochs = self.cfg.epochs or None
        if not self.debias:
            return [Phase("train", steps=(Step("main", ("O",), epochs=1),), epochs=epochs)]
        o_streams = ("O", "P") if self.cfg.propensity == "bce" else ("O",)
        return [Phase("joint", steps=(Step("main", o_streams, epochs=1), Step("dr", ("D",), epochs=1)),
                      epochs=epochs)]

    def sparse_tables(self) -> list[TableSpec]:
        return [TableSpec(ITEM, self.cfg.d, init="normal", init_scale=self.cfg.init_std,
                          optimizer=OptimizerSpec(self.cfg.item_optimizer, lr=self.cfg.item_lr), seed=self.seed)]

    # ---- batches ----------------------------------------------------------------------------------
    def _pad(self, seqs: list[list[int]]) -> Tensor:
        """The last T items of each list, oldest first, right-padded with PAD_ID."""
        T = self.cfg.max_len
        out = torch.full((len(seqs), T), PAD_ID, dtype=torch.int64)
        for i, s in enumerate(seqs):
            s = s[-T:]
            out[i, : len(s)] = torch.as_tensor(s, dtype=torch.int64)
        return out

    def inputs(self, seq_d1: list, seq_d2: list, domain_id: np.ndarray, overlap: np.ndarray) -> dict[str, Tensor]:
        """Model inputs of rows whose target was already removed from the target-domain list."""
        return {"d1": self._pad(seq_d1), "d2": self._pad(seq_d2),
                "dom": torch.tensor(np.asarray(domain_id), dtype=torch.int64),
                "overlap": torch.tensor(np.asarray(overlap, dtype=np.float32))}

    def make_batch(self, rows: pa.Table, rng: np.random.Generator, stream: str = "O") -> dict[str, Tensor]:
        """Target = the last item of the target list (every occurrence removed from the history);
        candidates [target, one negative of the target domain not among the user's items there]."""
        from xdtrain.data.amid_rows import strip_target

        targets, s1, s2 = strip_target(rows)
        dom = rows["domain_id"].to_numpy()
        own = [set(s1[i] if x == 0 else s2[i]) | {int(targets[i])} for i, x in enumerate(dom)]
        negs = np.empty(len(dom), dtype=np.int64)
        for i, x in enumerate(dom):
            pool = self.pools[x]
            while True:  # rejection: a user's items are few against the domain's pool
                v = int(pool[rng.integers(len(pool))])
                if v not in own[i] or len(own[i]) >= len(pool):
                    break
            negs[i] = v
        ov = rows["overlap"].to_numpy(zero_copy_only=False) if "overlap" in rows.column_names else \
            np.array([bool(a) and bool(b) for a, b in zip(rows["seq_d1"].to_pylist(), rows["seq_d2"].to_pylist())])
        out = self.inputs(s1, s2, dom, ov)
        ob = rows["ob_label"].to_numpy() if "ob_label" in rows.column_names else np.ones(len(dom))
        out.update(cand=torch.as_tensor(np.stack([targets, negs], 1)),
                   label=torch.tensor([[1.0, 0.0]]).expand(len(dom), 2).contiguous(),
                   ob=torch.as_tensor(np.asarray(ob, dtype=np.float32)))
        return out

    @staticmethod
    def _parts(batch: dict) -> list[dict]:
        return list(batch.values()) if "d1" not in batch else [batch]

    def sparse_ids(self, batch: dict) -> dict[str, Tensor]:
        ids = torch.cat([b[k].reshape(-1) for b in self._parts(batch) for k in ("d1", "d2", "cand")])
        return {ITEM: ids[ids != PAD_ID]}

    # ---- the model --------------------------------------------------------------------------------
    @staticmethod
    def _embed(items: Rows, ids: Tensor) -> Tensor:
        safe = torch.where(ids == PAD_ID, items.ids[0] if items.ids.numel() else ids, ids)
        return items(safe) * (ids != PAD_ID).unsqueeze(-1).to(items.weight.dtype)

    def encode(self, b: dict[str, Tensor], items: Rows) -> tuple[list[Tensor], list[Tensor]]:
        """Each domain's encoder states S^Z [B, T, d] and their masks (real items), both domains."""
        masks = [b["d1"] != PAD_ID, b["d2"] != PAD_ID]
        return [enc(self._embed(items, b[k]), m) for enc, k, m in zip(self.enc, ("d1", "d2"), masks)], masks

    def represent(self, b: dict[str, Tensor], items: Rows) -> Tensor:
        """[B, d] Mean(S*) of each row's target domain (Mean(S) without MIM); the MIM group of a
        row is the rows of this batch."""
        states, masks = self.encode(b, items)
        users = []
        for z in (0, 1):
            if self.mim is not None:
                s, m = self.mim[z](states[z], masks[z], states[1 - z], masks[1 - z])
            else:
                s, m = states[z], masks[z]
            users.append(masked_mean(s, m))
        return torch.where((b["dom"] == 0).unsqueeze(-1), users[0], users[1])

    def _pairs(self, u: Tensor, v: Tensor) -> Tensor:
        return torch.cat([u.unsqueeze(1).expand(-1, v.shape[1], -1), v], dim=-1)

    def _heads(self, b: dict, items: Rows) -> dict[str, Tensor]:
        u = self.represent(b, items)
        x = self._pairs(u, items(b["cand"]))
        logit = self.predict(x).squeeze(-1)
        out = {"logit": logit, "e": self._error(logit, b["label"])}
        if self.impute is not None:
            raw = self.impute(x).squeeze(-1)
            out["e_hat"] = F.softplus(raw) if self.cfg.error == "bce" else torch.sigmoid(raw)
        if self.propensity is not None:
            ov = b["overlap"][:, None, None].expand(-1, x.shape[1], 1)
            xin = torch.cat([x.detach() if self.cfg.propensity == "bce" else x, ov], dim=-1)
            out["p_logit"] = self.propensity(xin).squeeze(-1)
            out["p_hat"] = torch.sigmoid(out["p_logit"]).clamp(min=self.cfg.p_min)
        return out

    def _error(self, logit: Tensor, label: Tensor) -> Tensor:
        if self.cfg.error == "bce":
            return F.binary_cross_entropy_with_logits(logit, label, reduction="none")
        diff = torch.sigmoid(logit) - label
        return diff**2 if self.cfg.error == "mse" else diff.abs()

    def forward(self, batch: dict, emb: dict[str, Rows], step: str = "main") -> dict[str, Tensor]:
        items = emb[ITEM]
        main = batch["O"] if "O" in batch else batch["D"] if "D" in batch else batch
        h = self._heads(main, items)
        dom = main["dom"][:, None].expand_as(h["e"])
        if step == "dr":  # stage 2 (eq. 15) on D: θ only (optimizer `dr`)
            o = main["ob"][:, None].expand_as(h["e"])
            e_hat = h.get("e_hat", torch.zeros_like(h["e"]))
            p_hat = h["p_hat"] if self.cfg.propensity == "free" else h["p_hat"].detach()
            return {"debias": stage2_loss(h["e"], e_hat, o, p_hat, dom, "dr" if self.impute is not None else "ips",
                                          code_compat=self.cfg.stage2_code_compat)}
        if self.impute is not None:
            p_hat = h["p_hat"] if self.cfg.propensity == "free" else h["p_hat"].detach()
            out = stage1_loss(h["e"], h["e_hat"], p_hat, dom, self.cfg.lam1)
        else:
            out = {"loss": domain_mean(h["e"], dom)}
        if "P" in batch:  # ψ: BCE of p̂ against o over D (stage 1; the representation is detached)
            hp = self._heads(batch["P"], items)
            o = batch["P"]["ob"][:, None].expand_as(hp["p_logit"])
            out["propensity"] = F.binary_cross_entropy_with_logits(hp["p_logit"], o)
            out["loss"] = out["loss"] + out["propensity"]
        return out

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def scorer(self, rows: pa.Table, pull: Pull) -> AmidScorer:
        """Each eval row's Mean(S*), its MIM group being `mim_n` consecutive eval rows of its target
        domain (transductive within the group, as the released test batches); scores are logits."""
        was = self.training
        self.eval()
        users = torch.zeros(rows.num_rows, self.cfg.d)
        dom = rows["domain_id"].to_numpy()
        s1, s2 = rows["seq_d1"].to_pylist(), rows["seq_d2"].to_pylist()
        ov = rows["overlap"].to_numpy(zero_copy_only=False)
        for z in (0, 1):
            for j in self.eval_groups(np.flatnonzero(dom == z)):
                b = self.inputs([s1[i] for i in j], [s2[i] for i in j], dom[j], ov[j])
                ids = torch.cat([b["d1"].reshape(-1), b["d2"].reshape(-1)])
                uniq = np.unique(ids[ids != PAD_ID].numpy())
                users[torch.from_numpy(j)] = self.represent(b, Rows(uniq, pull(ITEM, uniq)))
        self.train(was)
        return AmidScorer(users, torch.from_numpy(self.item_ids), pull(ITEM, self.item_ids), self.predict)

    def eval_groups(self, idx: np.ndarray) -> list[np.ndarray]:
        """The MIM groups of one target domain's eval rows `idx`: `mim_n` consecutive rows each."""
        return [idx[c:c + self.cfg.mim_n] for c in range(0, len(idx), self.cfg.mim_n)]


class AmidScorer:
    """Eval scores σ^{-1}(r̂) = MLP(u || v) (eq. 7 before the sigmoid: same order, fewer ties)."""

    def __init__(self, users: Tensor, item_ids: Tensor, item_vectors: Tensor, predict: nn.Module) -> None:
        self.users, self.item_ids, self.items, self.predict = users, item_ids, item_vectors, predict

    def __call__(self, users: dict[str, Tensor], items: Tensor, *, domain: str) -> Tensor:
        u = self.users[users["row"].cpu()]
        ids = items.cpu()
        if ids.dim() == 1:  # one list for every row: in chunks (B x chunk x 2d floats)
            return torch.cat([self.__call__(users, ids[j:j + 1024].expand(len(u), -1), domain=domain)
                              for j in range(0, len(ids), 1024)], dim=1)
        pos = torch.searchsorted(self.item_ids, ids).clamp(max=len(self.item_ids) - 1)
        if not (self.item_ids[pos] == ids).all():
            raise KeyError(f"item {int(ids[self.item_ids[pos] != ids][0])} is in no domain's pool")
        v = self.items[pos]
        return self.predict(torch.cat([u.unsqueeze(1).expand(-1, v.shape[1], -1), v], dim=-1)).squeeze(-1)
