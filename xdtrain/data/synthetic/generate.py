"""`generate_world`: write a whole synthetic world (data + planted ground truth) to a URL.

Layout under the output URL (built in a hidden staging folder beside `<out>`, swapped in at the
end, with `world.json` written last):

  interactions/  user_id, item_id, domain, timestamp, label   (CANONICAL + label)
  items/         item_id, domain, text, topic
  users/         user_id, home_domain, is_overlapping, observed_domains, observed, n_interactions
  entities/      entity_id, name, feat
  triplets/      head, relation, tail                          (CANONICAL)
  links/         item_id, entity_id, domain                    (CANONICAL)
  ground_truth/  items/ users/ sequences/ entities/ popularity/ popularity_norm.parquet, ground_truth.json
  world.json     config, counts, files
"""

from __future__ import annotations

import time
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from xdtrain.config import to_dict
from xdtrain.data.schemas import CANONICAL
from xdtrain.outputs import StagedDir, write_json_atomic

from .config import WorldConfig, validate
from .graph import Entities, build_entities, entity_block, link_block, triplet_block
from .interactions import iter_blocks
from .latents import World, build_world
from .text import domain_vocab, item_text, topic_vocab
from .vocab import TOPICS
from .writer import ParquetSink, write_small_table

ITEM_BLOCK = 1 << 16  # items per text/link random stream (part of the world's identity)
ENTITY_BLOCK = 1 << 18


