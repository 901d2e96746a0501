#!/usr/bin/env bash
# Builds the tests' real Kubernetes API server (kube-apiserver) and kubectl from the published
# k8s.io/kubernetes Go module pinned in tools/kube/go.mod, once per machine: the binaries are
# cached in $GINGHAM_CACHE/kube/<version>/ (default /var/cache/gingham), with Go's module and
# build caches beside them, so a second run is instant. Prints the directory holding them.
set -euo pipefail
cd "$(dirname "$0")/../tools/kube"
version=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' go.mod)
cache=${GINGHAM_CACHE:-/var/cache/gingham}
out=$cache/kube/$version
if [[ -x $out/kube-apiserver && -x $out/kubectl ]]; then
  echo "$out"
  exit 0
fi
# Machines of this kind carry Go in /usr/local/go; a non-login shell may not have it on PATH.
command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || { echo "kube-build: no Go toolchain (go) on PATH; it is needed to build kube-apiserver $version" >&2; exit 1; }
umask 022
mkdir -p "$cache/kube" "$cache/go"
export GOMODCACHE=$cache/go/mod GOCACHE=$cache/go/build GOFLAGS=-mod=readonly GOTOOLCHAIN=local
tmp=$(mktemp -d "$cache/kube/.build-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
echo "kube-build: building kube-apiserver and kubectl $version (first run on this machine: about 8 min on 2 cores)" >&2
minor=${version#v1.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
go build -trimpath -ldflags="$ldflags" -o "$tmp/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl
chmod 0755 "$tmp" "$tmp/kube-apiserver" "$tmp/kubectl"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "kube-build: built in $((SECONDS - start)) s into $out" >&2
echo "$out"
