"""Entity graph: a degree-corrected stochastic block model whose blocks are the text topics.

Entity e has a topic (planted community) and a Pareto weight w_e (heavy-tailed degrees).
A triplet's head is drawn with P proportional to w; with P = intra_topic its tail comes
from the head's topic, otherwise from another topic (topic chosen by total weight), in both
cases proportional to w within the topic. Relations: intra-topic edges use the first half
of the relation ids, inter-topic edges the second half. Entity ids are a random
permutation, so id order says nothing about topics. Items link to 1-3 entities of their topic.
Memory: ~24 bytes per entity; triplets and links are produced in blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .latents import S_ENTITIES, S_FEATS, S_LINKS, S_TRIPLETS, World, stream
from .text import topic_vocab


@dataclass
class Entities:
    topic: np.ndarray  # [E] topic of internal index i (topics are contiguous ranges of i)
    weight: np.ndarray  # [E] Pareto weight
    cumw: np.ndarray  # [E + 1] cumulative weight over internal indices
    topic_start: np.ndarray  # [Z + 1]
    ids: np.ndarray  # [E] entity id of internal index i (a permutation)
    inverse: np.ndarray  # [E] internal index of entity id
    feat_centres: np.ndarray  # [Z, feat_dim]

    def topic_mass(self) -> np.ndarray:
        return self.cumw[self.topic_start[1:]] - self.cumw[self.topic_start[:-1]]


def build_entities(world: World) -> Entities:
    gr, Z = world.cfg.graph, world.cfg.n_topics
    r = stream(world.cfg, S_ENTITIES)
    sizes = np.full(Z, gr.n_entities // Z)
    sizes[: gr.n_entities % Z] += 1
    topic_start = np.concatenate([[0], np.cumsum(sizes)])
    weight = (1.0 - r.random(gr.n_entities)) ** (-1.0 / gr.degree_exponent)  # Pareto(a), w >= 1
    ids = r.permutation(gr.n_entities).astype(np.int64)
    inverse = np.empty_like(ids)
    inverse[ids] = np.arange(gr.n_entities)
    return Entities(topic=np.repeat(np.arange(Z, dtype=np.int16), sizes), weight=weight,
                    cumw=np.concatenate([[0.0], np.cumsum(weight)]), topic_start=topic_start, ids=ids,
                    inverse=inverse, feat_centres=r.standard_normal((Z, gr.feat_dim)))


def _search(cumw: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Index i with cumw[i] <= v < cumw[i + 1]; sorting the queries first makes it cache-friendly."""
    order = np.argsort(v, kind="stable")
    out = np.empty(len(v), dtype=np.int64)
    out[order] = np.searchsorted(cumw, v[order], side="right") - 1
    return out


def _draw_in_topics(ent: Entities, rng, topics: np.ndarray) -> np.ndarray:
    """One internal entity index per row, proportional to weight within `topics[row]`."""
    lo, hi = ent.topic_start[topics], ent.topic_start[topics + 1]
    v = ent.cumw[lo] + rng.random(len(topics)) * (ent.cumw[hi] - ent.cumw[lo])
    return np.clip(_search(ent.cumw, v), lo, hi - 1)


def triplet_block(world: World, ent: Entities, block: int) -> dict[str, np.ndarray]:
    gr = world.cfg.graph
    n = int(min(gr.block_triplets, gr.n_triplets - block * gr.block_triplets))
    r = stream(world.cfg, S_TRIPLETS, block)
    head = np.clip(_search(ent.cumw, r.random(n) * ent.cumw[-1]), 0, len(ent.ids) - 1)
    h_topic = ent.topic[head].astype(np.int64)
    intra = r.random(n) < gr.intra_topic
    t_topic = h_topic.copy()
    cum_topic = np.cumsum(ent.topic_mass())
    todo = ~intra
    while todo.any():  # another topic, by total weight (rejection of the head's own topic)
        draw = np.searchsorted(cum_topic, r.random(int(todo.sum())) * cum_topic[-1], side="right")
        t_topic[todo] = np.minimum(draw, len(cum_topic) - 1)
        todo &= t_topic == h_topic
    tail = _draw_in_topics(ent, r, t_topic)
    loop = tail == head  # no self-loops: move to the next entity of the same topic
    lo, size = ent.topic_start[t_topic[loop]], np.diff(ent.topic_start)[t_topic[loop]]
    tail[loop] = lo + (tail[loop] - lo + 1) % size
    n_intra_rel = max(1, gr.n_relations // 2)
    rel = np.where(intra, r.integers(0, n_intra_rel, n),
                   n_intra_rel + r.integers(0, max(1, gr.n_relations - n_intra_rel), n))
    rel = np.minimum(rel, gr.n_relations - 1).astype(np.int32)
    return dict(head=ent.ids[head], relation=rel, tail=ent.ids[tail])


def entity_block(world: World, ent: Entities, lo: int, hi: int) -> dict:
    """Entity ids [lo, hi): names from topic words and noisy topic-centred features."""
    gr = world.cfg.graph
    r = stream(world.cfg, S_FEATS, lo)
    eid = np.arange(lo, hi, dtype=np.int64)
    topic = ent.topic[ent.inverse[eid]].astype(np.int64)
    vocab = topic_vocab(world)
    W = len(vocab[0])
    words = pa.array([w for ws in vocab for w in ws])
    pick = r.integers(0, W, (hi - lo, 2))
    names = pc.binary_join_element_wise(words.take(pa.array(topic * W + pick[:, 0])),
                                        words.take(pa.array(topic * W + pick[:, 1])),
                                        pc.cast(pa.array(eid), pa.string()), " ")
    noise = r.standard_normal((hi - lo, gr.feat_dim))
    feat = gr.feat_signal * ent.feat_centres[topic] + gr.feat_noise * noise
    return dict(entity_id=eid, name=names, feat=feat.astype(np.float32), topic=topic,
                weight=ent.weight[ent.inverse[eid]])


def link_block(world: World, ent: Entities, domain: int, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Links of global items [lo, hi): 1-3 distinct entities of the item's topic, by weight."""
    gr = world.cfg.graph
    r = stream(world.cfg, S_LINKS, domain, lo)
    n = hi - lo
    count = r.integers(gr.links_min, gr.links_max + 1, n)
    topic = np.repeat(world.item_topic[lo:hi].astype(np.int64), gr.links_max)
    drawn = _draw_in_topics(ent, r, topic).reshape(n, gr.links_max)
    keep = np.arange(gr.links_max)[None, :] < count[:, None]
    item = np.broadcast_to(np.arange(lo, hi)[:, None], drawn.shape)[keep]
    key = np.unique(item * len(ent.ids) + drawn[keep])  # drop repeated (item, entity) pairs
    item, internal = key // len(ent.ids), key % len(ent.ids)
    return dict(item_id=item, entity_id=ent.ids[internal])
