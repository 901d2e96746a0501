#!/usr/bin/env bash
# Every benchmark, each under a time limit, printing its table: the figures in the notes and the
# README come from here. As root (the benchmarks build namespaces). Fails loudly: a benchmark that
# errs or overruns its limit is named at the end and the exit status is 1.
#   scripts/bench.sh              # all
#   scripts/bench.sh cni ipam     # some: store ipam cni datapath
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh || exit 1
cargo build --release --benches --locked -q || exit 1

declare -A LIMIT=([store]=600 [ipam]=600 [cni]=600 [datapath]=1200)
declare -A ARGS=([store]="-p gingham-store" [ipam]="-p gingham-ipam" [cni]="-p gingham --bench cni"
                 [datapath]="-p gingham --bench datapath")
ORDER=(store ipam cni datapath)
want=("$@")
((${#want[@]})) || want=("${ORDER[@]}")

failed=()
for b in "${want[@]}"; do
  [[ -n ${LIMIT[$b]:-} ]] || { echo "unknown benchmark $b (have: ${ORDER[*]})" >&2; exit 2; }
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
