#!/usr/bin/env bash
# Make `lora_launch` importable without installing it (the GPU machine has no network and no pip
# install of the project): .pkg/lora_launch/<name> links to the repository's folder, the mapping
# pyproject.toml's [tool.setuptools.package-dir] installs (read from there, so a new package links too).
# Then: export PYTHONPATH=$(bash bench/link_package.sh):$PWD/.devsite
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .pkg/lora_launch
python3 - <<'PY'
import os, tomllib
mapping = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"]
for package, folder in mapping.items():
    link = os.path.join(".pkg", *package.split("."))
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.abspath(folder), link)
PY
echo "$PWD/.pkg"
