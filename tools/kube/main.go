// The tests' Kubernetes API server and kubectl are built from the published k8s.io/kubernetes
// module (scripts/kube-build.sh); this file only makes this module depend on the packages whose
// programs are built, so that go.sum covers them.
package main

import (
	_ "k8s.io/kubectl/pkg/cmd"
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {}
