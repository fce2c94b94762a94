"""Cross-domain sequential recommender on the parameter server: a backbone (SASRec, GRU4Rec or
BERT4Rec) over one user's time-ordered items from every domain, with the item table in the PS.

It is the engine's reference model: the same backbone, batches and losses as the single-process
`xdtrain.reference.trainer.Recommender`, but items are raw int64 ids whose embeddings are pulled
from the PS table `item` (PAD_ID = -1 pads), so the engine run can be checked against the
reference run on the same data (README, "engine vs reference").

Training rows (`make_batch`): the `sequences` table, one row per user, `items` oldest first.
Negatives are drawn here, uniformly over the catalogue and never among the user's own items
(SASRec's protocol), so `sparse_ids` can list every row the loss will touch before the pull.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from xdtrain.eval.evaluator import EmbeddingScorer
from xdtrain.eval.exported import keys_table, vector_table
from xdtrain.nn import BERT4Rec, make_backbone
from xdtrain.nn.batches import add_negatives, cloze_batch, next_item_batch, pad_right
from xdtrain.nn.losses import sequence_loss
from xdtrain.nn.sparse import PAD_ID, Pull, Rows, export_from_parts
from xdtrain.ps import OptimizerSpec, TableSpec

ITEM_TABLE = "item"


@dataclass
class SeqRecConfig:
    backbone: Literal["sasrec", "gru4rec", "bert4rec"] = "sasrec"
    d: int = 50
    max_len: int = 200
    layers: int = 2
    heads: int = 1
    dropout: float = 0.2
    init_std: float = 0.02  # item rows start N(0, init_std^2), seeded per id by the PS
    mask_prob: float = 0.2  # BERT4Rec Cloze masking
    last_only_prob: float = 0.1
    loss: Literal["bce", "bpr", "sampled_softmax"] = "bce"
    negatives: int = 1  # per position (bce/bpr) or shared by the batch (sampled_softmax)
    item_optimizer: str = "adam"  # PS-side optimizer of the item rows
    item_lr: float = 1e-3
    item_beta1: float = 0.9  # the reference trainer's Adam betas
    item_beta2: float = 0.98


class SeqRec(nn.Module):
    """Backbone + PS item table. `item_ids` is the catalogue (raw ids) negatives are drawn from."""

    def __init__(self, cfg: SeqRecConfig, item_ids: np.ndarray, seed: int = 0,
                 item_domains: dict[str, np.ndarray] | None = None) -> None:
        super().__init__()
        self.item_domains = dict(item_domains or {})  # domain -> its raw ids: the export's item domains
        self.cfg = cfg
        self.item_ids = np.unique(np.asarray(item_ids, dtype=np.int64))
        self.num_items = len(self.item_ids)
        self.backbone = make_backbone(cfg)
        self.cloze = isinstance(self.backbone, BERT4Rec)
        self.seed = seed
        # Dense index 0 is padding in the batch builders; the lookup maps it to PAD_ID.
        self._raw = torch.from_numpy(np.concatenate([[PAD_ID], self.item_ids]))

    @classmethod
    def from_data(cls, cfg: SeqRecConfig, data, seed: int = 0) -> SeqRec:
        return cls(cfg, data.item_ids, seed, data.item_domains)

    # ---- contract: tables, batches, ids ------------------------------------------------------------
    def sparse_tables(self) -> list[TableSpec]:
        opt = OptimizerSpec(self.cfg.item_optimizer, lr=self.cfg.item_lr, beta1=self.cfg.item_beta1,
                            beta2=self.cfg.item_beta2)
        return [TableSpec(ITEM_TABLE, self.cfg.d, init="normal", init_scale=self.cfg.init_std,
                          optimizer=opt, seed=self.seed)]

    def dense_index(self, raw: np.ndarray) -> np.ndarray:
        """Catalogue positions 1..num_items of raw ids (unknown ids are an error)."""
        pos = np.searchsorted(self.item_ids, raw)
        ok = (pos < self.num_items) & (self.item_ids[np.minimum(pos, self.num_items - 1)] == raw)
        if not ok.all():
            raise KeyError(f"item ids {np.asarray(raw)[~ok][:5].tolist()} are not in the catalogue")
        return pos + 1

    def make_batch(self, rows: pa.Table, rng: np.random.Generator) -> dict[str, Tensor]:
        """Sequences -> next-item (or Cloze) batch with negatives; every id tensor holds raw ids.
        All randomness comes from `rng`, so a resumed run rebuilds exactly the same batches."""
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        seqs = [self.dense_index(np.asarray(s, dtype=np.int64)) for s in rows["items"].to_pylist()]
        seqs = [s for s in seqs if len(s) >= 2] or seqs[:1]
        if self.cloze:
            batch = cloze_batch(seqs, self.cfg.max_len, self.cfg.mask_prob, rng, self.cfg.last_only_prob)
        else:
            batch = next_item_batch(seqs, self.cfg.max_len)
        if self.cfg.loss in ("bce", "bpr"):
            batch = add_negatives(batch, seqs, self.num_items, self.cfg.negatives, gen)
        else:
            batch["negatives"] = torch.randint(1, self.num_items + 1, (self.cfg.negatives,), generator=gen)
        out = {k: (self._raw[v] if k in ("inputs", "targets", "negatives") else v) for k, v in batch.items()}
        out["rows"] = batch["masked"] if self.cloze else batch["mask"]
        return out

    def sparse_ids(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        ids = torch.cat([batch["inputs"].reshape(-1), batch["targets"].reshape(-1),
                         batch["negatives"].reshape(-1)])
        return {ITEM_TABLE: ids[ids != PAD_ID]}

    @staticmethod
    def num_samples(batch: dict[str, Tensor]) -> int:
        return int(batch["inputs"].shape[0])

    # ---- contract: training loss --------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor], emb: dict[str, Rows]) -> Tensor:
        items = emb[ITEM_TABLE]
        x = self._embed(items, batch["inputs"])
        if self.cloze:
            states = self.backbone(x, batch["mask"], batch["masked"])
        else:
            states = self.backbone(x, batch["mask"])
        rows = batch["rows"]
        neg = batch["negatives"]
        neg = neg[rows] if self.cfg.loss in ("bce", "bpr") else neg
        return sequence_loss(states[rows], batch["targets"][rows], items, self.cfg.loss, self.num_items,
                             neg_ids=neg)

    @staticmethod
    def _embed(items: Rows, ids: Tensor) -> Tensor:
        safe = torch.where(ids == PAD_ID, items.ids[0] if items.ids.numel() else ids, ids)
        return items(safe) * (ids != PAD_ID).unsqueeze(-1).to(items.weight.dtype)

    # ---- contract: evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def user_vectors(self, histories: list[np.ndarray], pull: Pull, batch_size: int = 512) -> Tensor:
        """[U, d] next-item states from raw-id histories (oldest first)."""
        was = self.training
        self.eval()
        out = torch.zeros(len(histories), self.cfg.d)
        order = np.argsort([len(h) for h in histories], kind="stable")
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            ids, mask = pad_right([self.dense_index(np.asarray(histories[j], dtype=np.int64)) for j in idx],
                                  self.cfg.max_len)
            raw = self._raw[ids]
            uniq = np.unique(raw[mask].numpy())
            rows = Rows(uniq, pull(ITEM_TABLE, uniq))
            if uniq.size:
                out[torch.from_numpy(idx)] = self.backbone.user_state(self._embed(rows, raw), mask)
        self.train(was)
        return out

    @torch.no_grad()
    def scorer(self, rows: pa.Table, pull: Pull) -> EmbeddingScorer:
        """Dot products of each eval row's user state (from its `history`) with the catalogue rows."""
        histories = [np.asarray(h, dtype=np.int64) for h in rows["history"].to_pylist()]
        users = self.user_vectors(histories, pull)
        items = pull(ITEM_TABLE, self.item_ids)
        return EmbeddingScorer(torch.arange(rows.num_rows), users, torch.from_numpy(self.item_ids), items,
                               key="row")

    # ---- contract: export -----------------------------------------------------------------------
    def export_keys(self) -> dict[str, pa.Table]:
        """"item": the catalogue's raw ids, with their domain when the data gave the domains' items."""
        if not self.item_domains:
            return {"item": pa.table({"id": pa.array(self.item_ids, pa.int64())})}
        return {"item": keys_table(self.item_domains)}

    @torch.no_grad()
    def export_part(self, name: str, rows: pa.Table, pull: Pull) -> pa.Table:
        """"item": the rows of the ids in `rows`; "user": for rows with user_id, history[, domain],
        each row's user vector, the backbone's last hidden state over its history (what `scorer`
        scores with), keyed by user_id (and domain when the rows have one)."""
        if name == "item":
            ids = np.asarray(rows["id"].to_numpy(), dtype=np.int64)
            out = vector_table(ids, pull(ITEM_TABLE, ids))
            return out.append_column("domain", rows["domain"]) if "domain" in rows.column_names else out
        if name != "user":
            raise KeyError(f"SeqRec exports 'item' and 'user', not {name!r}")
        vecs = self.user_vectors([np.asarray(h, dtype=np.int64) for h in rows["history"].to_pylist()], pull)
        out = vector_table(rows["user_id"].to_numpy(), vecs)
        if "domain" in rows.column_names:
            out = out.append_column("domain", rows["domain"].cast(pa.string()))
        return out

    def export(self, pull: Pull, users: pa.Table | None = None) -> dict[str, pa.Table]:
        """"item" (the whole catalogue) and, with `users`, "user" (see `export_part`)."""
        return export_from_parts(self, pull, users)
