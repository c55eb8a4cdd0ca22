// Wrapper module: builds the etcd server from the go.etcd.io/etcd/server/v3 module (its go.mod
// replaces sibling modules with ../ paths, so `go install` refuses it). The cluster runs this
// etcd, not Debian's 3.4: Kubernetes 1.33 serves a consistent LIST from its watch cache only
// when etcd answers progress requests (3.5.13 and later), as every current cluster does.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
