// Command etcd is the test cluster's etcd: the server library Kubernetes vendors
// (go.etcd.io/etcd/server/v3/embed) behind a main that reads a standard etcd YAML
// configuration file. build-kube.sh compiles it inside the Kubernetes tree, which vendors
// everything it needs; etcd-io/etcd itself does not vendor its dependencies.
package main

import (
	"context"
	"flag"
	"log"
	"os"
	"os/signal"
	"syscall"

	"go.etcd.io/etcd/server/v3/embed"
)

func main() {
	configFile := flag.String("config-file", "", "etcd YAML configuration file (required)")
	flag.Parse()
	if *configFile == "" {
		log.Fatal("etcd: --config-file is required")
	}
	cfg, err := embed.ConfigFromFile(*configFile)
	if err != nil {
		log.Fatalf("etcd: reading %s: %v", *configFile, err)
	}
	server, err := embed.StartEtcd(cfg)
	if err != nil {
		log.Fatalf("etcd: starting: %v", err)
	}
	// SIGTERM/SIGINT close the server cleanly (WAL and backend flushed) before exiting.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	select {
	case <-server.Server.ReadyNotify():
		log.Print("etcd: ready to serve clients")
	case err := <-server.Err():
		log.Fatalf("etcd: %v", err)
	case <-ctx.Done():
		server.Close()
		os.Exit(0)
	}
	select {
	case err := <-server.Err():
		server.Close()
		log.Fatalf("etcd: %v", err)
	case <-ctx.Done():
		log.Print("etcd: stopping")
		server.Close()
	}
}
