#!/usr/bin/env bash
# Here, before a device call: the wheels the lent GPU machine's image lacks (it has torch, numpy, tokenizers,
# safetensors, accelerate, pyyaml; not zarr, numcodecs, crc32c, google-crc32c, donfig; an older transformers), for
# its Python 3.12, into .whl/ (ignored by git; ~23 MB, name it in the call's carry). Versions: the ones this project
# is tested with.
# Then: run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=480).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  zarr==3.1.6 numcodecs==0.16.6 crc32c==2.9.post0 google-crc32c==1.9.0 donfig==0.8.1.post1 transformers==5.24.0
if [[ ${1:-} == trl ]]; then  # gpu_run.sh's `trl` part (issue 26): TRL and what it imports that the image lacks
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    trl==1.16.0 datasets dill multiprocess xxhash
fi
ls -la .whl
du -sh .whl
