#!/usr/bin/env bash
# Installs the system packages gingham's build and tests need, only if something is missing;
# with --kube, also the tests' kube-apiserver and kubectl (scripts/kube-build.sh; cached after
# the first time; `gingham lab up --datastore kubernetes` builds them on demand otherwise).
# Idempotent: `apt-get update` once, then one `apt-get install -y`.
set -euo pipefail

# binary -> Debian package
declare -A NEED=(
  [podman]=podman           # the CNI plugin driven by a real container runtime
  [runc]=runc               # podman's runtime here (crun fails on this cgroup setup)
  [/bin/busybox]=busybox-static  # the containers' rootfs (no image can be pulled)
  [etcd]=etcd-server        # the etcd backend's tests and benchmark run a real etcd
  [etcdctl]=etcd-client
  [protoc]=protobuf-compiler # etcd-client's gRPC code generation at build time
  [openssl]=openssl         # TLS test certificates
  [ip]=iproute2             # network namespaces for the kernel and CNI tests
  [ping]=iputils-ping       # pod connectivity checks
  [iptables]=iptables       # used by the portmap plugin in the chaining test
  [ipset]=ipset             # the policy benchmark's Felix-style reference (iptables-restore with ipsets)
  [nft]=nftables            # NAT outgoing
  [iperf3]=iperf3           # the datapath benchmark
  [/usr/lib/cni/portmap]=containernetworking-plugins  # chained after gingham in tests; ptp + host-local for the CNI benchmark
  [bird]=bird2              # BGP interop tests and the BGP benchmark's reference
  [/usr/lib/frr/bgpd]=frr   # BGP interop (route-reflector client, eBGP ToR)
  [gobgpd]=gobgpd           # BGP interop
)
missing=()
for bin in "${!NEED[@]}"; do
  if [[ $bin == /* ]]; then [[ -e $bin ]] || missing+=("${NEED[$bin]}"); continue; fi
  command -v "$bin" >/dev/null 2>&1 || missing+=("${NEED[$bin]}")
done
if ((${#missing[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "install-deps: missing ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The Kubernetes tests' real API server and kubectl, built from Go modules once per machine.
if [[ ${1:-} == --kube ]]; then
  "$(dirname "$0")/kube-build.sh" >/dev/null
fi
