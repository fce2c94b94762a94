"""Synchronous row pushes: the workers' row gradients summed by id, each row pushed once."""

from __future__ import annotations

import numpy as np
import torch

from xdtrain.nn.sparse import Rows, row_grads
from xdtrain.ps import LocalPS, OptimizerSpec, TableSpec
from xdtrain.train.row_reduce import all_reduce_row_grads, share, sum_row_grads


def f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def test_rows_are_summed_by_id_over_the_workers():
    a = {"item": (np.array([1, 5]), f32([[1, 2], [3, 4]]))}
    b = {"item": (np.array([5, 9]), f32([[10, 20], [30, 40]])), "user": (np.array([7]), f32([[1, 1]]))}
    got = sum_row_grads([a, b])
    np.testing.assert_array_equal(got["item"][0], [1, 5, 9])
    np.testing.assert_array_equal(got["item"][1], [[1, 2], [13, 24], [30, 40]])
    np.testing.assert_array_equal(got["user"][0], [7])
    assert sum_row_grads([{}, {}]) == {}


def test_rows_whose_gradients_cancel_are_not_pushed():
    a = {"item": (np.array([1, 2]), f32([[1, -1], [2, 2]]))}
    b = {"item": (np.array([1]), f32([[-1, 1]]))}
    got = sum_row_grads([a, b])
    np.testing.assert_array_equal(got["item"][0], [2])


def test_each_summed_row_is_pushed_by_exactly_one_worker():
    grads = {"item": (np.arange(7), np.arange(14, dtype=np.float32).reshape(7, 2))}
    parts = [share(grads, r, 3) for r in range(3)]
    ids = np.concatenate([p["item"][0] for p in parts])
    assert sorted(ids.tolist()) == list(range(7))
    assert all(len(p["item"][0]) in (2, 3) for p in parts)


def test_one_worker_is_the_identity():
    a = {"item": (np.array([3, 4]), f32([[1, 2], [3, 4]]))}
    got = all_reduce_row_grads(a, 1)
    np.testing.assert_array_equal(got["item"][1], a["item"][1])


def test_summed_rows_take_one_adam_step_as_a_single_process_does():
    """Two workers' halves of a batch, summed and pushed once at 1/2, step a row exactly as one
    process pushing the mean gradient; pushed separately they take two Adam steps."""
    spec = TableSpec("item", 2, init="zeros", optimizer=OptimizerSpec("adam", lr=0.1))

    def table_after(pushes: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        ps = LocalPS(1)
        ps.create_table(spec)
        for ids, g in pushes:
            ps.push("item", ids, g)
        return ps.pull("item", np.array([1, 2])).numpy()

    w = [torch.zeros(2, 2, requires_grad=True) for _ in range(2)]
    (w[0][0] * torch.tensor([1.0, 2.0])).sum().backward()  # worker 0 reaches row 1 only
    (w[1] * torch.tensor([[3.0, 4.0], [5.0, 6.0]])).sum().backward()
    parts = [row_grads({"item": Rows(np.array([1, 2]), x)}) for x in w]
    assert parts[0]["item"][0].tolist() == [1]  # row 2 had a zero gradient on worker 0
    summed = sum_row_grads(parts)
    one = table_after([(summed["item"][0], summed["item"][1] * 0.5)])
    mean = table_after([(np.array([1, 2]), f32([[2, 3], [2.5, 3]]))])
    np.testing.assert_allclose(one, mean, rtol=1e-6)
    apart = table_after([(i, g * 0.5) for i, g in (p["item"] for p in parts)])
    assert np.abs(apart[0] - one[0]).max() > 0.05  # row 1: two steps, not one
