"""Ray's own output goes to `<run_dir>/logs/ray.log`, so a job's console shows only its progress
bar, its stage lines and its results (`verbose=true` keeps Ray's output on the console).

Two streams are redirected while a job runs, and restored after it:
- the stdout/stderr of Ray's workers and actors (Ray Train's controller and workers, the PS
  shards, ...), which Ray forwards to the driver: the file takes the place of Ray's console
  printer among the handlers of Ray's dispatcher of forwarded lines;
- the driver's `ray*` Python loggers (ray.init's notices, Ray Train / Tune / Data on the driver).

Lines are written as they come, without Ray's de-duplication, so the file is the full record.
When the job fails, the path of the file is printed to stderr before the error.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray._private.ray_logging import global_worker_stdstream_dispatcher as _dispatcher

from xdtrain.config import ConfigError
from xdtrain.data.schemas import DataError

LOG_FILE = Path("logs") / "ray.log"  # inside the run directory
RAY_PRINTER = "ray_print_logs"  # the name under which ray.init(log_to_driver=True) installs its printer
OUR_WRITER = "xdtrain_ray_log"


def _ray_loggers() -> list[logging.Logger]:
    """'ray' and every 'ray.*' logger that has handlers of its own (others reach 'ray')."""
    names = [n for n in list(logging.Logger.manager.loggerDict) if n.startswith("ray.")]
    children = [logging.getLogger(n) for n in sorted(names)]
    return [logging.getLogger("ray")] + [lg for lg in children if lg.handlers]


class RayLog:
    """Context manager around a job: see the module docstring. A no-op when `verbose`."""

    def __init__(self, run_dir: str | Path, verbose: bool = False) -> None:
        self.path = Path(run_dir).resolve() / LOG_FILE
        self.verbose = verbose
        self._handler: logging.StreamHandler | None = None
        self._saved_handlers: list[tuple[logging.Logger, list[logging.Handler]]] = []
        self._saved_printers: list[tuple[str, Any]] = []

    @property
    def active(self) -> bool:
        return self._handler is not None

    def __enter__(self) -> RayLog:
        if self.verbose:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stream = self.path.open("a", buffering=1)  # line-buffered: a crash loses nothing written
        stream.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {' '.join(sys.argv)}\n")
        self._handler = logging.StreamHandler(stream)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for lg in _ray_loggers():
            self._saved_handlers.append((lg, list(lg.handlers)))
            lg.handlers = [self._handler]
        self.take_worker_output()
        return self

    def take_worker_output(self) -> None:
        """Send the worker lines forwarded to this driver to the file. Call it again after a
        `ray.init` made inside the context: ray.init installs Ray's console printer then."""
        if not self.active:
            return
        current = list(_dispatcher.handlers)
        self._saved_printers += [h for h in current if h[0] == RAY_PRINTER]
        for name in (RAY_PRINTER, OUR_WRITER):
            _dispatcher.remove_handler(name)
        _dispatcher.add_handler(OUR_WRITER, self._write_worker_lines)

    def _write_worker_lines(self, data: dict) -> None:
        """One batch of forwarded lines, as Ray prints them: `(ActorName pid=N[, ip=...]) line`."""
        who = data.get("actor_name") or data.get("task_name") or ""
        ip = data.get("ip")
        where = f"{who} pid={data.get('pid')}" + (f", ip={ip}" if ip and ip != data.get("localhost") else "")
        text = "".join(f"({where.strip()}) {line}\n" for line in data.get("lines", []))
        handler = self._handler
        if handler is None or not text:
            return
        handler.acquire()
        try:
            handler.stream.write(text)
        finally:
            handler.release()

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.active:
            return
        _dispatcher.remove_handler(OUR_WRITER)
        if ray.is_initialized():  # ray.shutdown removes Ray's printer itself; a later init adds it again
            for name, printer in self._saved_printers[:1]:
                _dispatcher.add_handler(name, printer)
        for lg, handlers in self._saved_handlers:
            lg.handlers = handlers
        handler, self._handler = self._handler, None
        handler.acquire()
        try:
            handler.stream.close()
        finally:
            handler.release()
        # The error itself reaches the console as the job's error or traceback; a bad input or config
        # is said in full in its one line.
        if exc is not None and not isinstance(exc, (DataError, ConfigError)):
            print(f"[xdtrain] the run failed; Ray's output of it: {self.path}", file=sys.stderr, flush=True)

    def describe(self) -> str:
        """A stage line saying where Ray's output goes."""
        return f"[xdtrain] Ray's output: {self.path} (verbose=true shows it here)" if self.active else ""
