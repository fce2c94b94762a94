"""PreRec: a pre-trained recommender with causal debiasing (Lin et al., WSDM '24; specs/prerec.md).

Read next to the paper:

  sec. 2, Eq. 1   m_j = f_NN(f_BERT(X_j))        frozen text vectors (xdtrain.text.cache) -> `f_nn`
          Eq. 3   n_i = f_seq(D_k, H_i)          causal Transformer (xdtrain.nn.SASRec) -> `user_states`
  sec. 3.1        Z_j = f_pop(F_j)               F_j from xdtrain.data.popularity -> `f_pop`
                  V_j = eps^v_j + D_k + Z_j + m_j                               -> `logits`
          Eq. 5   P(R_ijk | U, V, D, Z) = softmax_j(U_i^T V_j + D_k W_d + Z_j W_z), the softmax over
                  the domain's items, sampled: the target + K uniform same-domain negatives (App. E)
          Eq. 6-7 Gaussian priors -> L2 penalties: (lambda_v / 2)||eps^v||^2 on the offset rows in the
                  batch (a PS table: ~98% of the parameters) and (lambda_d / 2)||D||^2
  sec. 3.3, Eq. 8 zero-shot: do(D_k = 0), offsets dropped, the target domain's own popularity kept
  sec. 3.4        fine-tuning: `PreRec.transfer` keeps the shared weights, with fresh D and offsets

Two variants where the paper and the authors' code differ (spec sec. 3.3, 10.1-10.2):
  paper  D_k is a dummy token in front of the history, and in V_j; Z_j = GELU(W_p F_j + b) in R^d
         is added to V_j (a user-specific conformity U^T Z_j) and scored by Z_j W_z.
  code   D_k is added to every history token and is not in V_j; history tokens and candidates are
         m_j + eps^v_j; popularity is a scalar g(F_j) = Linear-GELU-Linear added to the logit.
PreRec_n (the ablation) switches off D, the popularity term and the offsets: `PreRecConfig.prerec_n()`.
Omitted, as in the code: the user offset eps^u (never learnable for unseen users, its prior mean 0 is
what every test user gets) and the popularity offset eps^z (lambda_z is not reported).

Engine contract: see `xdtrain.nn.sparse` (make_batch / sparse_ids / forward / scorer). On the engine
(`model: {name: prerec}`), `from_data` encodes the `items` side table's text with the configured
sentence-transformers model (cached as Parquet) and counts popularity from the `interactions` table.
Training rows are per-(user, domain) sequences (the recipe's `train_by_domain` stream), drawn
domain-balanced with replacement (spec sec. 2.6, `balanced`; `xdtrain.data.sampler`); with
`balanced=False`, per-user cross-domain rows (stream `train`, each once per epoch), split here into
per-(user, domain) rows. Eval rows are scored with the history of their own domain. For transfer,
list every domain of the experiment in `model.domains` (sources and targets) so all jobs share one
dense shape: a domain never trained keeps D_k = 0 and zero offsets, which is exactly the zero-shot
model of Eq. 8.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor, nn

from xdtrain.data.popularity import PopFactorsConfig, PopularityIndex, days_of
from xdtrain.data.schemas import DataError
from xdtrain.eval.evaluator import user_batch
from xdtrain.eval.exported import keys_table, vector_table
from xdtrain.models.prerec_data import (
    build_batch,
    chunk_sequences,
    in_domain_histories,
    offset_keys,
    split_by_domain,
)
from xdtrain.nn import SASRec
from xdtrain.nn.losses import sampled_softmax_loss
from xdtrain.nn.program import DEFAULT_STREAM, StreamSpec
from xdtrain.nn.sparse import Pull, Rows, export_from_parts
from xdtrain.ps import OptimizerSpec, TableSpec
from xdtrain.text.cache import ItemVectors, TextEncodeConfig, side_table_vectors

OFFSETS = "prerec_item_offset"  # PS table of eps^v, one row per (domain, item)
BALANCED_DATASET = "train_by_domain"  # the recipe stream of (user, domain) rows the balanced sampler reads


@dataclass
class PreRecConfig:
    """Model hyper-parameters (paper values: supplement Table 4 and App. B; spec sec. 4.2)."""

    variant: Literal["paper", "code"] = "paper"
    d: int = 256  # B: user / item embedding size
    max_len: int = 64  # history items per sample (code: truncate = 64)
    layers: int = 2  # attention layers of f_seq
    heads: int = 2  # Table 4 (the code runs 1)
    dropout: float = 0.1
    negatives: int = 255  # uniform, same domain, with replacement
    lambda_d: float = 0.3  # domain bias regularisation
    lambda_v: float = 100.0  # item bias regularisation
    use_domain: bool = True  # D_k (cross-domain bias, implicit confounder)
    use_popularity: bool = True  # Z_j / g(F_j) (in-domain popularity bias, explicit confounder)
    use_offsets: bool = True  # eps^v (per-(domain, item) offsets in the PS)
    pop_hidden: int = 512  # code variant: g = Linear(C, pop_hidden) - GELU - Linear(pop_hidden, 1)
    pop: PopFactorsConfig = field(default_factory=PopFactorsConfig)  # how F_j is computed
    offset_lr: float = 3e-4  # the offsets' Adam (row-wise, on the PS shards)
    remove_accidental_hits: bool = True  # a sampled negative equal to the target is masked out
    max_targets_per_row: int = 0  # 0: train every target of a row's window; k: a random k of them
    inference: Literal["auto", "zero_shot"] = "auto"  # auto: a trained domain uses D and offsets
    init_std: float = 0.02  # N(0, init_std) for f_NN, f_pop, W_z, W_d (code)
    # ---- engine (from_data, streams)
    balanced: bool = True  # spec sec. 2.6: domain-balanced draws of (user, domain) rows; needs
    # data.streams [..., train_by_domain]. False: the per-user rows of stream `train`, each once an epoch
    domains: list[str] = field(default_factory=list)  # rows of D ([] = the domains the job trains on)
    chunk: bool = True  # cut long rows into max_len + 1 windows: every target trained once per epoch
    text_model: str = "minilm"  # sentence-transformers model: the shipped MiniLM or a local directory
    text_cache: str = ""  # Parquet cache of text vectors (any fsspec URL; "" = <run_dir>/cache/text)
    text_batch: int = 128

    def __post_init__(self) -> None:
        if self.variant not in ("paper", "code"):
            raise ValueError(f"model.variant must be 'paper' or 'code', got {self.variant!r}")
        if self.d % self.heads:
            raise ValueError(f"model.d ({self.d}) must be divisible by model.heads ({self.heads})")
        if min(self.max_len, self.layers, self.heads, self.negatives, self.pop_hidden) < 1:
            raise ValueError("model.max_len, layers, heads, negatives and pop_hidden must be >= 1")
        if self.lambda_d < 0 or self.lambda_v < 0:
            raise ValueError("model.lambda_d and model.lambda_v must be >= 0")

    def prerec_n(self) -> PreRecConfig:
        """PreRec_n: no cross-domain or in-domain bias terms (no D, no popularity, no offsets)."""
        return replace(self, use_domain=False, use_popularity=False, use_offsets=False)


class PreRec(nn.Module):
    """Dense part of PreRec (f_NN, f_seq, D, f_pop, W_z, W_d); the offsets live in the PS.

    `domains`: the domains this model trains on (D has one row each); `text`: frozen text vectors
    and catalogues of every domain it meets; `popularity`: the index F_j is read from (required
    when cfg.use_popularity).
    """

    def __init__(self, cfg: PreRecConfig, domains: Sequence[str], text: ItemVectors,
                 popularity: PopularityIndex | None = None):
        super().__init__()
        if not domains or len(set(domains)) != len(domains):
            raise ValueError(f"PreRec needs distinct domains, got {list(domains)}")
        self.cfg, self.domains = cfg, [str(d) for d in domains]
        self.text, self.popularity = text, popularity
        if cfg.use_popularity and popularity is None:
            raise ValueError("PreRec with use_popularity needs a PopularityIndex")
        self._check_popularity(popularity)
        d, C = cfg.d, cfg.pop.orders
        self.f_nn = nn.Linear(text.dim, d, bias=False)  # Eq. 1 (code: bias-free linear 768 -> 256)
        self.f_seq = SASRec(d, max_len=cfg.max_len + 1, blocks=cfg.layers, heads=cfg.heads, dropout=cfg.dropout)
        self.D = nn.Parameter(torch.zeros(len(self.domains), d))  # D_k ~ N(0, 1/lambda_d); MAP init at 0
        if cfg.variant == "paper":
            self.f_pop = nn.Sequential(nn.Linear(C, d), nn.GELU())  # "a linear layer with activation"
            self.W_z = nn.Parameter(torch.empty(d))
            self.W_d = nn.Parameter(torch.empty(d))
        else:
            self.f_pop = nn.Sequential(nn.Linear(C, cfg.pop_hidden), nn.GELU(), nn.Linear(cfg.pop_hidden, 1))
        for p in [self.f_nn.weight, *(m.weight for m in self.f_pop if isinstance(m, nn.Linear))]:
            nn.init.normal_(p, std=cfg.init_std)
        if cfg.variant == "paper":
            nn.init.normal_(self.W_z, std=cfg.init_std)
            nn.init.normal_(self.W_d, std=cfg.init_std)

    @classmethod
    def from_data(cls, cfg: PreRecConfig, data, seed: int = 0) -> PreRec:
        """The engine's constructor: text vectors of the `items` table, popularity of `interactions`."""
        domains = list(cfg.domains) or list(data.extras.get("train_domains") or data.domains)
        text = load_item_vectors(cfg, data)
        pop = None
        if cfg.use_popularity:
            if "interactions" not in data.tables:
                raise DataError("PreRec: use_popularity needs the data's 'interactions' table")
            sizes = {d: len(text.catalogue(d)) for d in text.domains}
            pop = PopularityIndex.from_parquet(data.tables["interactions"], cfg.pop, sizes)
        return cls(cfg, domains, text, pop)

    # ------------------------------------------------------------ data the model reads

    def _check_popularity(self, popularity: PopularityIndex | None) -> None:
        if popularity is not None and self.cfg.use_popularity and popularity.cfg != self.cfg.pop:
            raise ValueError(f"popularity index built with {popularity.cfg}, but model.pop is {self.cfg.pop}")

    def attach(self, text: ItemVectors | None = None, popularity: PopularityIndex | None = None) -> PreRec:
        """Point the model at other text vectors / popularity (e.g. a target domain's, for zero-shot)."""
        self._check_popularity(popularity)
        self.text = text or self.text
        self.popularity = popularity or self.popularity
        return self

    @classmethod
    def transfer(cls, pretrained: PreRec, domains: Sequence[str], text: ItemVectors | None = None,
                 popularity: PopularityIndex | None = None) -> PreRec:
        """Fine-tuning start (sec. 3.4): every shared weight from `pretrained`, a fresh D = 0 for the
        new domains. Their offsets are new PS ids (`offset_keys` salts by domain): zeros, never a
        source row."""
        new = cls(pretrained.cfg, domains, text or pretrained.text, popularity or pretrained.popularity)
        shared = {k: v for k, v in pretrained.state_dict().items() if k != "D"}
        missing, unexpected = new.load_state_dict(shared, strict=False)
        assert missing == ["D"] and not unexpected, (missing, unexpected)
        return new

    # ------------------------------------------------------------ the model

    def user_states(self, m: Tensor, eps: Tensor | None, hist: Tensor, mask: Tensor, dom: Tensor,
                    D: Tensor | None, with_prior: bool = False) -> Tensor:
        """[B, T, d]: the user vector after each history position (it scores the next item).

        m, eps: [U, d] item tables; hist [B, T] indices into them; D: the domain table, or None for
        do(D_k = 0) (zero-shot) and PreRec_n. `with_prior` (paper variant): [B, T + 1, d], led by the
        state of the domain prior alone -- the vector of a user with no history yet.
        """
        tok = m[hist]  # H_i: universal embeddings of the history, oldest first
        if self.cfg.variant == "code":
            if eps is not None:
                tok = tok + eps[hist]  # code: history tokens carry their item offsets
            if D is not None:
                tok = tok + D[dom].unsqueeze(1)  # code: D_k added to every history token
            return self.f_seq(tok * mask.unsqueeze(-1).to(tok.dtype), mask)
        # Eq. 3: D_k as a dummy item in front of the history (a zero token when D_k = 0)
        prior = D[dom] if D is not None else tok.new_zeros(tok.shape[0], tok.shape[2])
        x = torch.cat([prior.unsqueeze(1), tok], dim=1)
        full = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        states = self.f_seq(x * full.unsqueeze(-1).to(x.dtype), full)
        return states if with_prior else states[:, 1:]

    def logits(self, u: Tensor, m: Tensor, eps: Tensor | None, idx: Tensor, dom: Tensor, D: Tensor | None,
               F: Tensor | None) -> Tensor:
        """Eq. 5 logits of users u [N, d] for items idx ([N] or [N, K], into the item tables m, eps),
        with popularity factors F ([*idx.shape, C], or None to leave the popularity term out)."""
        v = m[idx] if eps is None else m[idx] + eps[idx]
        multi = idx.dim() == 2
        expand = (lambda t: t.unsqueeze(1)) if multi else (lambda t: t)  # noqa: E731
        if self.cfg.variant == "code":
            out = torch.einsum("nd,nkd->nk", u, v) if multi else (u * v).sum(-1)
            return out if F is None else out + self.f_pop(F).squeeze(-1)  # + g(F_j)
        Z = self.f_pop(F) if F is not None else None  # Z_j = f_pop(F_j)
        if D is not None:
            v = v + expand(D[dom])  # V_j = eps^v_j + D_k + Z_j + m_j
        if Z is not None:
            v = v + Z
        out = torch.einsum("nd,nkd->nk", u, v) if multi else (u * v).sum(-1)  # U_i^T V_j
        if D is not None:
            out = out + expand(D[dom] @ self.W_d)  # + D_k W_d (constant over j: cancels, Eq. 8)
        if Z is not None:
            out = out + Z @ self.W_z  # + Z_j W_z
        return out

    # ------------------------------------------------------------ engine contract: training

    def sparse_tables(self) -> list[TableSpec]:
        if not self.cfg.use_offsets:
            return []
        # eps^v starts at its prior mean 0; new (domain, item) ids are admitted as zeros too.
        return [TableSpec(OFFSETS, self.cfg.d, init="zeros", optimizer=OptimizerSpec("adam", lr=self.cfg.offset_lr))]

    def streams(self) -> dict[str, StreamSpec]:
        """Spec sec. 2.6: each domain equally likely per draw, so single-domain rows (or the default stream)."""
        if not self.cfg.balanced:
            return {DEFAULT_STREAM: StreamSpec()}
        return {DEFAULT_STREAM: StreamSpec(dataset=BALANCED_DATASET, sampler="domain_balanced")}

    def make_batch(self, rows: pa.Table, rng: np.random.Generator) -> dict[str, Tensor]:
        cfg = self.cfg
        rows = split_by_domain(rows if isinstance(rows, pa.Table) else pa.Table.from_batches([rows]))
        if cfg.chunk:
            rows = chunk_sequences(rows, cfg.max_len)
        return build_batch(rows, rng, domains=self.domains, text=self.text,
                           popularity=self.popularity if cfg.use_popularity else None,
                           max_len=cfg.max_len, negatives=cfg.negatives,
                           max_targets_per_row=cfg.max_targets_per_row)

    def sparse_ids(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {OFFSETS: batch["key"]} if self.cfg.use_offsets else {}

    def forward(self, batch: dict[str, Tensor], emb: dict[str, Rows]) -> Tensor:
        """Eq. 7 per sample: -log softmax(target) over target + negatives, plus the L2 priors."""
        cfg = self.cfg
        m = self.f_nn(batch["text"])  # Eq. 1: [U, d]
        eps = emb[OFFSETS](batch["key"]) if cfg.use_offsets else None  # eps^v of the batch's items
        D = self.D if cfg.use_domain else None
        if batch["target"].numel() == 0:  # only one-item rows: nothing to predict
            return m.sum() * 0.0
        u = self.user_states(m, eps, batch["hist"], batch["mask"], batch["dom"], D)[batch["tmask"]]  # [N, d]
        tdom = batch["tdom"]
        pos = self.logits(u, m, eps, batch["target"], tdom, D, batch.get("pop_pos"))  # [N]
        neg = self.logits(u, m, eps, batch["neg"], tdom, D, batch.get("pop_neg"))  # [N, K]
        if cfg.remove_accidental_hits:
            loss = sampled_softmax_loss(pos, neg, pos_ids=batch["target"], neg_ids=batch["neg"])
        else:
            loss = sampled_softmax_loss(pos, neg)
        if eps is not None:  # (lambda_v / 2) ||V_j - f_item(D_k, Z_j, m_j)||^2 = (lambda_v / 2) ||eps^v_j||^2
            loss = loss + 0.5 * cfg.lambda_v * emb[OFFSETS].weight.pow(2).sum()
        if D is not None:  # (lambda_d / 2) ||D_k||^2
            loss = loss + 0.5 * cfg.lambda_d * self.D.pow(2).sum()
        return loss

    # ------------------------------------------------------------ engine contract: evaluation

    def scorer(self, rows: pa.Table, pull: Pull) -> PreRecScorer:
        return PreRecScorer(self, rows, pull)

    # ------------------------------------------------------------ engine contract: export

    def export_keys(self) -> dict[str, pa.Table]:
        """"item": (id, domain) of every item of the text catalogue."""
        return {"item": keys_table({d: self.text.catalogue(d) for d in self.text.domains})}

    def export_part(self, name: str, rows: pa.Table, pull: Pull, batch_size: int = 256) -> pa.Table:
        """"item": V_j of the (id, domain) rows (m_j + eps^v_j, + D_k in the paper variant), each
        domain's tower run once per call; "user": for eval rows (user_id, domain, history[, timestamp])
        each row's U_i, keyed by (user_id, domain). U_i^T V_j is the scorer's logit without the
        popularity term (it depends on the day) and the constant D_k W_d (it does not rank)."""
        if name not in ("item", "user"):
            raise KeyError(f"PreRec exports 'item' and 'user', not {name!r}")
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                if name == "user":
                    return self._export_users(rows, pull, batch_size)
                doms = np.asarray(pc.cast(rows.column("domain"), pa.string()).to_pylist(), dtype=object)
                ids = np.asarray(rows.column("id").to_numpy(), dtype=np.int64)
                parts = []
                for d in sorted(set(doms.tolist())):
                    sel = ids[doms == d]
                    base = item_vectors(self, d, pull)["base"][torch.from_numpy(self.text.positions(d, sel))]
                    parts.append(vector_table(sel, base, domain=d))
                return pa.concat_tables(parts) if parts else vector_table(ids, np.zeros((0, self.cfg.d)))
        finally:
            self.train(was)

    def export(self, pull: Pull, users: pa.Table | None = None) -> dict[str, pa.Table]:
        """"item": every (domain, item) of the text catalogue; with `users`, "user" (see `export_part`)."""
        return export_from_parts(self, pull, users)

    def _export_users(self, users: pa.Table, pull: Pull, batch_size: int) -> pa.Table:
        scorer = PreRecScorer(self, users, pull)
        doms = np.asarray(pc.cast(users.column("domain"), pa.string()).to_pylist(), dtype=object)
        uids = np.asarray(users.column("user_id").to_numpy(), dtype=np.int64)
        parts = []
        for d in sorted(set(doms.tolist())):
            idx = np.flatnonzero(doms == d)
            vecs = [scorer.user_vectors(user_batch(users, idx[i : i + batch_size]), d)
                    for i in range(0, len(idx), batch_size)]
            parts.append(vector_table(uids[idx], torch.cat(vecs), domain=d))
        return pa.concat_tables(parts)


class PreRecScorer:
    """Scores eval rows (columns: history, timestamp; see `prerec_data.eval_rows`) for the evaluator.

    A domain the model trained on is scored with its D_k and offsets (sec. 3.4, after fine-tuning);
    any other domain zero-shot (Eq. 8): D_k = 0, no offsets, popularity from the domain's own
    recent counts. Item vectors are precomputed once per domain (the serving item tower).
    """

    def __init__(self, model: PreRec, rows: pa.Table, pull: Pull):
        self.model, self.cfg = model, model.cfg
        doms = sorted(set(pc.cast(rows.column("domain"), pa.string()).to_pylist()))
        for col in ("history",) + (("timestamp",) if self.cfg.use_popularity else ()):
            if col not in rows.schema.names:
                raise ValueError(f"PreRec scorer: eval rows need a '{col}' column (see prerec_data.eval_rows)")
        self.tables: dict[str, dict] = {}
        self.histories = in_domain_histories(rows)  # None: the rows' history is already in-domain
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                for d in doms:
                    self.tables[d] = self._item_tables(d, pull)
        finally:
            model.train(was)
        self._cache: tuple | None = None

    def _item_tables(self, domain: str, pull: Pull) -> dict:
        if self.cfg.use_popularity and domain not in self.model.popularity.domains:
            raise ValueError(f"PreRec scorer: no popularity counts for domain '{domain}' (attach its index)")
        return item_vectors(self.model, domain, pull)

    def user_vectors(self, users: dict[str, Tensor], domain: str) -> Tensor:
        """U_i of a user batch (`user_batch` of the rows this scorer was built on) of one domain."""
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self._users(users, domain, self.tables[domain])
        finally:
            self.model.train(was)

    def _users(self, users: dict[str, Tensor], domain: str, t: dict) -> Tensor:
        key = (domain, users["row"].cpu().numpy().tobytes())
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        model, L = self.model, self.cfg.max_len
        hist, lens = self._history(users)
        start = np.maximum(lens - L, 0)  # keep each row's most recent max_len items
        width = max(1, int(np.minimum(lens, L).max()))
        cols = start[:, None] + np.arange(width)[None, :]
        mask = cols < lens[:, None]
        ids = np.where(mask, hist[np.arange(len(hist))[:, None], np.minimum(cols, hist.shape[1] - 1)], 0)
        pos = np.zeros_like(ids)
        pos[mask] = model.text.positions(domain, ids[mask])
        B, prior = len(ids), self.cfg.variant == "paper"
        states = model.user_states(t["m"], t["eps"], torch.from_numpy(pos), torch.from_numpy(mask),
                                   t["k"].expand(B), t["D"], with_prior=prior)
        # the state after the row's last item; an empty history reads the prior (paper) or zeros (code)
        last = np.minimum(lens, L) - (0 if prior else 1)
        u = states[torch.arange(B), torch.from_numpy(np.maximum(last, 0))]
        if not prior:
            u = u * torch.from_numpy(lens > 0).unsqueeze(-1).to(u.dtype)
        self._cache = (key, u)
        return u

    def _history(self, users: dict[str, Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """[B, W] history ids (right-padded) and lengths of a user batch."""
        if self.histories is None:
            return users["history"].cpu().numpy(), users["history_len"].cpu().numpy()
        hs = [self.histories[i] for i in users["row"].cpu().numpy()]
        lens = np.array([len(h) for h in hs], dtype=np.int64)
        hist = np.zeros((len(hs), max(1, int(lens.max(initial=0)))), dtype=np.int64)
        for i, h in enumerate(hs):
            hist[i, : len(h)] = h
        return hist, lens

    def __call__(self, users: dict[str, Tensor], items: Tensor, *, domain: str) -> Tensor:
        model, t = self.model, self.tables[domain]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                u = self._users(users, domain, t)
                it = items.cpu().numpy()
                base = t["base"][torch.from_numpy(model.text.positions(domain, it))]  # [N, d] or [B, C, d]
                scores = u @ base.T if it.ndim == 1 else torch.einsum("bd,bcd->bc", u, base)
                if self.cfg.use_popularity:
                    scores = scores + self._pop_term(u, it, users, domain)
                return scores + t["const"]
        finally:
            model.train(was)

    def _pop_term(self, u: Tensor, it: np.ndarray, users: dict[str, Tensor], domain: str) -> Tensor:
        """U^T Z_j + Z_j W_z (paper) or g(F_j) (code), with F_j at each row's day."""
        model = self.model
        pop = model.popularity
        days = days_of(users["timestamp"].cpu().numpy(), pop.cfg.day_seconds)
        if it.ndim == 2:
            Z = model.f_pop(torch.from_numpy(pop.factors(domain, it, days[:, None])))
            if self.cfg.variant == "code":
                return Z.squeeze(-1)
            return torch.einsum("bd,bcd->bc", u, Z) + Z @ model.W_z
        out = torch.zeros(len(days), len(it))
        for day in np.unique(days):  # rows of one day share F (eval rows sorted by time: few days)
            r = torch.from_numpy(np.nonzero(days == day)[0])
            Z = model.f_pop(torch.from_numpy(pop.factors(domain, it, day)))
            out[r] = Z.squeeze(-1)[None, :] if self.cfg.variant == "code" else u[r] @ Z.T + (Z @ model.W_z)[None, :]
        return out


def item_vectors(model: PreRec, domain: str, pull: Pull) -> dict:
    """A domain's item tower: m, eps, D, k, base = V_j (m_j + eps^v_j [+ D_k]), const = D_k W_d."""
    cfg = model.cfg
    ids = model.text.catalogue(domain)
    m = model.f_nn(torch.from_numpy(model.text.vectors(domain)))
    known = domain in model.domains and cfg.inference == "auto"
    eps = pull(OFFSETS, offset_keys(domain, ids)).to(m.dtype) if known and cfg.use_offsets else None
    D = model.D if known and cfg.use_domain else None
    k = torch.tensor([model.domains.index(domain) if known else 0])
    base = m if eps is None else m + eps  # the candidates' m_j + eps^v_j
    const = torch.zeros(())
    if D is not None and cfg.variant == "paper":
        base = base + D[k]  # V_j includes D_k ...
        const = (D[k] @ model.W_d)[0]  # ... and the logit D_k W_d (neither changes a ranking)
    return dict(m=m, eps=eps, D=D, k=k, base=base, const=const)


def load_item_vectors(cfg: PreRecConfig, data) -> ItemVectors:
    """f_BERT(X_j) of every (domain, item) of the data's `items` table (columns item_id, domain, text),
    encoded once and cached as Parquet (`xdtrain.text.cache`)."""
    cache = cfg.text_cache or f"{data.extras.get('cache_dir', 'runs/cache')}/text"
    enc = TextEncodeConfig(model=cfg.text_model, cache_dir=cache, batch_size=cfg.text_batch)
    return side_table_vectors(data.tables, enc, who="PreRec")
