"""The synthetic world generator: determinism, schemas, counts, and the planted ground truth.

Every test reads what the generator wrote (Parquet + ground truth) and checks it against the
planted mechanism, so a generator that drops a mechanism (or breaks its wiring) fails here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xdtrain.config import ConfigError, load_config
from xdtrain.data.schemas import CANONICAL, check_batch
from xdtrain.data.synthetic import (
    DomainConfig,
    WorldConfig,
    build_world,
    generate_world,
    simulate_block,
    validate,
)
from xdtrain.data.synthetic.vocab import BRANDS, DOMAIN_WORDS, FILLERS, TOPICS

REPO = Path(__file__).resolve().parents[1]


def small_cfg(**sections) -> WorldConfig:
    """3 domains (catalogues 2-4x apart), 1,500 users in 3 blocks, several files per table."""
    cfg = WorldConfig(out="unused", seed=11, progress=False, domains=[
        DomainConfig(name="books", n_items=240, traffic=4.0),
        DomainConfig(name="movies", n_items=120, traffic=2.0),
        DomainConfig(name="games", n_items=60, traffic=1.0),
    ])
    cfg.users.n_users, cfg.users.block_size = 1500, 512
    cfg.graph.n_entities, cfg.graph.n_triplets, cfg.graph.block_triplets = 800, 6000, 2500
    cfg.output.rows_per_file, cfg.output.row_group_rows = 5000, 1000
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def read(root: Path, table: str) -> pa.Table:
    """A table in file order (the order listed in world.json)."""
    files = json.loads((root / "world.json").read_text())["files"][table]
    return pa.concat_tables([pq.read_table(root / f) for f in files])


def gen(tmp_path_factory, name: str, cfg: WorldConfig) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp(name) / "world"
    return root, generate_world(cfg, str(root), progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return gen(tmp_path_factory, "base", small_cfg())


@pytest.fixture(scope="module")
def frames(world):
    root, _ = world
    names = ["interactions", "items", "users", "triplets", "links", "gt_items", "gt_users", "gt_sequences",
             "gt_entities", "gt_popularity"]
    return {n: read(root, n).to_pandas() for n in names}


# ---------------------------------------------------------------- determinism and layout


def test_same_seed_same_bytes_and_other_seed_differs(world, tmp_path_factory):
    root, _ = world
    again, _ = gen(tmp_path_factory, "again", small_cfg())
    files = sorted(p.relative_to(root) for p in root.rglob("*.parquet"))
    assert len(files) > 10 and files == sorted(p.relative_to(again) for p in again.rglob("*.parquet"))
    for f in files:
        assert (root / f).read_bytes() == (again / f).read_bytes(), f
    truth = "ground_truth/ground_truth.json"
    assert (root / truth).read_text() == (again / truth).read_text()
    cfg = small_cfg()
    other, _ = gen(tmp_path_factory, "other", dataclasses.replace(cfg, seed=12))
    a, b = read(root, "interactions"), read(other, "interactions")
    assert a.num_rows != b.num_rows or not a.equals(b)


def test_layout_schemas_and_counts(world, frames):
    root, summary = world
    counts = summary["counts"]
    for kind in ["interactions", "items", "users", "triplets", "links"]:
        table = read(root, kind)
        check_batch(table, kind, kind)
        for field in CANONICAL[kind]:
            assert table.schema.field(field.name).type == field.type, (kind, field.name)
    assert len(frames["interactions"]) == counts["n_interactions"]
    assert len(frames["users"]) == 1500 == len(frames["gt_users"])
    assert len(frames["items"]) == 420 == counts["n_items"]
    assert len(frames["triplets"]) == 6000 and len(frames["links"]) == counts["n_links"]
    assert len(list((root / "interactions").glob("part-*.parquet"))) >= 2
    assert not list(root.rglob(".*tmp")) and not Path(str(root) + ".partial").exists()
    meta = json.loads((root / "world.json").read_text())
    assert meta["counts"] == counts and meta["config"]["out"] == str(root)


def test_items_users_and_sequences_are_consistent(frames):
    it, items, users, seqs = frames["interactions"], frames["items"], frames["users"], frames["gt_sequences"]
    assert (items.item_id.values == np.arange(len(items))).all()
    # every interaction's item belongs to the interaction's domain
    assert (items.domain.values[it.item_id.values] == it.domain.values).all()
    assert (it.label == 1).all()
    per_seq = it.groupby(["user_id", "domain"], sort=True).size()
    expect = seqs.set_index(["user_id", "domain"]).length.sort_index()
    assert per_seq.index.equals(expect.index) and (per_seq.values == expect.values).all()
    assert expect.between(5, 50).all()
    assert (users.set_index("user_id").n_interactions == it.groupby("user_id").size()).all()
    # time-ordered within each sequence, with daily granularity inside the world's days
    ts = it.timestamp.values
    same = (it.user_id.values[1:] == it.user_id.values[:-1]) & (it.domain.values[1:] == it.domain.values[:-1])
    assert (np.diff(ts)[same] >= 0).all()
    day = (ts - ts.min()) // 86400
    assert day.max() < 60


# ---------------------------------------------------------------- planted behaviour


def _pools(frames):
    gi = frames["gt_items"]
    return {key: grp.item_id.values for key, grp in gi.groupby(["domain", "cluster"])}


def test_users_pick_their_preferred_clusters_far_above_chance(frames):
    it, gi, gu = frames["interactions"], frames["gt_items"], frames["gt_users"]
    prefs = dict(zip(gu.user_id, gu.clusters))
    cluster = gi.cluster.values[it.item_id.values]
    share = np.mean([c in prefs[u] for u, c in zip(it.user_id.values, cluster)])
    chance = np.mean([len(c) for c in gu.clusters]) / 8
    assert chance < 0.3 and share > 0.9


def test_users_pick_items_matching_their_taste(frames):
    it, gi, seqs = frames["interactions"], frames["gt_items"], frames["gt_sequences"]
    G = np.stack(gi.latent.values)
    pref = {(u, d): np.asarray(p) for u, d, p in zip(seqs.user_id, seqs.domain, seqs.pref)}
    pools = _pools(frames)
    sample = it.sample(2000, random_state=0)
    pct = [(G[pools[(d, gi.cluster.values[j])]] @ pref[(u, d)] < G[j] @ pref[(u, d)]).mean()
           for u, d, j in zip(sample.user_id, sample.domain, sample.item_id)]
    assert np.mean(pct) > 0.75  # chance: 0.5


def test_domain_shift_is_the_mean_taste_offset(frames, world):
    root, _ = world
    truth = json.loads((root / "ground_truth/ground_truth.json").read_text())
    z = dict(zip(frames["gt_users"].user_id, frames["gt_users"].latent))
    seqs = frames["gt_sequences"]
    for dom in truth["domains"]:
        rows = seqs[seqs.domain == dom["name"]]
        diff = np.stack([np.asarray(p) - np.asarray(z[u]) for u, p in zip(rows.user_id, rows.pref)])
        se = 0.3 / np.sqrt(len(rows))  # user_domain_sigma / sqrt(n)
        assert np.abs(diff.mean(axis=0) - np.asarray(dom["delta"])).max() < 5 * se


def test_markov_term_makes_consecutive_items_similar():
    def percentile_of_next(beta: float) -> float:
        """Where the next item ranks, within its pool, by similarity to the previous item."""
        w = build_world(small_cfg(choice={"beta_markov": beta}))
        it = simulate_block(w, 0).interactions
        ghat = w.g / np.linalg.norm(w.g, axis=1, keepdims=True)
        u, j = it["user_id"], it["item_id"]
        dom = np.searchsorted(w.item_start, j, side="right") - 1
        pool = dom * 8 + w.item_cluster[j]
        pct = [(w.g[w.pool_items[w.pool_start[p]:w.pool_start[p + 1]]] @ ghat[a] < w.g[b] @ ghat[a]).mean()
               for a, b, p, same in zip(j[:-1], j[1:], pool[1:], u[1:] == u[:-1]) if same]
        return float(np.mean(pct))

    assert percentile_of_next(3.0) > percentile_of_next(0.0) + 0.05  # SE of each ~0.004


def test_overlap_and_sequence_lengths(frames):
    users, seqs = frames["users"], frames["gt_sequences"]
    n_dom = users.observed_domains.map(len)
    assert (n_dom[users.is_overlapping] == 2).all() and (n_dom[~users.is_overlapping] == 1).all()
    frac = users.is_overlapping.mean()
    assert abs(frac - 0.15) < 4 * np.sqrt(0.15 * 0.85 / len(users))
    assert all(h in d for h, d in zip(users.home_domain, users.observed_domains))
    share = users.home_domain.value_counts(normalize=True)
    assert share["books"] > share["movies"] > share["games"]  # traffic 4 : 2 : 1
    overlap = seqs.user_id.isin(users.user_id[users.is_overlapping])
    assert seqs.length[overlap].mean() > 1.2 * seqs.length[~overlap].mean()  # nonoverlap_len_scale 0.6


def test_per_domain_length_overrides():
    cfg = small_cfg()
    cfg.domains[2] = dataclasses.replace(cfg.domains[2], len_min=4, len_max=8, len_median=6.0)
    seqs = simulate_block(build_world(cfg), 0).sequences
    games = seqs["domain"] == 2
    assert seqs["length"][games].min() >= 4 and seqs["length"][games].max() <= 8
    assert seqs["length"][~games].max() > 8


def test_popularity_truth_follows_its_definition(frames, world):
    root, _ = world
    pop = frames["gt_popularity"]
    norm = pq.read_table(root / "ground_truth/popularity_norm.parquet").to_pandas()
    for dom, rows in pop.groupby("domain"):
        items = rows.item_id.unique()[:5]
        table = rows.pivot_table(index="day", columns="item_id", values="exposures", fill_value=0)
        table = table.reindex(range(60), fill_value=0)
        for item in items:
            e = table[item].values
            expect = np.array([e[max(0, d - 15):d].sum() for d in range(60)])  # previous 15 days only
            got = rows[rows.item_id == item].set_index("day").window_count.reindex(range(60), fill_value=0)
            assert (got.values == expect).all(), (dom, item)
        s = norm[norm.domain == dom].set_index("day").norm
        s = s.loc[rows.day].values
        expect = np.log1p(rows.window_count / np.where(s > 0, s, 1.0))
        assert np.allclose(rows.conformity, np.where(s > 0, expect, 0.0), atol=1e-5)


def _mean_conformity(root: Path) -> float:
    it, pop = read(root, "interactions").to_pandas(), read(root, "gt_popularity").to_pandas()
    it["day"] = (it.timestamp - it.timestamp.min()) // 86400
    lookup = pop.set_index(["day", "item_id"]).conformity
    vals = lookup.reindex(list(zip(it.day, it.item_id))).fillna(0.0)
    return float(vals.mean())


@pytest.mark.parametrize("exact_pool_max", [512, 0], ids=["exact-softmax", "sampled-softmax"])
def test_conformity_makes_recently_hot_items_more_picked(tmp_path_factory, exact_pool_max):
    def run(gamma: float) -> float:
        cfg = small_cfg(choice={"gamma": gamma, "exact_pool_max": exact_pool_max, "n_candidates": 16})
        root, _ = gen(tmp_path_factory, f"gamma{gamma}", cfg)
        return _mean_conformity(root)

    assert run(2.0) > 1.15 * run(0.0)  # the standard error of each mean is ~1% of it


def test_sampled_softmax_keeps_pools_and_taste(tmp_path_factory):
    root, _ = gen(tmp_path_factory, "sir", small_cfg(choice={"exact_pool_max": 0, "n_candidates": 32}))
    it, gi, gu = (read(root, t).to_pandas() for t in ["interactions", "gt_items", "gt_users"])
    assert (gi.domain.values[it.item_id.values] == it.domain.values).all()
    prefs = dict(zip(gu.user_id, gu.clusters))
    share = np.mean([c in prefs[u] for u, c in zip(it.user_id, gi.cluster.values[it.item_id.values])])
    assert share > 0.9
    assert json.loads((root / "ground_truth/ground_truth.json").read_text())["exact_softmax"] is False


def test_observation_follows_the_planted_propensity(tmp_path_factory):
    cfg = small_cfg(observation={"base_rate": 0.4, "activity_slope": 1.5})
    cfg.users.n_users = 4000
    root, _ = gen(tmp_path_factory, "mnar", cfg)
    gu, seqs = read(root, "gt_users").to_pandas(), read(root, "gt_sequences").to_pandas()
    users = read(root, "users").to_pandas()
    assert (users.observed == gu.observed).all()
    assert gu.observed[gu.is_overlapping].all() and (gu.propensity[gu.is_overlapping] == 1).all()
    solo = gu[~gu.is_overlapping]
    p, o = solo.propensity.values, solo.observed.values
    assert abs(o.mean() - p.mean()) < 4 * np.sqrt((p * (1 - p)).sum()) / len(p)
    assert 0.3 < p.mean() < 0.5 and p.min() >= 0.05
    length = seqs.groupby("user_id").length.sum().reindex(solo.user_id).values
    long = length > np.median(length)
    assert o[long].mean() > o[~long].mean() + 0.15  # MNAR: active users are observed more


# ---------------------------------------------------------------- graph, links, text


def test_entity_graph_planted_communities_and_heavy_tail(frames, world):
    trip, ent = frames["triplets"], frames["gt_entities"]
    topic = ent.set_index("entity_id").topic.sort_index().values
    intra = topic[trip["head"].values] == topic[trip["tail"].values]
    assert abs(intra.mean() - 0.8) < 4 * np.sqrt(0.8 * 0.2 / len(trip))
    assert (trip["head"] != trip["tail"]).all()
    assert (trip.relation[intra] < 4).all() and (trip.relation[~intra] >= 4).all()
    deg = np.bincount(np.concatenate([trip["head"], trip["tail"]]), minlength=len(topic))
    top = np.sort(deg)[::-1][: len(deg) // 100].sum() / deg.sum()
    assert deg.max() > 10 * np.median(deg) and top > 0.08  # a Poisson graph: ~0.03
    root, _ = world
    truth = json.loads((root / "ground_truth/ground_truth.json").read_text())["graph"]
    assert truth["intra_topic_measured"] == pytest.approx(intra.mean())


def test_items_link_to_entities_of_their_topic(frames):
    links, gi, ent = frames["links"], frames["gt_items"], frames["gt_entities"]
    topic = ent.set_index("entity_id").topic
    assert (topic.loc[links.entity_id].values == gi.topic.values[links.item_id.values]).all()
    per_item = links.groupby("item_id").size().reindex(gi.item_id, fill_value=0)
    assert per_item.between(1, 3).all()
    assert not links.duplicated(["item_id", "entity_id"]).any()
    assert (links.domain.values == gi.domain.values[links.item_id.values]).all()


def test_titles_use_words_of_the_item_topic_and_domain(frames):
    items = frames["items"]
    topic_of = {w: t for t, (_, words) in enumerate(TOPICS) for w in words}
    names = ["books", "movies", "games"]
    for text, topic, dom in zip(items.text, items.topic, items.domain):
        words = text.split()
        assert len(words) == 5 and words[0] in FILLERS
        assert len(set(words[1:4])) == 3 and all(topic_of.get(w) == topic for w in words[1:4])
        assert words[4] in DOMAIN_WORDS[names.index(dom)]


def test_brand_noise_adds_shared_tokens(tmp_path_factory):
    root, _ = gen(tmp_path_factory, "brands", small_cfg(text={"brand_tokens": 3, "n_brands": 6}))
    items, gi = read(root, "items").to_pandas(), read(root, "gt_items").to_pandas()
    brands = np.array([t.split()[-3:] for t in items.text])
    assert np.isin(brands, BRANDS[:6]).all()
    for b in BRANDS[:6]:  # each brand spans many clusters: lexically misleading
        assert gi.cluster[(brands == b).any(axis=1)].nunique() >= 6


# ---------------------------------------------------------------- chunking invariants


def test_output_does_not_depend_on_file_sizes_or_workers(world, tmp_path_factory):
    root, _ = world
    cfg = small_cfg()
    cfg.output = dataclasses.replace(cfg.output, rows_per_file=777, row_group_rows=100, workers=2)
    other, _ = gen(tmp_path_factory, "rechunked", cfg)
    for table in ["interactions", "users", "triplets", "links", "items", "gt_sequences"]:
        assert read(root, table).equals(read(other, table)), table


def test_a_block_alone_equals_its_slice_and_worlds_grow_by_prefix(frames, tmp_path_factory):
    it = frames["interactions"]
    alone = simulate_block(build_world(small_cfg()), 1).interactions
    part = it[(it.user_id >= 512) & (it.user_id < 1024)]
    assert (part.item_id.values == alone["item_id"]).all()
    assert (part.timestamp.values == alone["timestamp"]).all()
    cfg = small_cfg()
    cfg.users.n_users = 700  # ends inside block 1: the last block is simulated whole and cut
    smaller, _ = gen(tmp_path_factory, "prefix", cfg)
    small_it = read(smaller, "interactions").to_pandas()
    assert small_it.equals(it[it.user_id < 700].reset_index(drop=True))


def test_impression_negatives(tmp_path_factory):
    root, _ = gen(tmp_path_factory, "negs", small_cfg(choice={"negatives": 2}))
    it, items = read(root, "interactions").to_pandas(), read(root, "items").to_pandas()
    assert (it.label.values.reshape(-1, 3) == [1, 0, 0]).all()
    groups = it.values.reshape(-1, 3, it.shape[1])
    cols = list(it.columns)
    for c in ["user_id", "domain", "timestamp"]:
        k = cols.index(c)
        assert (groups[:, 1:, k] == groups[:, :1, k]).all()
    assert (groups[:, 1:, cols.index("item_id")] != groups[:, :1, cols.index("item_id")]).all()
    assert (items.domain.values[it.item_id.values] == it.domain.values).all()


# ---------------------------------------------------------------- errors, atomicity, entrypoints


def test_bad_configs_name_the_key(tmp_path):
    cfg = small_cfg()
    cfg.domains[1].n_items = 5
    with pytest.raises(ConfigError, match=r"domains\[1\]\.n_items"):
        validate(cfg)
    with pytest.raises(ConfigError, match="users.overlap_domains"):
        validate(small_cfg(users={"overlap_domains": 4}))
    with pytest.raises(ConfigError, match="latent.n_clusters"):
        validate(small_cfg(latent={"n_clusters": 40}))
    bad = tmp_path / "bad.yaml"
    bad.write_text("choice: {gama: 1.0}\n")
    with pytest.raises(ConfigError, match="choice.gama"):
        load_config(WorldConfig, bad, ["out=x"])


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    root = tmp_path / "w"
    root.mkdir()
    (root / "keep.txt").write_text("mine")
    cfg = small_cfg(users={"n_users": 50})
    cfg.output.overwrite = True  # overwrite replaces a world xdtrain wrote, never a folder of someone else's
    with pytest.raises(ConfigError, match=str(root)):
        generate_world(cfg, str(root), progress=False)
    assert (root / "keep.txt").read_text() == "mine"
    (root / "keep.txt").unlink()
    generate_world(cfg, str(root), progress=False)  # an empty folder is fine
    cfg.output.overwrite = False
    with pytest.raises(ConfigError, match="output.overwrite=true replaces it"):
        generate_world(cfg, str(root), progress=False)
    cfg.output.overwrite = True
    first = root.stat().st_ino
    generate_world(cfg, str(root), progress=False)
    assert root.stat().st_ino != first and (root / "world.json").exists()  # a new version swapped in


def test_memory_filesystem():
    import fsspec

    summary = generate_world(small_cfg(users={"n_users": 100}), "memory://worlds/tiny", progress=False)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/worlds/tiny/world.json") and not fs.exists("/worlds/tiny.partial")
    with fs.open(f"/worlds/tiny/{summary['files']['interactions'][0]}", "rb") as f:
        assert pq.read_table(f).num_rows == summary["counts"]["n_interactions"]


def test_job_entrypoint_and_shipped_configs(tmp_path):
    from jobs.gen_data import main

    out = tmp_path / "demo"
    assert main(["--config", str(REPO / "configs/world_demo.yaml"), f"out={out}", "users.n_users=300",
                 "progress=false"]) == 0
    assert json.loads((out / "world.json").read_text())["counts"]["n_users"] == 300
    assert (out / "metrics.json").exists()
    for name in ["world_small", "world_demo", "world_1e8"]:
        validate(load_config(WorldConfig, REPO / f"configs/{name}.yaml", ["out=x"]))
    assert main(["--config", str(REPO / "configs/world_demo.yaml")]) == 2  # out is required


@pytest.mark.slow
def test_minilm_titles_carry_topic_signal(frames):
    from xdtrain.text.encoder import load_text_encoder

    items = frames["items"]
    emb = load_text_encoder().encode(list(items.text), normalize_embeddings=True, batch_size=128)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -1)
    nn = np.argsort(-sim, axis=1)[:, :10]
    purity = (items.topic.values[nn] == items.topic.values[:, None]).mean()
    assert purity > 0.5  # chance: 1/16
