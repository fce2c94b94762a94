"""`WorldConfig`: every knob of the synthetic multi-domain world, plus validation.

The same seed and config always give the same world. Random streams are keyed by
(seed, purpose, unit) -- e.g. one stream per block of `users.block_size` users -- so a
world's data does not depend on how many rows go into a file or row group, and a larger
world contains a smaller one's users as a prefix. `users.block_size` and
`graph.block_triplets` are therefore part of a world's identity (changing them reshuffles
the random draws); the `output` knobs (file sizes, workers) are not. The last block is
simulated whole and cut, so growing `users.n_users` only appends users.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from xdtrain.config import MISSING, ConfigError

from .vocab import TOPICS


@dataclass
class DomainConfig:
    """One domain (market / platform): its own catalogue, traffic and sequence lengths."""

    name: str = MISSING
    n_items: int = MISSING
    traffic: float = 1.0  # relative: share of home users and of daily exposures
    len_median: float | None = None  # per-domain overrides of `sequences.*` (None = global)
    len_min: int | None = None
    len_max: int | None = None


def _default_domains() -> list[DomainConfig]:
    return [
        DomainConfig(name="books", n_items=400, traffic=4.0),
        DomainConfig(name="movies", n_items=200, traffic=2.0),
        DomainConfig(name="games", n_items=100, traffic=1.0),
    ]


@dataclass
class LatentConfig:
    """Shared latent space: behaviour clusters, each owning text topics; item/user vectors."""

    dim: int = 8
    n_clusters: int = 8  # behaviour/interest clusters, shared by all domains
    topics_per_cluster: int = 2  # text topics per cluster (n_topics = product)
    cluster_scale: float = 2.0  # std of cluster centres
    topic_scale: float = 0.5  # std of a topic's offset from its cluster centre
    item_sigma: float = 1.0  # item latent g_j = centre + topic offset + item_sigma * noise
    item_shift_sigma: float = 0.0  # per-domain offset of the whole item space
    user_sigma: float = 0.7  # user taste z_u = sum_c pi_uc centre_c + user_sigma * noise
    domain_shift_sigma: float = 0.5  # sigma_d: taste in domain k is z_u + delta_k, delta_k ~ N(0, sigma_d^2)
    user_domain_sigma: float = 0.3  # extra per-(user, domain) taste noise
    topic_concentration: float = 20.0  # Dirichlet alpha of each domain's topic mix (large = even)


@dataclass
class UserConfig:
    n_users: int = 2000
    block_size: int = 4096  # users simulated together with one random stream (part of the identity)
    pref_min: int = 1  # preferred clusters per user
    pref_max: int = 3
    overlap_fraction: float = 0.15  # users active in several domains
    overlap_domains: int = 2  # domains an overlapping user is active in
    nonoverlap_len_scale: float = 0.6  # non-overlapping users' median length multiplier


@dataclass
class SequenceConfig:
    len_min: int = 5
    len_max: int = 50
    len_median: float = 12.0  # lognormal length, clipped to [len_min, len_max]
    len_sigma: float = 0.5
    n_days: int = 60
    mean_gap_days: float = 1.0  # geometric gap between a user's consecutive interactions
    start_date: str = "2023-01-01"  # day 0 (UTC); timestamps are unix seconds


@dataclass
class ChoiceConfig:
    """Next-item choice: cluster by a sticky Markov chain, then item by softmax of utility.

    utility_j = beta_taste * pref_uk . g_j + beta_markov * ghat_prev . g_j
                + gamma * log(1 + c_j(previous window) / s_k(day))
    """

    beta_taste: float = 1.0
    beta_markov: float = 1.0
    gamma: float = 1.0  # conformity strength (0 switches it off)
    stickiness: float = 0.8  # P(stay in the current cluster)
    explore: float = 0.05  # on a switch, P(uniform cluster) instead of one from the user's mixture
    allow_repeat: bool = False  # immediate repeats of the previous item
    exact_pool_max: int = 512  # full softmax over the pool when every pool is at most this big
    n_candidates: int = 64  # otherwise: softmax over this many uniform draws from the pool
    negatives: int = 0  # impression negatives (label 0) per click, uniform from the domain catalogue


@dataclass
class PopularityConfig:
    """Exogenous exposure process per domain: AR(1) hotness -> Poisson daily exposures."""

    window_days: int = 15  # c_j(d) = exposures in [d - window, d - 1]
    hot_items: int = 5000  # items per domain with an exposure process (memory: n_days x sum of these)
    daily_exposures: float = 2000.0  # exposures per day for a domain of average traffic
    hot_sigma: float = 1.5  # stationary std of the log-hotness
    ar: float = 0.95  # day-to-day persistence of the hotness (1 - ar = drift speed)
    normaliser: Literal["catalogue", "nonzero"] = "catalogue"  # s_2 over the catalogue or non-zero items


@dataclass
class ObservationConfig:
    """MNAR selection of which non-overlapping users are observed (overlapping users always are)."""

    base_rate: float = 1.0  # K_u: propensity at median activity
    activity_slope: float = 0.0  # logit(p) = logit(K_u) + slope * z(log length)
    min_propensity: float = 0.05


@dataclass
class TextConfig:
    words_per_topic: int = 12  # vocabulary size of each topic (at most 16)
    topic_words: int = 3  # topic words per title
    word_temperature: float = 1.0  # how strongly an item's latent picks its words
    brand_tokens: int = 0  # brand noise: tokens from a pool shared by all clusters
    n_brands: int = 12
    vec_dim: int = 32  # ground-truth text vector x_j = A g_j + noise (0 = off)
    vec_noise: float = 0.5


@dataclass
class GraphConfig:
    n_entities: int = 2000
    n_triplets: int = 12000
    n_relations: int = 8  # first half used by intra-topic edges, second half by inter-topic edges
    intra_topic: float = 0.8  # planted share of intra-topic edges
    degree_exponent: float = 1.2  # Pareto shape of entity weights (smaller = heavier tail)
    block_triplets: int = 1 << 20  # triplets per random stream (part of the identity)
    links_min: int = 1  # entities per item (from the item's topic)
    links_max: int = 3
    feat_dim: int = 32
    feat_signal: float = 1.0  # feature = signal * topic centre + noise * N(0, 1); 0 = uninformative
    feat_noise: float = 1.0


@dataclass
class OutputConfig:
    rows_per_file: int = 10_000_000
    row_group_rows: int = 1_000_000
    compression: str = "zstd"
    overwrite: bool = False
    workers: int = 1  # processes simulating user blocks (the data does not depend on it)


@dataclass
class WorldConfig:
    out: str = MISSING  # fsspec URL of the world directory
    seed: int = 0
    progress: bool = True
    domains: list[DomainConfig] = field(default_factory=_default_domains)
    latent: LatentConfig = field(default_factory=LatentConfig)
    users: UserConfig = field(default_factory=UserConfig)
    sequences: SequenceConfig = field(default_factory=SequenceConfig)
    choice: ChoiceConfig = field(default_factory=ChoiceConfig)
    popularity: PopularityConfig = field(default_factory=PopularityConfig)
    observation: ObservationConfig = field(default_factory=ObservationConfig)
    text: TextConfig = field(default_factory=TextConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def n_topics(self) -> int:
        return self.latent.n_clusters * self.latent.topics_per_cluster


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"world config: key '{key}' {msg}")


def _prob(value: float, key: str) -> None:
    _require(0.0 <= value <= 1.0, key, f"must be in [0, 1], got {value}")


def validate(cfg: WorldConfig) -> None:
    """Raise ConfigError naming the first bad key."""
    lat, us, sq, ch, pop, ob, tx, gr, out = (
        cfg.latent, cfg.users, cfg.sequences, cfg.choice, cfg.popularity,
        cfg.observation, cfg.text, cfg.graph, cfg.output,
    )
    _require(lat.n_clusters >= 1, "latent.n_clusters", "must be >= 1")
    _require(lat.topics_per_cluster >= 1, "latent.topics_per_cluster", "must be >= 1")
    _require(cfg.n_topics <= len(TOPICS), "latent.n_clusters",
             f"n_clusters * topics_per_cluster = {cfg.n_topics} exceeds the {len(TOPICS)} built-in topics")
    _require(len(cfg.domains) >= 1, "domains", "needs at least one domain")
    names = [d.name for d in cfg.domains]
    _require(len(set(names)) == len(names), "domains", f"names must be unique, got {names}")
    for i, d in enumerate(cfg.domains):
        _require(d.n_items >= cfg.n_topics, f"domains[{i}].n_items",
                 f"must be >= n_topics ({cfg.n_topics}) so every topic has an item, got {d.n_items}")
        _require(d.traffic > 0, f"domains[{i}].traffic", f"must be > 0, got {d.traffic}")
        lo = d.len_min if d.len_min is not None else sq.len_min
        hi = d.len_max if d.len_max is not None else sq.len_max
        _require(1 <= lo <= hi, f"domains[{i}].len_min", f"needs 1 <= len_min <= len_max, got {lo}, {hi}")
    _require(lat.dim >= 1, "latent.dim", "must be >= 1")
    _require(us.n_users >= 1, "users.n_users", "must be >= 1")
    _require(us.block_size >= 1, "users.block_size", "must be >= 1")
    _require(1 <= us.pref_min <= us.pref_max <= lat.n_clusters, "users.pref_max",
             f"needs 1 <= pref_min <= pref_max <= n_clusters, got {us.pref_min}, {us.pref_max}")
    _prob(us.overlap_fraction, "users.overlap_fraction")
    _require(2 <= us.overlap_domains <= max(2, len(cfg.domains)), "users.overlap_domains",
             f"must be in [2, n_domains], got {us.overlap_domains}")
    _require(us.nonoverlap_len_scale > 0, "users.nonoverlap_len_scale", "must be > 0")
    _require(1 <= sq.len_min <= sq.len_max, "sequences.len_min", "needs 1 <= len_min <= len_max")
    _require(sq.len_median > 0 and sq.len_sigma >= 0, "sequences.len_median", "must be > 0 (sigma >= 0)")
    _require(sq.n_days >= 1, "sequences.n_days", "must be >= 1")
    _require(sq.mean_gap_days >= 0, "sequences.mean_gap_days", "must be >= 0")
    _prob(ch.stickiness, "choice.stickiness")
    _prob(ch.explore, "choice.explore")
    _require(ch.n_candidates >= 2, "choice.n_candidates", "must be >= 2")
    _require(ch.negatives >= 0, "choice.negatives", "must be >= 0")
    _require(pop.window_days >= 1, "popularity.window_days", "must be >= 1")
    _require(pop.hot_items >= 1, "popularity.hot_items", "must be >= 1")
    _require(0.0 <= pop.ar < 1.0, "popularity.ar", f"must be in [0, 1), got {pop.ar}")
    _require(pop.daily_exposures >= 0, "popularity.daily_exposures", "must be >= 0")
    _require(0.0 < ob.base_rate <= 1.0, "observation.base_rate", f"must be in (0, 1], got {ob.base_rate}")
    _prob(ob.min_propensity, "observation.min_propensity")
    _require(1 <= tx.words_per_topic <= 16, "text.words_per_topic", "must be in [1, 16]")
    _require(1 <= tx.topic_words <= tx.words_per_topic, "text.topic_words", "must be in [1, words_per_topic]")
    _require(tx.brand_tokens >= 0 and tx.n_brands >= 1, "text.brand_tokens", "must be >= 0 (n_brands >= 1)")
    _require(tx.vec_dim >= 0, "text.vec_dim", "must be >= 0")
    _require(gr.n_entities >= 2 * cfg.n_topics, "graph.n_entities",
             f"must be >= 2 * n_topics ({2 * cfg.n_topics}), got {gr.n_entities}")
    _require(gr.n_triplets >= 0, "graph.n_triplets", "must be >= 0")
    _require(gr.n_relations >= 1, "graph.n_relations", "must be >= 1")
    _prob(gr.intra_topic, "graph.intra_topic")
    _require(cfg.n_topics >= 2 or gr.intra_topic == 1.0, "graph.intra_topic",
             "must be 1.0 when there is a single topic")
    _require(gr.degree_exponent > 0, "graph.degree_exponent", "must be > 0")
    _require(gr.block_triplets >= 1, "graph.block_triplets", "must be >= 1")
    _require(1 <= gr.links_min <= gr.links_max, "graph.links_min", "needs 1 <= links_min <= links_max")
    _require(gr.feat_dim >= 1, "graph.feat_dim", "must be >= 1")
    _require(out.rows_per_file >= 1 and out.row_group_rows >= 1, "output.rows_per_file", "must be >= 1")
    _require(out.workers >= 1, "output.workers", "must be >= 1")
