"""The chaos suite's own check: a driver SIGKILLed mid-run (and one mid-checkpoint) resumes on a re-run
with every row read once, and leaves no process or shared memory behind. Slow (two embedded-Ray runs
each); the default suite's fault tests are in test_engine.py and test_programs_engine.py, and
`bench/chaos.py --faults 30` gives the counts in the README."""

from __future__ import annotations

import os

import pytest
from enginekit import sequences_in

from bench import chaos


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["driver", "checkpoint"])
def test_a_killed_driver_resumes_exactly_once_and_leaves_nothing(kind, tmp_path):
    world = chaos.make_world(tmp_path / "world")
    shm0 = chaos.shm_buffers()
    r = chaos.run_fault(kind, 5, world, tmp_path)
    assert r["rc"] == 0, r["drivers"][-1].log.read_text()[-3000:]
    assert len(r["drivers"]) == 2  # killed, then re-run
    assert r["summary"]["samples"] == 2 * sequences_in(tmp_path / "run")  # 2 epochs, each row once
    assert chaos.leaked(r["drivers"]) == 0  # the killed driver's Ray (GCS, raylet, agents, workers) went too
    assert chaos.shm_buffers() - shm0 == set(), os.listdir(chaos.SHM_DIR)
