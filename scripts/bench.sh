#!/usr/bin/env bash
# Every benchmark, each under a time limit, printing its table: the figures in the notes and the
# README come from here. As root (the benchmarks build namespaces). Fails loudly: a benchmark that
# errs or overruns its limit is named at the end and the exit status is 1.
#   scripts/bench.sh              # all
#   scripts/bench.sh cni ipam     # some: store ipam cni datapath scale nft bgp-feed bgp-claim bgp-rr policy first-packet policy-datapath
# The scale benchmark compares with the agent of commit e5049a0 (before the watch-fed cache),
# built once into target/old-e5049a0 (a few minutes the first time).
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --kube || exit 1
cargo build --release --benches --locked -q || exit 1

declare -A LIMIT=([store]=600 [ipam]=600 [cni]=900 [datapath]=1200 [scale]=3000 [nft]=300 [bgp-feed]=600 [bgp-claim]=300 [bgp-rr]=600 [policy]=600 [first-packet]=300 [policy-datapath]=900)
declare -A ARGS=([store]="-p gingham-store" [ipam]="-p gingham-ipam" [cni]="-p gingham --bench cni"
                 [datapath]="-p gingham --bench datapath" [scale]="-p gingham --bench scale"
                 [nft]="-p gingham-kernel --bench nft" [bgp-feed]="-p gingham-bgp --bench feed"
                 [bgp-claim]="-p gingham --bench bgp_claim" [bgp-rr]="-p gingham-bgp --bench reflector"
                 [policy]="-p gingham-dataplane --bench policy" [first-packet]="-p gingham --bench first_packet"
                 [policy-datapath]="-p gingham --bench policy_datapath")
ORDER=(store ipam cni datapath scale nft bgp-feed bgp-claim bgp-rr policy first-packet policy-datapath)

# The agent before the watch-fed cache, for the scale benchmark's comparison.
old_agent() {
  local dir=$PWD/target/old-e5049a0
  if [[ ! -x $dir/release/gingham ]]; then
    echo "building the agent of commit e5049a0 for comparison (once) ..."
    [[ -d $dir/src ]] || git worktree add --detach -f "$dir/src" e5049a0 >/dev/null || return 1
    (cd "$dir/src" && cargo build --release -q -p gingham --target-dir "$dir") || return 1
  fi
  export GINGHAM_OLD_AGENT=$dir/release/gingham
}
want=("$@")
((${#want[@]})) || want=("${ORDER[@]}")

failed=()
for b in "${want[@]}"; do
  [[ -n ${LIMIT[$b]:-} ]] || { echo "unknown benchmark $b (have: ${ORDER[*]})" >&2; exit 2; }
  if [[ $b == scale ]]; then old_agent || echo "cannot build commit e5049a0: the scale table has no comparison rows"; fi
  echo "=== $b (time limit ${LIMIT[$b]} s)"
  # shellcheck disable=SC2086
  timeout --kill-after=15 "${LIMIT[$b]}" cargo bench --locked -q ${ARGS[$b]}
  rc=$?
  if ((rc == 124 || rc == 137)); then
    echo "=== $b: OVERRAN its ${LIMIT[$b]} s limit"; failed+=("$b (timeout)")
  elif ((rc != 0)); then
    echo "=== $b: FAILED (exit $rc)"; failed+=("$b (exit $rc)")
  fi
  echo
done
if ((${#failed[@]})); then
  echo "benchmarks that failed: ${failed[*]}" >&2
  exit 1
fi
echo "all benchmarks ran: ${want[*]}"
