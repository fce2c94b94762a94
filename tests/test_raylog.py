"""A quiet driver: Ray's own output (worker lines forwarded to the driver, the driver's `ray*`
loggers) goes to <run_dir>/logs/ray.log while a job runs, and back to the console after it."""

from __future__ import annotations

import logging

import pytest
from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

from xdtrain.train.raylog import RAY_PRINTER, RayLog

pytestmark = pytest.mark.ray


def _batch(line: str) -> dict:
    """A batch of forwarded lines as Ray's log thread hands it to the dispatcher."""
    return {"ip": "10.0.0.1", "localhost": "10.0.0.1", "pid": 4242, "actor_name": "TrainController",
            "task_name": "", "is_err": False, "job": "01000000", "lines": [line]}


@pytest.fixture
def console():
    """Ray's console printer, as ray.init(log_to_driver=True) installs it (recording what it gets)."""
    printed: list[str] = []
    dispatcher.add_handler(RAY_PRINTER, lambda data: printed.extend(data["lines"]))
    yield printed
    dispatcher.remove_handler(RAY_PRINTER)


def test_ray_output_goes_to_the_run_log_and_comes_back_after(ray_cluster, console, tmp_path, capsys):
    with RayLog(tmp_path, verbose=False) as log:
        dispatcher.emit(_batch("Started training worker group of size 2"))
        logging.getLogger("ray.train").warning("Failed to query Ray Train Controller actor state")
        print(log.describe())
    text = (tmp_path / "logs" / "ray.log").read_text()
    assert "(TrainController pid=4242) Started training worker group of size 2" in text
    assert "WARNING ray.train: Failed to query Ray Train Controller actor state" in text
    out = capsys.readouterr()
    assert console == [] and "Failed to query" not in out.err
    assert out.out.strip() == f"[xdtrain] Ray's output: {tmp_path / 'logs' / 'ray.log'} (verbose=true shows it here)"

    dispatcher.emit(_batch("after the job"))  # Ray's printer is back, the file no longer written
    assert console == ["after the job"] and "after the job" not in (tmp_path / "logs" / "ray.log").read_text()
    assert [name for name, _ in dispatcher.handlers].count(RAY_PRINTER) == 1


def test_verbose_leaves_ray_output_on_the_console(ray_cluster, console, tmp_path):
    with RayLog(tmp_path, verbose=True) as log:
        dispatcher.emit(_batch("shown"))
        assert not log.active and log.describe() == ""
    assert console == ["shown"] and not (tmp_path / "logs").exists()


def test_a_failed_job_names_the_log(ray_cluster, console, tmp_path, capsys):
    with pytest.raises(RuntimeError, match="worker died"):
        with RayLog(tmp_path):
            dispatcher.emit(_batch("Traceback: worker died"))
            raise RuntimeError("worker died")
    assert f"[xdtrain] the run failed; Ray's output of it: {tmp_path / 'logs' / 'ray.log'}" in capsys.readouterr().err
    assert "Traceback: worker died" in (tmp_path / "logs" / "ray.log").read_text()
