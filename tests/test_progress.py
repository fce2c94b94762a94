"""The progress board survives a restart of its actor: attempts go on counting, and the driver's
watcher reads the new board from its first record. The bar shows a model's phase and named
losses, and curves.jsonl keeps every record as it came."""

from __future__ import annotations

import json
import time

import pytest
import ray

from xdtrain.train.progress import ProgressBoard, ProgressWatcher, bar_postfix, wait_for_step

pytestmark = pytest.mark.ray


def _train(step: int, attempt: int) -> dict:
    return {"kind": "train", "step": step, "epoch": 0, "loss": 1.0, "samples_per_s": 1.0,
            "ps_rows_per_s": 0.0, "workers": 1, "attempt": attempt}


def test_board_restart_keeps_attempts_and_the_watcher_rereads_it(ray_cluster, tmp_path):
    board = ProgressBoard.options(max_restarts=-1, max_task_retries=-1).remote(str(tmp_path / "attempts.json"))
    watcher = ProgressWatcher(board, tmp_path, show=False)
    assert ray.get([board.new_attempt.remote(1), board.new_attempt.remote(1)]) == [0, 1]
    ray.get([board.add.remote(_train(s, 1)) for s in (1, 2, 3)])
    watcher.poll()
    old = ray.get(board.since.remote(0))[3]
    ray.kill(board, no_restart=False)  # the actor's process dies; Ray starts it again
    # ray.kill returns before the process is gone: calls made right after it could still run on
    # the old board, so wait until the restarted one answers.
    deadline = time.time() + 30
    while ray.get(board.since.remote(0))[3] == old:
        assert time.time() < deadline, "the board was not restarted within 30 s"
        time.sleep(0.1)
    assert ray.get(board.new_attempt.remote(1)) == 2  # not 0: the count was kept in the run dir
    ray.get(board.add.remote(_train(4, 2)))
    watcher.poll()  # the new board has 1 record, fewer than the 3 already seen: still read
    steps = [json.loads(line)["step"] for line in (tmp_path / "curves.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert wait_for_step(board, 4, timeout_s=10)["attempt"] == 2
    assert ray.get(board.since.remote(0))[2] == 3


def test_bar_shows_phase_and_named_losses_and_curves_keep_them(ray_cluster, tmp_path):
    board = ProgressBoard.remote()
    watcher = ProgressWatcher(board, tmp_path, show=False)
    plain = _train(10, 0)
    named = {**_train(20, 0), "loss": 0.2222, "losses": {"critic": 0.3, "gen": -0.1, "gp": 0.0213456},
             "phase": "critic"}
    ray.get([board.add.remote(plain), board.add.remote(named)])
    watcher.poll()
    assert [json.loads(line) for line in (tmp_path / "curves.jsonl").read_text().splitlines()] == [plain, named]
    assert watcher.bar.postfix == ("attempt=0, epoch=0, phase=critic, loss=0.2222, critic=0.3, gen=-0.1, "
                                   "gp=0.02135, ps_rows_s=0, samples_s=1, workers=1")


def test_bar_of_a_record_without_named_losses_is_unchanged():
    # tqdm's own order of set_postfix(**fields), as the bar showed before named losses
    assert list(bar_postfix(_train(5, 2))) == sorted(["epoch", "loss", "samples_s", "ps_rows_s", "workers", "attempt"])
    assert bar_postfix({**_train(5, 2), "losses": {"loss": 1.0, "x": 2.0}})["loss_loss"] == "1"  # no clash
