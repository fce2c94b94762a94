"""Doubly robust estimation of a prediction error under MNAR observation (AMID, Xu et al. WWW '24, §4).

Every function takes per-pair tensors of one shape (any shape; pairs are its elements):

    e      the prediction error of each pair (BCE, squared or absolute error)
    e_hat  the imputed error ê (imputation head g_φ)
    o      1 where the pair is observed, 0 where not
    p_hat  the learned propensity p̂ = P(o = 1); p the true one (tests)
    domain the pair's domain (int); None = one domain

and averages per domain, then over domains: (1/|Z|) Σ_Z (1/|D^Z|) Σ_{(u,v) ∈ D^Z} (...), as eqs. 8-15.

    naive   (1/|Z|) Σ_Z mean over O^Z of e
    IPS     (1/|Z|) Σ_Z mean over D^Z of o e / p̂                (IPSCDR; DR with ê ≡ 0)
    DR      (1/|Z|) Σ_Z mean over D^Z of ê + o (e - ê) / p̂      (eq. 9)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def domain_mean(x: Tensor, domain: Tensor | None = None, weight: Tensor | None = None) -> Tensor:
    """(1/|Z|) Σ_Z of the (weighted) mean of x over domain Z's pairs; domains with no weight are skipped.

    `domain` labels the trailing dims of x (x [..., *domain.shape]); leading dims are kept, so
    x [R, n] with domain [n] gives R estimates (R observation draws at once). None = one domain."""
    w = torch.ones_like(x) if weight is None else weight.to(x.dtype)
    x, w = torch.broadcast_tensors(x, w)
    if domain is None:
        domain = torch.zeros(x.shape, dtype=torch.long, device=x.device)
    lead = x.shape[: x.dim() - domain.dim()]
    x, w, d = x.reshape(*lead, -1), w.reshape(*lead, -1), domain.reshape(-1)
    total, count = x.new_zeros(lead), x.new_zeros(lead)
    for z in torch.unique(d):
        m = d == z
        ws = w[..., m].sum(-1)
        has = ws > 0
        total = total + torch.where(has, (x[..., m] * w[..., m]).sum(-1) / ws.clamp(min=1e-12), 0.0)
        count = count + has.to(x.dtype)
    return total / count.clamp(min=1)


def naive_estimate(e: Tensor, o: Tensor, domain: Tensor | None = None) -> Tensor:
    return domain_mean(e, domain, weight=o)


def ips_estimate(e: Tensor, o: Tensor, p_hat: Tensor, domain: Tensor | None = None) -> Tensor:
    return domain_mean(o * e / p_hat, domain)


def dr_estimate(e: Tensor, e_hat: Tensor, o: Tensor, p_hat: Tensor, domain: Tensor | None = None) -> Tensor:
    """Eq. 9. With o = 0 a pair's e is never read (it may be anything, e.g. NaN-free garbage)."""
    return domain_mean(e_hat + o * (torch.where(o > 0, e, e_hat) - e_hat) / p_hat, domain)


def dr_bias(e: Tensor, e_hat: Tensor, p: Tensor, p_hat: Tensor, domain: Tensor | None = None) -> Tensor:
    """Lemma 4.1, signed: E_o[E_DR] - P. Per pair E_o[ê + o δ / p̂] = e - Δ δ, with Δ = (p̂ - p) / p̂
    and δ = e - ê (eq. 11), so E_o[E_DR] - P = -(1/|Z|) Σ_Z mean_{D^Z} Δ δ; the paper's eq. 10
    Bias = |P - E_o[E_DR]| is the absolute value of this."""
    return -domain_mean((p_hat - p) / p_hat * (e - e_hat), domain)


def dr_tail_bound(e: Tensor, e_hat: Tensor, p_hat: Tensor, domain: Tensor, eta: float) -> float:
    """Hoeffding ε with P(|E_DR - E[E_DR]| > ε) <= η (Lemma 4.2 corrected, spec §4.3):
    sqrt(log(2/η)/2 · Σ_Z Σ_{D^Z} (κ / (|Z| |D^Z|))²), κ = (e - ê) / p̂."""
    zs = torch.unique(domain)
    total = 0.0
    for z in zs:
        m = domain == z
        kappa = (e[m] - e_hat[m]) / p_hat[m]
        total += float(((kappa / (len(zs) * int(m.sum()))) ** 2).sum())
    return math.sqrt(math.log(2 / eta) / 2 * total)


def paper_tail_bound(e: Tensor, e_hat: Tensor, p_hat: Tensor, domain: Tensor, eta: float) -> float:
    """Eq. 12 as printed (too tight by √|D|; spec §4.3): logged for comparison only."""
    zs = torch.unique(domain)
    n = int(domain.numel())
    inner = sum(float((((e[domain == z] - e_hat[domain == z]) / p_hat[domain == z]) ** 2).mean()) for z in zs)
    return math.sqrt(math.log(2 / eta) / (2 * len(zs) * n**2) * inner)


def dr_variance(e: Tensor, e_hat: Tensor, p: Tensor, p_hat: Tensor, domain: Tensor) -> float:
    """Var_o(E_DR) = (1/|Z|²) Σ_Z (1/|D^Z|²) Σ p (1 - p) κ², κ = (e - ê) / p̂ (independent o's)."""
    zs = torch.unique(domain)
    total = 0.0
    for z in zs:
        m = domain == z
        kappa = (e[m] - e_hat[m]) / p_hat[m]
        total += float((p[m] * (1 - p[m]) * kappa**2).sum()) / int(m.sum()) ** 2
    return total / len(zs) ** 2


# ---------------------------------------------------------------- the training losses (Alg. 1)


def stage1_loss(e: Tensor, e_hat: Tensor, p_hat: Tensor, domain: Tensor | None, lam1: float) -> dict[str, Tensor]:
    """Eq. 13 on observed pairs: mean error + λ1 · (ê - e)² / p̂ (a mean, not the paper's sum, so
    λ1 does not scale with the batch; λ2..λ4 = 0 as in the released code)."""
    pred = domain_mean(e, domain)
    imp = domain_mean((e_hat - e) ** 2 / p_hat, domain)
    return {"pred": pred, "imputation": imp, "loss": pred + lam1 * imp}


def stage2_loss(e: Tensor, e_hat: Tensor, o: Tensor, p_hat: Tensor, domain: Tensor | None,
                estimator: str = "dr", code_compat: bool = False) -> Tensor:
    """Eq. 15 on all pairs of D: the DR (or IPS / naive) estimate of the error, minimised over θ.
    `code_compat`: the released train_sr_dr.py loss mean(ê² + o (e² - ê²)² / p̂)."""
    if code_compat:
        e_safe = torch.where(o > 0, e, e_hat)
        return (e_hat**2 + o * (e_safe**2 - e_hat**2) ** 2 / p_hat).mean()
    if estimator == "dr":
        return dr_estimate(e, e_hat, o, p_hat, domain)
    if estimator == "ips":
        return ips_estimate(torch.where(o > 0, e, torch.zeros_like(e)), o, p_hat, domain)
    if estimator == "naive":
        return naive_estimate(e, o, domain)
    raise ValueError(f"estimator {estimator!r}: expected dr, ips or naive")
