"""Multi-interest information module (AMID, Xu et al. WWW '24, §4.2, eqs. 3-6), one direction Z1 <- Z2.

For N users of a batch, with S1 [N, T, d] their target-domain states and S2 [N, T, d] their
other-domain states (right-padded, masks m1 / m2):

    a'_ij = max_{t,s} (S1_i W1)[t] · (S2_j W2)[s]        eq. 3 (pairwise; `score` normalises it)
    a_ij  = 1[a'_ij >= k]                                eq. 4 (`gate`: hard, straight-through, soft)
    m_ij  = a_ij · S2_j W_ip                             eq. 5
    S*_i  = Concat_time(S1_i, Agg_j m_ij) W_F            eq. 6 -> [N, 2T, d]

Senders with an empty other-domain list are masked. User i's own other-domain message is
forced (a_ii = 1 when it has one; `self_message="force"`, the paper's "will also be propagated")
or gated like any other (`"gate"`, the released code). `aggregate`: "mean" over the group
(permutation-invariant, any batch size; the default), "sum", or "wc", the paper's W_C ∈ R^{N×1}
over batch slots (needs at most `n_users` rows; slot order matters). `code_compat` reproduces the
released code's broadcasting: row x of the score matrix is user y's *self*-similarity
max(S1_y S2_y^T) for every x, so every user gets the same, batch-global message.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCORES = ("cosine", "softmax", "raw")
GATES = ("straight_through", "hard", "soft")
AGGREGATES = ("mean", "sum", "wc")
MAX_SCORE_ELEMS = 1 << 25  # chunk the [n, N, T, T] similarity tensor over receivers above this


class MIM(nn.Module):
    def __init__(self, d: int, k: float = 0.5, score: str = "cosine", w12: bool = True,
                 gate: str = "straight_through", tau: float = 0.1, self_message: str = "force",
                 aggregate: str = "mean", n_users: int = 256, code_compat: bool = False) -> None:
        super().__init__()
        for name, val, allowed in (("score", score, SCORES), ("gate", gate, GATES),
                                   ("aggregate", aggregate, AGGREGATES), ("self_message", self_message,
                                                                          ("force", "gate"))):
            if val not in allowed:
                raise ValueError(f"MIM {name} {val!r}: expected one of {list(allowed)}")
        self.k, self.score, self.gate, self.tau = k, score, gate, tau
        self.self_message, self.aggregate, self.code_compat = self_message, aggregate, code_compat
        self.w1 = nn.Linear(d, d, bias=False) if w12 else None
        self.w2 = nn.Linear(d, d, bias=False) if w12 else None
        self.w_ip = nn.Linear(d, d)
        self.w_c = nn.Linear(n_users, 1) if aggregate == "wc" else None
        self.w_f = nn.Linear(d, d)

    def group_scores(self, s1: Tensor, m1: Tensor, s2: Tensor, m2: Tensor) -> Tensor:
        """[N, N] a'_ij (after `score` normalisation); -inf where i or j has no real item."""
        q = self.w1(s1) if self.w1 is not None else s1
        kk = self.w2(s2) if self.w2 is not None else s2
        if self.score == "cosine":
            q, kk = F.normalize(q, dim=-1), F.normalize(kk, dim=-1)
        if self.code_compat:  # released InterComp: entry [x, y] = max over (t, s) of S1_y S2_y^T, for every x
            sim = torch.einsum("ytd,ysd->yts", q, kk).masked_fill(~(m1[:, :, None] & m2[:, None, :]), -torch.inf)
            raw = sim.amax(dim=(1, 2)).unsqueeze(0).expand(q.shape[0], -1)
        else:
            raw = self._pairwise_max(q, m1, kk, m2)
        if self.score == "softmax":  # over senders j, as the released code (then at most 1/k pass)
            finite = torch.isfinite(raw)
            raw = torch.softmax(raw.masked_fill(~finite, -1e30), dim=1).masked_fill(~finite, -torch.inf)
        return raw

    @staticmethod
    def _pairwise_max(q: Tensor, m1: Tensor, kk: Tensor, m2: Tensor) -> Tensor:
        """[N, N] max over real (t, s) of q_i[t] · k_j[s]. The [n, N, T, T] similarities are found
        without autograd (chunked over receivers) and only each pair's maximising (t, s) product is
        recomputed with it: the same value and gradient as amax, without storing the big tensor."""
        N, T = q.shape[:2]
        step = max(1, MAX_SCORE_ELEMS // max(1, N * T * T))
        b1 = torch.zeros(m1.shape, dtype=q.dtype, device=q.device).masked_fill(~m1, -torch.inf)
        b2 = torch.zeros(m2.shape, dtype=q.dtype, device=q.device).masked_fill(~m2, -torch.inf)
        arg, best = [], []
        with torch.no_grad():
            for i in range(0, N, step):
                sim = torch.einsum("itd,jsd->ijts", q[i:i + step], kk)
                sim.add_(b1[i:i + step, None, :, None]).add_(b2[None, :, None, :])
                v, a = sim.flatten(2).max(-1)
                arg.append(a)
                best.append(v)
        arg, found = torch.cat(arg), torch.isfinite(torch.cat(best))
        ts = kk.shape[1]
        t_idx, s_idx = arg // ts, arg % ts
        rows = torch.arange(N, device=q.device)[:, None].expand(-1, kk.shape[0])
        cols = torch.arange(kk.shape[0], device=q.device)[None, :].expand(N, -1)
        raw = (q[rows, t_idx] * kk[cols, s_idx]).sum(-1)
        return raw.masked_fill(~found, -torch.inf)

    def groups(self, scores: Tensor, m2: Tensor) -> Tensor:
        """[N, N] a_ij: eq. 4's hard threshold in the forward pass; in training the straight-through
        and soft gates pass the gradient of σ((a' - k) / τ) so W1 / W2 learn."""
        hard = (scores >= self.k).to(scores.dtype)
        if self.training and self.gate != "hard":
            soft = torch.sigmoid((scores - self.k) / self.tau)
            a = soft if self.gate == "soft" else hard + soft - soft.detach()
        else:
            a = hard
        has_other = m2.any(dim=1)
        a = a * has_other[None, :].to(a.dtype)  # no message from an empty other-domain list
        if self.self_message == "force":
            eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
            a = torch.where(eye, has_other.to(a.dtype)[:, None].expand_as(a), a)
        return a

    def forward(self, s1: Tensor, m1: Tensor, s2: Tensor, m2: Tensor) -> tuple[Tensor, Tensor]:
        """(S* [N, 2T, d], its mask [N, 2T]); message positions are real where some sender had an item."""
        a = self.groups(self.group_scores(s1, m1, s2, m2), m2)
        msgs = self.w_ip(s2) * m2.unsqueeze(-1).to(s2.dtype)  # padding positions send nothing
        if self.aggregate == "wc":
            n_slots = self.w_c.weight.shape[1]
            if a.shape[0] > n_slots:
                raise ValueError(f"MIM aggregate 'wc': batch of {a.shape[0]} users > mim_n {n_slots} slots")
            agg = torch.einsum("ij,jtd->itd", a * self.w_c.weight[0, : a.shape[0]], msgs) + self.w_c.bias
        else:
            agg = torch.einsum("ij,jtd->itd", a, msgs)
            if self.aggregate == "mean":
                agg = agg / a.sum(dim=1).clamp(min=1.0)[:, None, None]
        msg_mask = ((a.detach() > 0).to(s2.dtype) @ m2.to(s2.dtype)) > 0
        out = self.w_f(torch.cat([s1, agg], dim=1))
        return out, torch.cat([m1, msg_mask], dim=1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """[B, L, d] -> [B, d]: the mean over real positions (zeros for a row with none)."""
    w = mask.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)
