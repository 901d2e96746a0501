#!/usr/bin/env bash
# The main job until `gingham lab` exists: build gingham, apply Calico's seed examples to a fresh
# embedded store, and list them the way calicoctl would.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked -q
g=target/release/gingham
seeds=crates/cli/tests/fixtures/seeds
export GINGHAM_STORE_PATH=${GINGHAM_STORE_PATH:-/tmp/gingham-demo/store.db}
rm -f "$GINGHAM_STORE_PATH" "$GINGHAM_STORE_PATH"-wal "$GINGHAM_STORE_PATH"-shm
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "gingham $*"; "$g" "$@"; }

run datastore
for f in ippool-ipip-always ippool-no-encap bgpconfiguration-no-mesh node-rr bgppeer-rr-mode1 \
         networkpolicy-allow-web-to-api networkpolicy-limit-external-access; do
  run apply -f "$seeds/$f.yaml"
done
run get ippool -o wide
run get node -o wide
run get bgpconfig
run get bgppeer
run get kubernetesnetworkpolicy -A
run selector eval "calico-rr == 'true'" --labels '{"calico-rr":"true"}'
say "gingham apply -f $seeds/ippool-resize.yaml   # blockSize is immutable: refused, nothing written"
if "$g" apply -f "$seeds/ippool-resize.yaml"; then echo "unexpected: the resize was accepted" >&2; exit 1; fi
echo
echo "demo store: $GINGHAM_STORE_PATH (set GINGHAM_STORE_PATH to use it with other gingham commands)"
