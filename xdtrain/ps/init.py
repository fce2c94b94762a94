"""Counter-based row initializers: a row's initial value depends only on (seed, table, id).

Element j of the row of `id` is a splitmix64 hash of (row key, j), so any shard, any batch
composition and any restore produce the same initial row for an id, and rows are made
vectorised (no per-id RNG objects). Only integer ops and one IEEE multiply are used (no
transcendental functions, whose last bits vary across CPUs and numpy builds), so the values
are bit-identical on every machine.

* ``normal``: the sum of the four 16-bit lanes of the hash, centred and scaled (Irwin-Hall(4):
  mean 0, std `scale`, close to a normal but bounded at +-3.46 std, like a truncated normal).
* ``uniform``: 24 bits of the hash, uniform on [-scale, scale].
* ``zeros``.

Work is done in chunks of ~64k elements with in-place ops: fresh 32 MB temporaries cost more in
page faults here than the hashing itself.
"""

from __future__ import annotations

import hashlib

import numpy as np

INITIALIZERS = ("normal", "uniform", "zeros")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_LANES16 = np.uint64(0x0000FFFF0000FFFF)
_LOW32 = np.uint64(0xFFFFFFFF)
_U16, _U24, _U27, _U30, _U31, _U32, _U40 = (np.uint64(s) for s in (16, 24, 27, 30, 31, 32, 40))
_IH_MEAN = 4 * 65535 // 2  # 131070: the mean of a sum of four uniform 16-bit lanes, times 2 / 2
_IH_STD = float(np.sqrt(4 * (65536.0**2 - 1) / 12))
_CHUNK_ELEMS = 1 << 16


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 (add the golden gamma, then the finalizer) on a uint64 array, wrapping."""
    z = x + _GOLDEN
    z = (z ^ (z >> _U30)) * _M1
    z = (z ^ (z >> _U27)) * _M2
    return z ^ (z >> _U31)


def table_key(seed: int, table: str) -> int:
    """A 64-bit key for (seed, table name), stable across processes (unlike Python's hash)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{table}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _hash_chunk(key: int, ids: np.ndarray, dim: int) -> np.ndarray:
    """(n, dim) uint64: splitmix64 of (row key, element counter), computed in place."""
    row = mix64(ids.astype(np.int64, copy=False).view(np.uint64) ^ np.uint64(key))
    z = row[:, None] + np.arange(1, dim + 1, dtype=np.uint64)[None, :] * _GOLDEN
    t = np.empty_like(z)
    for shift, mul in ((_U30, _M1), (_U27, _M2)):
        np.right_shift(z, shift, out=t)
        z ^= t
        z *= mul
    np.right_shift(z, _U31, out=t)
    z ^= t
    return z


def _fill_chunk(kind: str, scale: float, key: int, ids: np.ndarray, out: np.ndarray) -> None:
    z = _hash_chunk(key, ids, out.shape[1])
    zi = z.view(np.int64)
    if kind == "normal":
        t = np.right_shift(z, _U16)
        t &= _LANES16
        z &= _LANES16
        z += t  # two 32-bit lanes, each the sum of two 16-bit lanes
        np.right_shift(z, _U32, out=t)
        z &= _LOW32
        z += t  # the sum of all four lanes
        zi -= _IH_MEAN
        np.multiply(zi, scale / _IH_STD, out=out, casting="unsafe")
    else:
        z >>= _U40  # 24 bits
        np.multiply(zi, 2.0 * scale / (1 << 24), out=out, casting="unsafe")
        out -= np.float32(scale)


def init_rows(kind: str, scale: float, key: int, ids: np.ndarray, dim: int, dtype: np.dtype) -> np.ndarray:
    """Initial rows for `ids` as an (n, dim) array of `dtype`; identical for an id wherever it is made."""
    if kind not in INITIALIZERS:
        raise ValueError(f"unknown initializer {kind!r}; expected one of {INITIALIZERS}")
    out = np.zeros((len(ids), dim), dtype=dtype)
    if kind == "zeros" or len(ids) == 0:
        return out
    step = max(1, _CHUNK_ELEMS // dim)
    buf = out if out.dtype == np.float32 else np.empty((min(step, len(ids)), dim), dtype=np.float32)
    for start in range(0, len(ids), step):
        stop = min(start + step, len(ids))
        if buf is out:
            _fill_chunk(kind, float(scale), key, ids[start:stop], out[start:stop])
        else:
            _fill_chunk(kind, float(scale), key, ids[start:stop], buf[: stop - start])
            out[start:stop] = buf[: stop - start]
    return out
