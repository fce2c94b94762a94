"""RecGURU (Li et al., WSDM 2022): generalized user representations learned adversarially across two
domains, as an engine program. Spec: ../shared/specs/recguru.md; paper sec. 3, Alg. 1.

Modules (d = model size):
  item.<D>    PS table per domain D (its own vocabulary), tied: encoder/decoder/CDSRec inputs,
              reconstruction logits and CDSRec scores all read it
  emb.        per-domain positions (trainable) and [eos] vectors (dense: N+1 rows and one row)
  encoder.    ONE bidirectional Transformer for both domains; the GUR h = its state at [eos]
  dec.<k>     per-domain causal decoder: self-attention, then attention over h, then FFN
  rec.<k>     per-domain CDSRec, decoder-shaped, fed the GUR and the short-term sequence (eq. 10-11)
  disc.       the domain critic: 4 FC layers, hidden 128, one scalar (no sigmoid under WGAN-GP)

Program (job):
  pretrain  phase 1 "pretrain": L_rec(A) + L_rec(B), Adam (0.9, 0.98) under Noam warmup ("pre")
            phase 2 "adversarial": 5 x critic step ("critic": L_D + lambda GP, h detached), then
            1 x generator step ("gen": L_rec(A) + L_rec(B) - L_dis + L_l2, critic frozen), Adam 1e-4 (0.5, 0.9)
  finetune  phase 3 "finetune" on `target` ("ft"): eq. 12 with CDSRec, Adam 1e-3 (0.9, 0.9); start it
            from the phase-2 checkpoint (init_from), once per target domain
  all       the three phases in one run (tests, smoke runs)
Variants: `autorec` (one domain, no critic, no l2), `seqrec` (CDSRec without the GUR; phase 3 only).
No gradient reversal anywhere: the sides alternate, each step moves only its own optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xdtrain.config import ConfigError
from xdtrain.data.recipes import DOMAIN_STREAM
from xdtrain.eval.evaluator import EmbeddingScorer
from xdtrain.models.recguru_data import (
    EOS_ID,
    DomainIndex,
    recommendation_tensors,
    reconstruction_tensors,
    with_eos,
)
from xdtrain.nn.layers import FeedForward, SelfAttention, TransformerBlock, key_mask
from xdtrain.nn.losses import gradient_penalty, mean_negative_bce, sampled_softmax_loss
from xdtrain.nn.program import OptimSpec, Phase, Step, StreamSpec
from xdtrain.nn.sparse import PAD_ID, Pull, Rows
from xdtrain.ps import OptimizerSpec, TableSpec

OVERLAP = "overlap"
TARGET = "target"


@dataclass
class RecGuruConfig:
    variant: Literal["recguru", "autorec", "seqrec"] = "recguru"
    job: Literal["pretrain", "finetune", "all"] = "pretrain"
    domains: list[str] = field(default_factory=list)  # [A, B]; empty = the data's two domains, sorted
    target: str = ""  # finetune / autorec / seqrec domain ("" = domains[0])
    d: int = 64
    max_len: int = 100  # N items (+ [eos])
    layers: int = 3
    heads: int = 2
    ffn: int = 512
    dropout: float = 0.5  # embeddings, attention, FFN
    disc_hidden: int = 128
    disc_dropout: float = 0.2
    neg_softmax: int = 20  # reconstruction sampled-softmax negatives per position
    bpr_negatives: int = 5  # eq. 12 negatives per position
    rec_loss: Literal["eq12", "pairwise"] = "eq12"
    adv_mode: Literal["wgan_gp", "bce"] = "wgan_gp"
    gp_weight: float = 0.1  # lambda_GP
    gp_in_bce: bool = False
    critic_steps: int = 5
    w_rec: float = 1.0
    w_adv: float = 1.0
    w_l2: float = 1.0
    l2_form: Literal["norm", "mse", "off"] = "norm"
    batch_size: int = 1024  # global users per iteration of each domain stream (equal A and B batches)
    overlap_batch: int = 0  # global overlapped users per generator step (0 = the authors' formula, >= 10)
    gur_train_mode: Literal["cut", "last", "full"] = "cut"
    phase3_add_recon: bool = False
    phase3_train_encoder: bool = False
    pretrain_steps: int = 400
    adv_iterations: int = 1000  # generator iterations of phase 2 (x (critic_steps + 1) engine iterations)
    finetune_epochs: int = 0  # 0 = train.epochs
    pre_lr: float = 1.0  # Noam scale factor
    pre_warmup: int = 0  # 0 = min(1000, pretrain_steps / 2)
    adv_lr: float = 1e-4
    ft_lr: float = 1e-3
    item_lr: float = 1e-3  # PS Adam of the item rows; phases scale it (ps_lr_scale)
    adv_item_scale: float = 0.1  # phase 2 item rows: item_lr x this (= adv_lr by default)
    init_std: float = 0.02


class DecoderStack(nn.Module):
    """Post-LN causal blocks with one extra sub-layer attending to the single memory vector h. With
    one memory slot the attention weights are all 1, so the sub-layer is W_o W_v h (spec sec. 3.3)."""

    def __init__(self, cfg: RecGuruConfig, use_memory: bool = True) -> None:
        super().__init__()
        self.use_memory = use_memory
        d, L = cfg.d, cfg.layers
        self.attn = nn.ModuleList(SelfAttention(d, cfg.heads, cfg.dropout) for _ in range(L))
        self.mem_v = nn.ModuleList(nn.Linear(d, d) for _ in range(L if use_memory else 0))
        self.mem_o = nn.ModuleList(nn.Linear(d, d) for _ in range(L if use_memory else 0))
        self.ffn = nn.ModuleList(FeedForward(d, cfg.ffn, cfg.dropout, "gelu") for _ in range(L))
        self.norms = nn.ModuleList(nn.LayerNorm(d, eps=1e-8) for _ in range(3 * L))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, h: Tensor | None) -> Tensor:
        for i in range(len(self.attn)):
            x = self.norms[3 * i](x + self.drop(self.attn[i](x, None)))
            if self.use_memory:
                x = self.norms[3 * i + 1](x + self.drop(self.mem_o[i](self.mem_v[i](h))).unsqueeze(1))
            x = self.norms[3 * i + 2](x + self.drop(self.ffn[i](x)))
        return x


def discriminator(cfg: RecGuruConfig) -> nn.Sequential:
    d, w, p = cfg.d, cfg.disc_hidden, cfg.disc_dropout
    return nn.Sequential(nn.Linear(d, w), nn.ReLU(), nn.Dropout(p), nn.Linear(w, w), nn.ReLU(), nn.Dropout(p),
                         nn.Linear(w, w), nn.ReLU(), nn.Dropout(p), nn.Linear(w, 1))


class RecGuru(nn.Module):
    def __init__(self, cfg: RecGuruConfig, item_domains: dict[str, np.ndarray], stream_rows: dict | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.seed = cfg, seed
        doms = list(cfg.domains) or sorted(item_domains)
        if cfg.variant == "recguru" and len(doms) != 2:
            raise ConfigError(f"model.domains: RecGURU needs two domains, got {doms}")
        self.domains = doms
        self.target = cfg.target or doms[0]
        if self.target not in doms:
            raise ConfigError(f"model.target {self.target!r} is not one of model.domains {doms}")
        # a fine-tune evaluated on its target only (data.eval_domains) needs no other catalogue
        needed = [self.target] if cfg.job == "finetune" or cfg.variant != "recguru" else doms
        missing = [d for d in needed if d not in item_domains]
        if missing:
            raise ConfigError(f"model.domains: {missing} not in the data's domains {sorted(item_domains)}")
        self.index = [DomainIndex(item_domains.get(d, np.zeros(0, np.int64))) for d in doms]
        self.stream_rows = dict(stream_rows or {})
        n = len(doms)
        self.emb = nn.ParameterDict({f"pos{k}": nn.Parameter(torch.randn(cfg.max_len + 1, cfg.d) * cfg.init_std)
                                     for k in range(n)})
        self.emb.update({f"eos{k}": nn.Parameter(torch.randn(cfg.d) * cfg.init_std) for k in range(n)})
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(TransformerBlock(cfg.d, cfg.heads, cfg.ffn, cfg.dropout, "gelu", pre_norm=False)
                                     for _ in range(cfg.layers))
        self.dec = nn.ModuleList(DecoderStack(cfg) for _ in range(n))
        self.rec = nn.ModuleList(DecoderStack(cfg, use_memory=cfg.variant != "seqrec") for _ in range(n))
        self.disc = discriminator(cfg)

    @classmethod
    def from_data(cls, cfg: RecGuruConfig, data, seed: int = 0) -> RecGuru:
        return cls(cfg, data.item_domains, data.extras.get("streams", {}), seed)

    def table(self, k: int) -> str:
        return f"item.{self.domains[k]}"

    @property
    def t(self) -> int:
        return self.domains.index(self.target)

    # ---- the program --------------------------------------------------------------------------
    def _pair(self) -> tuple[str, str]:
        """(main, cycling) per-domain streams: the smaller domain cycles while the larger runs its epoch."""
        rows = [self.stream_rows.get(DOMAIN_STREAM.format(d), 0) for d in self.domains[:2]]
        return ("d0", "d1") if rows[0] >= rows[1] else ("d1", "d0")

    def streams(self) -> dict[str, StreamSpec]:
        B = self.cfg.batch_size
        out = {TARGET: StreamSpec(dataset=DOMAIN_STREAM.format(self.target), batch_size=B)}
        if self.cfg.variant != "recguru" or self.cfg.job == "finetune":
            return out
        main, small = self._pair()
        out[main] = StreamSpec(dataset=DOMAIN_STREAM.format(self.domains[int(main[1])]), batch_size=B)
        out[small] = StreamSpec(dataset=DOMAIN_STREAM.format(self.domains[int(small[1])]), batch_size=B,
                                cycle=True, seed=1)
        if self._has_overlap():
            out[OVERLAP] = StreamSpec(dataset=OVERLAP, batch_size=self.cfg.overlap_batch or self._overlap_batch(),
                                      cycle=True, seed=2)
        return out

    def _has_overlap(self) -> bool:
        return self.cfg.l2_form != "off" and self.stream_rows.get(OVERLAP, 0) > 0

    def _overlap_batch(self) -> int:
        """The authors' size: B / int((|U_A| + |U_B|) / |U^o|) + 1, at least 10 (spec sec. 4.3)."""
        a, b = (self.stream_rows.get(DOMAIN_STREAM.format(d), 0) for d in self.domains)
        o = max(1, self.stream_rows.get(OVERLAP, 1))
        return max(10, int(self.cfg.batch_size / max(1, int((a + b) / o))) + 1)

    def optimizers(self) -> dict[str, OptimSpec]:
        cfg, tables = self.cfg, tuple(self.table(k) for k in range(len(self.domains)))
        gen = ("emb.", "encoder.", "dec.")
        warm = cfg.pre_warmup or max(1, min(1000, cfg.pretrain_steps // 2))
        ft = ["rec.", "emb."] + (["encoder."] if cfg.phase3_train_encoder else []) + \
             ([f"dec.{self.t}."] if cfg.phase3_add_recon else [])
        return {"pre": OptimSpec(params=gen, tables=tables, lr=cfg.pre_lr, betas=(0.9, 0.98), schedule="noam",
                                 warmup_steps=warm, noam_d=cfg.d),
                "critic": OptimSpec(params=("disc.",), tables=(), lr=cfg.adv_lr, betas=(0.5, 0.9)),
                "gen": OptimSpec(params=gen, tables=tables, lr=cfg.adv_lr, betas=(0.5, 0.9)),
                "ft": OptimSpec(params=tuple(ft), tables=(self.table(self.t),), lr=cfg.ft_lr, betas=(0.9, 0.9))}

    def plan(self) -> list[Phase]:
        cfg = self.cfg
        ft = Phase("finetune", steps=(Step("ft", (TARGET,)),), epochs=cfg.finetune_epochs or None)
        if cfg.variant == "seqrec":
            return [ft]
        if cfg.variant == "autorec":
            pre = [Phase("pretrain", steps=(Step("pre", (TARGET,)),), epochs=0, iterations=cfg.pretrain_steps)]
        else:
            both = self._pair()
            adv = Phase("adversarial", epochs=0, iterations=cfg.adv_iterations * (cfg.critic_steps + 1),
                        ps_lr_scale={t: cfg.adv_item_scale for t in self.optimizers()["gen"].tables},
                        steps=(Step("critic", both, repeat=cfg.critic_steps),
                               Step("gen", both + ((OVERLAP,) if self._has_overlap() else ()))))
            pre = [Phase("pretrain", steps=(Step("pre", both),), epochs=0, iterations=cfg.pretrain_steps), adv]
        return {"pretrain": pre, "finetune": [ft], "all": pre + [ft]}[cfg.job]

    def sparse_tables(self) -> list[TableSpec]:
        opt = OptimizerSpec("adam", lr=self.cfg.item_lr, beta1=0.9, beta2=0.98)
        return [TableSpec(self.table(k), self.cfg.d, init="normal", init_scale=self.cfg.init_std, optimizer=opt,
                          seed=self.seed + k) for k in range(len(self.domains))]

    # ---- batches ------------------------------------------------------------------------------
    def make_batch(self, rows: pa.Table, rng: np.random.Generator, stream: str = TARGET) -> dict:
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        N = self.cfg.max_len
        seqs = [np.asarray(s, np.int64)[-N:] for s in rows["items"].to_pylist()]
        if stream == OVERLAP:  # one user, both domains: the two encoder inputs of the l2 tie
            doms = rows["domains"].to_pylist()
            out = {}
            for k, d in enumerate(self.domains):
                out[f"enc{k}"] = with_eos([np.asarray(s)[np.asarray(m) == d][-N:] for s, m in
                                           zip(rows["items"].to_pylist(), doms)])
            return out
        k = self.t if stream == TARGET else int(stream[1])
        out = {"dom": k, "enc": with_eos(seqs), "eps": torch.from_numpy(rng.random((len(seqs), 1)).astype(np.float32))}
        if stream != TARGET or self.cfg.job != "finetune" or self.cfg.phase3_add_recon:
            out.update(reconstruction_tensors(seqs, self.index[k], self.cfg.neg_softmax, gen))
        if stream == TARGET:
            out.update(recommendation_tensors(seqs, self.index[k], self.cfg.bpr_negatives, self.cfg.gur_train_mode,
                                              rng, gen))
        return out

    def sparse_ids(self, batch: dict) -> dict[str, Tensor]:
        ids: dict[str, list[Tensor]] = {}
        for name, b in (batch.items() if "enc" not in batch else [(TARGET, batch)]):
            for key, v in b.items():
                if not isinstance(v, Tensor) or v.dtype != torch.int64 or key == "cut":
                    continue
                k = int(key[3]) if name == OVERLAP else b["dom"]
                ids.setdefault(self.table(k), []).append(v[v >= 0])
        return {t: torch.cat(v) for t, v in ids.items()}

    # ---- the networks -------------------------------------------------------------------------
    def embed(self, k: int, ids: Tensor, rows: Rows | None) -> Tensor:
        """Item rows (tied table) + [eos] + positions, zero at padding, then dropout."""
        real = ids >= 0
        x = torch.zeros(*ids.shape, self.cfg.d, dtype=self.emb[f"pos{k}"].dtype, device=ids.device)
        if rows is not None and bool(real.any()):
            x = rows(torch.where(real, ids, rows.ids[0])) * real.unsqueeze(-1)
        x = x + (ids == EOS_ID).unsqueeze(-1) * self.emb[f"eos{k}"]
        x = (x + self.emb[f"pos{k}"][: ids.shape[1]]) * (ids != PAD_ID).unsqueeze(-1)
        return self.emb_drop(x)

    def encode(self, k: int, enc: Tensor, rows: Rows | None) -> Tensor:
        """The GUR [B, d]: the shared encoder's state at each row's [eos]."""
        mask = enc != PAD_ID
        x = self.embed(k, enc, rows)
        allowed = key_mask(mask)
        for block in self.encoder:
            x = block(x, allowed)
        return x[enc == EOS_ID]

    def reconstruction(self, k: int, b: dict, h: Tensor, rows: Rows) -> Tensor:
        """Sampled-softmax reconstruction (eq. 5, mean over non-pad positions)."""
        o = self.dec[k](self.embed(k, b["dec_in"], rows), h)
        m = b["dec_out"] != PAD_ID
        o = o[m]
        pos = (o * rows(b["dec_out"][m])).sum(-1)
        neg = torch.einsum("nd,nkd->nk", o, rows(b["rec_neg"][m]))
        return sampled_softmax_loss(pos, neg)

    def recommendation(self, b: dict, rows: Rows) -> Tensor:
        """Eq. 12 (or pairwise) at the supervised CDSRec positions of the target domain."""
        k = self.t
        h = None
        if self.cfg.variant != "seqrec":
            h = self.encode(k, b["gur"], rows)
            h = h if self.cfg.phase3_train_encoder else h.detach()
        q = self.rec[k](self.embed(k, b["rec_in"], rows), h)[b["rec_sup"]]
        pos = (q * rows(b["rec_out"][b["rec_sup"]])).sum(-1)
        neg = torch.einsum("nd,nkd->nk", q, rows(b["bpr_neg"][b["rec_sup"]]))
        return mean_negative_bce(pos, neg, pairwise=self.cfg.rec_loss == "pairwise")

    def separation(self, ha: Tensor, hb: Tensor) -> tuple[Tensor, Tensor]:
        """(the critic's loss L_D without GP, W = mean f(h_a) - mean f(h_b)) for `adv_mode`."""
        fa, fb = self.disc(ha).squeeze(-1), self.disc(hb).squeeze(-1)
        w = fa.mean() - fb.mean()
        if self.cfg.adv_mode == "wgan_gp":
            return -w, w
        bce = F.binary_cross_entropy_with_logits  # eq. 8: y = 1 for domain A
        return bce(fa, torch.ones_like(fa)) + bce(fb, torch.zeros_like(fb)), w

    def l2_tie(self, b: dict, emb: dict[str, Rows]) -> Tensor:
        """Eq. 9 over the overlapped users of the batch: mean ||h_a - h_b||_2 (or the MSE)."""
        ha, hb = (self.encode(k, b[f"enc{k}"], emb.get(self.table(k))) for k in (0, 1))
        if self.cfg.l2_form == "mse":
            return F.mse_loss(ha, hb)
        return (ha - hb).norm(dim=1).mean()

    # ---- the steps ----------------------------------------------------------------------------
    def forward(self, batch: dict, emb: dict[str, Rows], step: str = "pre") -> dict[str, Tensor]:
        if "enc" in batch:  # a one-stream step: the target domain's batch
            batch = {TARGET: batch}
        cfg = self.cfg
        if step == "ft":
            b = batch[TARGET]
            out = {"bpr": self.recommendation(b, emb[self.table(self.t)])}
            if cfg.phase3_add_recon:
                rows = emb[self.table(self.t)]
                out["rec"] = self.reconstruction(self.t, b, self.encode(self.t, b["enc"], rows), rows)
            out["loss"] = sum(out.values())
            return out
        doms = [b for name, b in batch.items() if name != OVERLAP]
        hs = [self.encode(b["dom"], b["enc"], emb[self.table(b["dom"])]) for b in doms]
        if step == "critic":
            ha, hb = (h.detach() for h in self._ab(doms, hs))
            ld, w = self.separation(ha, hb)
            out = {"critic": ld, "w": w}
            if cfg.adv_mode == "wgan_gp" or cfg.gp_in_bce:
                out["gp"] = gradient_penalty(lambda x: self.disc(x), ha, hb, doms[0]["eps"])
                out["loss"] = ld + cfg.gp_weight * out["gp"]
            else:
                out["loss"] = ld
            return out
        out = {f"rec{b['dom']}": self.reconstruction(b["dom"], b, h, emb[self.table(b["dom"])])
               for b, h in zip(doms, hs)}
        loss = cfg.w_rec * sum(out.values())
        if step == "gen":
            ld, w = self.separation(*self._ab(doms, hs))
            out["w"] = w
            loss = loss - cfg.w_adv * ld
            if OVERLAP in batch:
                out["l2"] = self.l2_tie(batch[OVERLAP], emb)
                loss = loss + cfg.w_l2 * out["l2"]
        out["loss"] = loss
        return out

    @staticmethod
    def _ab(doms: list[dict], hs: list[Tensor]) -> tuple[Tensor, Tensor]:
        by = {b["dom"]: h for b, h in zip(doms, hs)}
        return by[0], by[1]

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def user_vectors(self, k: int, histories: list[np.ndarray], pull: Pull, batch_size: int = 256) -> Tensor:
        """CDSRec's query at the last position of each target-domain history (eq. 10), [U, d]."""
        out = torch.zeros(len(histories), self.cfg.d)
        N = self.cfg.max_len
        for i in range(0, len(histories), batch_size):
            seqs = [np.asarray(h, np.int64)[-N:] for h in histories[i: i + batch_size]]
            enc = with_eos(seqs)
            ids = np.unique(enc[enc >= 0].numpy())
            rows = Rows(ids, pull(self.table(k), ids)) if ids.size else None
            h = self.encode(k, enc, rows) if self.cfg.variant != "seqrec" else None
            inp = enc.masked_fill(enc == EOS_ID, PAD_ID)[:, :-1] if enc.shape[1] > 1 else enc
            q = self.rec[k](self.embed(k, inp, rows), h)
            last = torch.tensor([max(len(s) - 1, 0) for s in seqs])
            out[i: i + len(seqs)] = q[torch.arange(len(seqs)), last]
        return out

    @torch.no_grad()
    def scorer(self, rows: pa.Table, pull: Pull):
        """Scores q . I_v in the row's domain; the GUR and CDSRec read only that domain's history."""
        was = self.training
        self.eval()
        hist, hdom = rows["history"].to_pylist(), rows["history_domains"].to_pylist()
        dom = [str(d) for d in rows["domain"].to_pylist()]
        scorers = {}
        for k, d in enumerate(self.domains):
            idx = [i for i, x in enumerate(dom) if x == d]
            if not idx:
                continue
            own = [np.asarray(hist[i], np.int64)[np.asarray(hdom[i]) == d] for i in idx]
            vecs = self.user_vectors(k, own, pull)
            items = self.index[k].raw
            scorers[d] = EmbeddingScorer(torch.tensor(idx), vecs, torch.from_numpy(items),
                                         pull(self.table(k), items), key="row")
        self.train(was)

        def score(users: dict[str, Tensor], items: Tensor, *, domain: str) -> Tensor:
            return scorers[domain](users, items, domain=domain)

        return score
