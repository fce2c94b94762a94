"""Item titles from latent topics, so a sentence encoder picks up real topic signal.

title = filler + `topic_words` words of the item's topic + one word of its domain
        (+ `brand_tokens` brand words from a pool shared by every cluster: lexical noise)

Which topic words an item gets depends on its latent: word w of topic t has a direction
v_w, and words are drawn without replacement with weights exp(temperature * r_j . v_w),
r_j = the item's offset from its topic centre. Titles thus carry within-topic signal too.
The ground truth also holds x_j = A g_j + noise (PreRec's text stand-in, A shared by domains).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .latents import S_TEXT, World, stream
from .vocab import BRANDS, DOMAIN_WORDS, FILLERS, TOPICS


def topic_vocab(world: World) -> list[list[str]]:
    """The words each topic may use."""
    return [list(TOPICS[t][1][: world.cfg.text.words_per_topic]) for t in range(world.cfg.n_topics)]


def domain_vocab(k: int) -> list[str]:
    return list(DOMAIN_WORDS[k % len(DOMAIN_WORDS)])


def _word_directions(world: World) -> np.ndarray:
    r = stream(world.cfg, S_TEXT)
    return r.standard_normal((world.cfg.n_topics, world.cfg.text.words_per_topic, world.cfg.latent.dim))


def text_matrix(world: World) -> np.ndarray:
    """A [vec_dim, L]: the planted map from item latents to text vectors, x_j = A g_j + noise."""
    r = stream(world.cfg, S_TEXT, 1 << 20)
    return r.standard_normal((world.cfg.text.vec_dim, world.cfg.latent.dim)) / np.sqrt(world.cfg.latent.dim)


def item_text(world: World, domain: int, lo: int, hi: int) -> tuple[pa.Array, np.ndarray | None]:
    """Titles (and x_j vectors, or None) of global items [lo, hi), all in `domain`."""
    tx, W = world.cfg.text, world.cfg.text.words_per_topic
    r = stream(world.cfg, S_TEXT, domain, lo)
    n = hi - lo
    topic = world.item_topic[lo:hi].astype(np.int64)
    resid = world.g[lo:hi] - world.cluster_centres[world.topic_cluster[topic]] - world.topic_offsets[topic]
    resid -= world.item_shift[domain]
    scores = tx.word_temperature * np.einsum("nwl,nl->nw", _word_directions(world)[topic], resid)
    scores += r.gumbel(size=(n, W))
    chosen = np.argsort(-scores, axis=1)[:, : tx.topic_words]  # Gumbel top-k = sampling without replacement

    flat_vocab = pa.array([w for words in topic_vocab(world) for w in words])
    cols = [pa.array(np.array(FILLERS)[r.integers(0, len(FILLERS), n)])]
    cols += [flat_vocab.take(pa.array(topic * W + chosen[:, i])) for i in range(tx.topic_words)]
    cols.append(pa.array(np.array(domain_vocab(domain))[r.integers(0, 3, n)]))
    brands = np.array(BRANDS[: tx.n_brands] if tx.n_brands <= len(BRANDS) else
                      [f"{BRANDS[i % len(BRANDS)]}{i // len(BRANDS)}" for i in range(tx.n_brands)])
    cols += [pa.array(brands[r.integers(0, len(brands), n)]) for _ in range(tx.brand_tokens)]
    titles = pc.binary_join_element_wise(*cols, " ")

    vec = None
    if tx.vec_dim:
        vec = world.g[lo:hi] @ text_matrix(world).T + tx.vec_noise * r.standard_normal((n, tx.vec_dim))
        vec = vec.astype(np.float32)
    return titles, vec
