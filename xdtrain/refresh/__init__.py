"""Large-scale embedding refresh: from a checkpoint to a validated, published embedding version.

- `job`: the job (`python -m jobs.refresh_embeddings`, `xdtrain refresh-embeddings`) and rollback;
- `infer`: batch inference of one table on a Ray Data actor pool (or in-process) and its bucketed output;
- `checks`: the checks a version passes before it is published.

The store it publishes into, and the reader that serves from it, are `xdtrain.serving`.
"""
