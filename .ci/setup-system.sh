#!/usr/bin/env bash
# Debian packages the launcher tests need: `ip` for the two-namespace multi-node tests; Slurm (controller,
# node daemon, client tools, munge) for the Slurm tests, one node on this host and two nodes each in a
# network namespace of its own (entered with util-linux's nsenter and unshare).
# Idempotent: installs only what is missing. Needs root (CI runs as root).
set -euo pipefail
want=(iproute2 util-linux slurmctld slurmd slurm-client munge)
missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup-system: ${want[*]} already installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup-system: not root; cannot install ${missing[*]} (the tests needing them will fall back or skip)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup-system: installed ${missing[*]}"
