#!/usr/bin/env bash
# Make `lora_launch` importable without installing it (the GPU machine has no network and no pip
# install of the project): .pkg/lora_launch/{conf,run,data,launcher,train} link to the repository's folders,
# the same mapping pyproject.toml installs. Then: export PYTHONPATH=$PWD/.pkg:$PWD/.devsite
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .pkg/lora_launch
for d in conf run data launcher train serve studio; do ln -sfn "$PWD/$d" ".pkg/lora_launch/$d"; done
echo "$PWD/.pkg"
