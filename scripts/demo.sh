#!/usr/bin/env bash
# The main job: build gingham, then a 3-node lab on this machine (network namespaces, one agent
# per node, VXLAN, embedded datastore, 2 pods per node created through the CNI plugin) and check
# that every pod pings and TCP-connects every other pod. The lab stays up for you to explore:
#   target/release/gingham lab status | lab env | lab exec default/pod-1-1 -- ip route | lab down
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked -q
g=target/release/gingham
"$g" lab up "$@"
"$g" lab check
