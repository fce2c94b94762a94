"""`xdtrain <job> --config <yaml> [key=value ...]`: the same jobs as `python -m jobs.<job>`.

Each job is registered as (module, config class, run function) and imported only when used,
so `xdtrain --help` is instant.
"""

from __future__ import annotations

import importlib
import sys

from xdtrain.jobrunner import job_main

# name -> (module, config class, run function, one-line help)
JOBS: dict[str, tuple[str, str, str, str]] = {
    "gen-data": ("xdtrain.data.synthetic", "WorldConfig", "run_gen_data",
                 "generate a synthetic multi-domain world with planted ground truth"),
    "prepare-movielens": ("xdtrain.data.movielens", "MovieLensConfig", "run_prepare",
                          "convert the shipped MovieLens/Freebase files into canonical Parquet"),
    "pretrain": ("xdtrain.train.engine", "EngineConfig", "run_pretrain",
                 "pre-train on the distributed engine (Ray Train workers + sharded PS)"),
    "finetune": ("xdtrain.train.engine", "EngineConfig", "run_finetune",
                 "fine-tune from a checkpoint (init_from=...) on the engine"),
    "evaluate": ("xdtrain.train.engine", "EngineConfig", "run_evaluate",
                 "test a checkpoint (init_from=...) against the baselines"),
    "build-graph": ("graph.build", "GraphBuildConfig", "run_build_graph",
                    "build a DGL entity graph from triplet Parquet (saved for later jobs)"),
    "refresh-embeddings": ("xdtrain.refresh.job", "RefreshConfig", "run_refresh",
                           "compute, check and publish an embedding version from a checkpoint (out=<store>)"),
    "train-reference": ("xdtrain.reference.trainer", "ReferenceConfig", "run_reference",
                        "train a backbone single-process with local tables (the correctness baseline)"),
}


def usage() -> str:
    lines = ["usage: xdtrain <job> [--config FILE] [key=value ...]", "", "jobs:"]
    lines += [f"  {name:<20} {help_}" for name, (*_, help_) in JOBS.items()]
    lines += ["", "other commands:", f"  {'report <run_dir>':<20} render plots, curves.csv and report.html of a run",
              f"  {'embeddings list out=<store>':<20} the store's versions and the one CURRENT serves",
              f"  {'embeddings rollback out=<store> [version=<v>]':<20} serve an earlier version "
              "(default: the one published before CURRENT)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "report":
        from xdtrain.report import main as report_main

        return report_main(rest)
    if name == "embeddings":
        return embeddings_main(rest)
    if name not in JOBS:
        print(f"xdtrain: unknown job '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, cfg_name, fn_name, _ = JOBS[name]
    module = importlib.import_module(module_name)
    return job_main(name, getattr(module, cfg_name), getattr(module, fn_name), rest)


def embeddings_main(argv: list[str]) -> int:
    """`xdtrain embeddings list|rollback out=<store> [version=<v>]`."""
    from xdtrain.config import ConfigError
    from xdtrain.data.schemas import DataError
    from xdtrain.serving import store

    args = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    bad = [a for a in argv[1:] if "=" not in a or a.split("=", 1)[0] not in ("out", "version")]
    if not argv or argv[0] not in ("list", "rollback") or bad or not args.get("out"):
        print("usage: xdtrain embeddings list out=<store>\n"
              "       xdtrain embeddings rollback out=<store> [version=<v>]", file=sys.stderr)
        return 2
    try:
        if argv[0] == "rollback":
            before, after = store.rollback(args["out"], args.get("version", ""))
            print(f"xdtrain embeddings: {args['out']}: CURRENT {before} -> {after}")
            return 0
        current = store.read_current(args["out"])
        published = {h["version"]: h for h in store.history(args["out"])}
        for v in store.version_names(args["out"]):
            state, why = store.version_state(args["out"], v)
            when = published.get(v, {}).get("published", "")
            print(f"{'*' if v == current else ' '} {v}  {state}  {when or why}")
        return 0
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"xdtrain embeddings: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
