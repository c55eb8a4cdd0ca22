package main

// cri-reset stops and removes every pod sandbox (and so every container) the runtime holds,
// through the CRI like `crictl rmp -fa`: the runtime runs the CNI DEL of each pod, which frees
// its veth, its IP and its network namespace. cluster-down and a cluster-up that finds a killed
// cluster's leftovers use it; Debian has no crictl package.

import (
	"context"
	"fmt"
	"os"
	"time"

	remote "k8s.io/cri-client/pkg"
)

func criReset(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("usage: kube cri-reset unix:///path/to/containerd.sock")
	}
	runtime, err := remote.NewRemoteRuntimeService(args[0], 30*time.Second, nil, nil)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sandboxes, err := runtime.ListPodSandbox(ctx, nil)
	if err != nil {
		return err
	}
	for _, s := range sandboxes {
		if err := runtime.StopPodSandbox(ctx, s.Id); err != nil {
			return fmt.Errorf("stop sandbox %s (%s/%s): %w", s.Id, s.Metadata.Namespace, s.Metadata.Name, err)
		}
		if err := runtime.RemovePodSandbox(ctx, s.Id); err != nil {
			return fmt.Errorf("remove sandbox %s (%s/%s): %w", s.Id, s.Metadata.Namespace, s.Metadata.Name, err)
		}
		fmt.Fprintf(os.Stderr, "removed pod sandbox %s/%s\n", s.Metadata.Namespace, s.Metadata.Name)
	}
	return nil
}
