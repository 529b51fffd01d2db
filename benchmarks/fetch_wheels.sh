#!/usr/bin/env bash
# Download, here, the wheels the GPU image lacks for the torch peer (diffusers, tomesd and
# importlib_metadata, which diffusers needs), for the image's Python 3.12, into .whl/
# (ignored by git: .gitignore lists /.whl/). Pass carry [".whl"] to the device tool;
# benchmarks/gpu_session.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl \
    diffusers==0.42.1 tomesd==0.1.3 importlib_metadata lazy-importer==0.1.0
ls -la .whl