def _fsl(x: np.ndarray) -> pa.Array:
    """[n, d] float array -> fixed_size_list<float32>[d]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])


def _fsl_type(d: int) -> pa.DataType:
    return pa.list_(pa.float32(), d)


def _strings(codes: np.ndarray, names: list[str]) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(names)).cast(pa.string())


def _list(values: pa.Array, counts: np.ndarray) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def schemas(cfg: WorldConfig) -> dict[str, pa.Schema]:
    L = cfg.latent.dim
    gt_items = [("item_id", pa.int64()), ("domain", pa.string()), ("cluster", pa.int32()),
                ("topic", pa.int32()), ("latent", _fsl_type(L)), ("hot", pa.bool_())]
    if cfg.text.vec_dim:
        gt_items.append(("text_vec", _fsl_type(cfg.text.vec_dim)))
    return {
        "interactions": CANONICAL["interactions"].append(pa.field("label", pa.int8())),
        "items": CANONICAL["items"].append(pa.field("topic", pa.int32())),
        "users": pa.schema(list(CANONICAL["users"]) + [
            ("home_domain", pa.string()), ("is_overlapping", pa.bool_()),
            ("observed_domains", pa.list_(pa.string())), ("observed", pa.bool_()),
            ("n_interactions", pa.int64())]),
        "entities": pa.schema([("entity_id", pa.int64()), ("name", pa.string()),
                               ("feat", _fsl_type(cfg.graph.feat_dim))]),
        "triplets": CANONICAL["triplets"],
        "links": CANONICAL["links"],
        "gt_items": pa.schema(gt_items),
        "gt_users": pa.schema([("user_id", pa.int64()), ("clusters", pa.list_(pa.int32())),
                               ("cluster_weights", pa.list_(pa.float32())), ("latent", _fsl_type(L)),
                               ("propensity", pa.float64()), ("observed", pa.bool_()),
                               ("is_overlapping", pa.bool_())]),
        "gt_sequences": pa.schema([("user_id", pa.int64()), ("domain", pa.string()), ("length", pa.int32()),
                                   ("start_day", pa.int32()), ("end_day", pa.int32()),
                                   ("pref", _fsl_type(L))]),
        "gt_entities": pa.schema([("entity_id", pa.int64()), ("topic", pa.int32()),
                                  ("weight", pa.float64())]),
        "gt_popularity": pa.schema([("domain", pa.string()), ("day", pa.int32()), ("item_id", pa.int64()),
                                    ("exposures", pa.int32()), ("window_count", pa.int32()),
                                    ("conformity", pa.float32())]),
    }


class _Out:
    """Sinks under the staging directory, all with the same file/row-group settings."""

    def __init__(self, fs, root: str, cfg: WorldConfig):
        self.fs, self.root, self.cfg, self.schemas = fs, root, cfg, schemas(cfg)

    def sink(self, table: str, rel: str) -> ParquetSink:
        o = self.cfg.output
        return ParquetSink(self.fs, f"{self.root}/{rel}", self.schemas[table], o.rows_per_file,
                           o.row_group_rows, o.compression)


def _bar(progress: bool, total: int, desc: str, unit: str):
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not progress, mininterval=1.0)


def _write_items(world: World, out: _Out, progress: bool) -> dict[str, list[str]]:
    names, L = world.domain_names, world.cfg.latent.dim
    items, gt = out.sink("items", "items"), out.sink("gt_items", "ground_truth/items")
    with _bar(progress, world.n_items, "items", "item") as bar:
        for k in range(len(names)):
            for lo in range(int(world.item_start[k]), int(world.item_start[k + 1]), ITEM_BLOCK):
                hi = min(lo + ITEM_BLOCK, int(world.item_start[k + 1]))
                titles, vec = item_text(world, k, lo, hi)
                ids, dom = np.arange(lo, hi, dtype=np.int64), _strings(np.full(hi - lo, k), names)
                topic = world.item_topic[lo:hi].astype(np.int32)
                items.write(dict(item_id=ids, domain=dom, text=titles, topic=topic))
                cols = dict(item_id=ids, domain=dom, cluster=world.item_cluster[lo:hi].astype(np.int32),
                            topic=topic, latent=_fsl(world.g[lo:hi].reshape(-1, L)),
                            hot=world.hot[lo:hi])
                if vec is not None:
                    cols["text_vec"] = _fsl(vec)
                gt.write(cols)
                bar.update(hi - lo)
    return {"items": items.close(), "gt_items": gt.close()}


def _write_graph(world: World, ent: Entities, out: _Out, progress: bool) -> tuple[dict, dict]:
    gr = world.cfg.graph
    ents, gt = out.sink("entities", "entities"), out.sink("gt_entities", "ground_truth/entities")
    for lo in range(0, gr.n_entities, ENTITY_BLOCK):
        b = entity_block(world, ent, lo, min(lo + ENTITY_BLOCK, gr.n_entities))
        ents.write(dict(entity_id=b["entity_id"], name=b["name"], feat=_fsl(b["feat"])))
        gt.write(dict(entity_id=b["entity_id"], topic=b["topic"].astype(np.int32), weight=b["weight"]))
    trip = out.sink("triplets", "triplets")
    n_intra = 0
    with _bar(progress, gr.n_triplets, "triplets", "edge") as bar:
        for block in range(-(-gr.n_triplets // gr.block_triplets)):
            t = triplet_block(world, ent, block)
            n_intra += int((ent.topic[ent.inverse[t["head"]]] == ent.topic[ent.inverse[t["tail"]]]).sum())
            trip.write(t)
            bar.update(len(t["head"]))
    links = out.sink("links", "links")
    n_links = 0
    for k in range(len(world.domain_names)):
        for lo in range(int(world.item_start[k]), int(world.item_start[k + 1]), ITEM_BLOCK):
            lb = link_block(world, ent, k, lo, min(lo + ITEM_BLOCK, int(world.item_start[k + 1])))
            lb["domain"] = _strings(np.full(len(lb["item_id"]), k), world.domain_names)
            links.write(lb)
            n_links += len(lb["item_id"])
    files = {"entities": ents.close(), "gt_entities": gt.close(), "triplets": trip.close(),
             "links": links.close()}
    stats = {"n_triplets": gr.n_triplets, "n_links": n_links,
             "intra_topic_measured": n_intra / max(gr.n_triplets, 1)}
    return files, stats


def _write_users(world: World, out: _Out, progress: bool) -> tuple[dict, dict]:
    names, L = world.domain_names, world.cfg.latent.dim
    sinks = {name: out.sink(name, rel) for name, rel in [
        ("interactions", "interactions"), ("users", "users"), ("gt_users", "ground_truth/users"),
        ("gt_sequences", "ground_truth/sequences")]}
    n_inter = n_clicks = n_seq = 0
    with _bar(progress, world.cfg.users.n_users, "users", "user") as bar:
        for b in iter_blocks(world, world.cfg.output.workers):
            it, us, sq = b.interactions, b.users, b.sequences
            sinks["interactions"].write(dict(user_id=it["user_id"], item_id=it["item_id"],
                                             domain=_strings(it["domain"], names), timestamp=it["timestamp"],
                                             label=it["label"]))
            _, dcode = np.nonzero(us["active"])
            sinks["users"].write(dict(
                user_id=us["user_id"], home_domain=_strings(us["home_domain"], names),
                is_overlapping=us["is_overlapping"], observed=us["observed"],
                n_interactions=us["n_interactions"],
                observed_domains=_list(_strings(dcode, names), us["active"].sum(axis=1))))
            pref_u, pref_c = np.nonzero(us["pi"] > 0)
            n_pref = (us["pi"] > 0).sum(axis=1)
            sinks["gt_users"].write(dict(
                user_id=us["user_id"], latent=_fsl(us["z"]), propensity=us["propensity"],
                observed=us["observed"], is_overlapping=us["is_overlapping"],
                clusters=_list(pa.array(pref_c, pa.int32()), n_pref),
                cluster_weights=_list(pa.array(us["pi"][pref_u, pref_c], pa.float32()), n_pref)))
            sinks["gt_sequences"].write(dict(
                user_id=sq["user_id"], domain=_strings(sq["domain"], names),
                length=sq["length"].astype(np.int32), start_day=sq["start_day"].astype(np.int32),
                end_day=sq["end_day"].astype(np.int32), pref=_fsl(sq["pref"].reshape(-1, L))))
            n_inter += len(it["user_id"])
            n_clicks += int(it["label"].sum())
            n_seq += len(sq["user_id"])
            bar.update(len(us["user_id"]))
            bar.set_postfix(rows=n_inter, refresh=False)
    files = {name: s.close() for name, s in sinks.items()}
    return files, {"n_interactions": n_inter, "n_clicks": n_clicks, "n_sequences": n_seq}


def _write_popularity(world: World, out: _Out) -> dict:
    names, D = world.domain_names, world.cfg.sequences.n_days
    sink = out.sink("gt_popularity", "ground_truth/popularity")
    slot_domain = np.searchsorted(world.item_start, world.hot_items, side="right") - 1
    for d in range(D):
        keep = (world.exposures[d] > 0) | (world.window[d] > 0)
        sink.write(dict(domain=_strings(slot_domain[keep], names), day=np.full(int(keep.sum()), d, np.int32),
                        item_id=world.hot_items[keep], exposures=world.exposures[d, keep],
                        window_count=world.window[d, keep].astype(np.int32),
                        conformity=world.logpop[d, keep]))
    path = f"{out.root}/ground_truth/popularity_norm.parquet"
    K = len(names)
    write_small_table(out.fs, path, dict(domain=_strings(np.tile(np.arange(K), D), names),
                                   day=np.repeat(np.arange(D, dtype=np.int32), K), norm=world.norm.ravel()),
                pa.schema([("domain", pa.string()), ("day", pa.int32()), ("norm", pa.float64())]))
    return {"gt_popularity": sink.close(), "gt_popularity_norm": [path]}


def _truth_scalars(world: World, graph_stats: dict) -> dict[str, Any]:
    cfg = world.cfg
    ch, pop = cfg.choice, cfg.popularity
    return {
        "seed": cfg.seed,
        "choice_model": ("cluster_t: stay w.p. stickiness, else uniform w.p. explore, else ~ pi_u; "
                         "item_t ~ softmax over (domain, cluster_t) items of beta_taste * pref_uk . g_j "
                         "+ beta_markov * ghat_prev . g_j + gamma * log(1 + window_j(day) / norm_k(day))"),
        "beta_taste": ch.beta_taste, "beta_markov": ch.beta_markov, "conformity_gamma": ch.gamma,
        "stickiness": ch.stickiness, "explore": ch.explore, "allow_repeat": ch.allow_repeat,
        "exact_softmax": bool(np.diff(world.pool_start).max() <= ch.exact_pool_max),
        "n_candidates": ch.n_candidates,  # sampled softmax over uniform pool draws when not exact
        "window_days": pop.window_days, "normaliser": pop.normaliser, "hot_items_per_domain": pop.hot_items,
        "domain_shift_sigma": cfg.latent.domain_shift_sigma,
        "domains": [{"name": n, "delta": world.delta[k], "item_shift": world.item_shift[k],
                     "traffic_share": world.traffic_share[k], "n_items": int(np.diff(world.item_start)[k]),
                     "item_id_range": [int(world.item_start[k]), int(world.item_start[k + 1])],
                     "topic_mix": world.topic_mix[k], "words": domain_vocab(k)}
                    for k, n in enumerate(world.domain_names)],
        "cluster_centres": world.cluster_centres, "topic_offsets": world.topic_offsets,
        "topic_cluster": world.topic_cluster, "topic_names": [TOPICS[t][0] for t in range(cfg.n_topics)],
        "topic_words": topic_vocab(world),
        "overlap_fraction": cfg.users.overlap_fraction,
        "observation": {"base_rate": cfg.observation.base_rate,
                        "activity_slope": cfg.observation.activity_slope,
                        "min_propensity": cfg.observation.min_propensity,
                        "rule": "overlapping users p = 1; others p = clip(sigmoid(logit(base_rate) + "
                                "slope * z), min, 1), z = the N(0,1) draw of the user's log length"},
        "graph": {"intra_topic_planted": cfg.graph.intra_topic, "n_relations": cfg.graph.n_relations,
                  "intra_relations": [0, max(1, cfg.graph.n_relations // 2)],
                  "degree_exponent": cfg.graph.degree_exponent, **graph_stats},
    }


def generate_world(cfg: WorldConfig, out_url: str, progress: bool = True) -> dict:
    """Generate the world described by `cfg` under `out_url`; returns counts, paths and timings.

    The world is built in a hidden staging folder beside `out_url` and swapped in at the end. An
    existing world is replaced only with `output.overwrite=true` and only if xdtrain wrote it; a
    folder of someone else's is refused before any work, whatever the flag.
    """
    validate(cfg)
    fs, _ = fsspec.core.url_to_fs(out_url)
    with StagedDir(out_url, "out", replace=cfg.output.overwrite, replace_key="output.overwrite") as staged:
        stage = staged.path
        out, timings, t0 = _Out(fs, stage, cfg), {}, time.time()

        def lap(name: str) -> None:
            nonlocal t0
            timings[name] = round(time.time() - t0, 3)
            t0 = time.time()

        world = build_world(cfg)
        ent = build_entities(world)
        lap("build_world")
        files = _write_items(world, out, progress)
        lap("items")
        graph_files, graph_stats = _write_graph(world, ent, out, progress)
        files.update(graph_files)
        lap("graph")
        user_files, user_stats = _write_users(world, out, progress)
        files.update(user_files)
        lap("users")
        files.update(_write_popularity(world, out))
        write_json_atomic(f"{stage}/ground_truth/ground_truth.json", _truth_scalars(world, graph_stats), fs)
        lap("ground_truth")

        counts = {"n_users": cfg.users.n_users, "n_items": world.n_items, "n_entities": cfg.graph.n_entities,
                  **user_stats, **graph_stats}
        rel = {k: [p[len(stage) + 1:] for p in v] for k, v in files.items()}
        config = dict(to_dict(cfg), out=out_url)
        write_json_atomic(f"{stage}/world.json", {"generator": "xdtrain.data.synthetic", "version": 1,
                                                  "config": config, "counts": counts, "files": rel}, fs)
    root = staged.out
    lap("publish")
    size = sum(fs.du(f"{root}/{d}") for d in ("interactions", "triplets"))
    return {"out": out_url, "counts": counts, "files": rel, "timings_s": timings,
            "bytes_interactions_triplets": int(size)}


def run_gen_data(cfg: WorldConfig) -> dict:
    """Job entrypoint (`xdtrain gen-data` / `python -m jobs.gen_data`)."""
    summary = generate_world(cfg, cfg.out, progress=cfg.progress)
    summary = {k: v for k, v in summary.items() if k != "files"}
    if "://" not in cfg.out or cfg.out.startswith("file://"):
        summary["run_dir"] = cfg.out.removeprefix("file://")
    return summary
