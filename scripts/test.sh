#!/usr/bin/env bash
# Runs every test: installs what the tests need, then the whole workspace's test suite
# (unit, property, CLI end-to-end, and the datastore conformance suite on SQLite, a real etcd and a
# real kube-apiserver).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --kube
cargo test --workspace --locked "$@"
