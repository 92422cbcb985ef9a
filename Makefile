# ENBD CSI — entry points. `make demo` and `make test` are the README's two set-up commands:
# each installs what it needs (e2e/setup-host.sh --demo / --test, idempotent) and then runs.
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: setup setup-demo demo test lint check-fresh-machine test-unit test-vm test-chart build release fuzz-smoke bench bench-mirror test-cluster

# Everything the tests need (make test, build, release, bench).
setup:
	./e2e/setup-host.sh --test

# Only what building and running enbd-server needs (make demo).
setup-demo:
	./e2e/setup-host.sh --demo

build: setup
	$(CARGO) build --workspace --all-targets

release: setup
	$(CARGO) build --release --workspace --bins

# The main job without Kubernetes: an enbd-server on an embedded default data directory
# with a demo volume, reachable as nbd://localhost/demo.
demo: setup-demo
	$(CARGO) run --release -p enbd-server -- --demo

# The whole default suite: unit + interop tests on the host, chart/manifest checks,
# the CSI controller conformance suite, and the VM suite (ublk devices, node CSI).
test: setup
	$(MAKE) lint
	$(MAKE) test-unit
	$(MAKE) test-chart
	$(MAKE) test-vm

# Formatting and lints. Library and binary code may not unwrap/expect (workspace lints deny
# them); test code may, so the second pass allows those two lints and denies everything else.
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --lib --bins -- -D warnings
	$(CARGO) clippy --workspace --all-targets -- -D warnings -A clippy::unwrap_used -A clippy::expect_used

# Unit, golden-byte, interop (qemu-img, nbdinfo, nbdcopy, fio, nbdkit) and fault tests.
test-unit:
	$(CARGO) nextest run --workspace --no-fail-fast

# Helm lint/template and strict validation of every rendered object.
test-chart:
	./e2e/chart/check.sh

# Real ublk devices on a real kernel, in a TCG VM (KERNEL=trixie|sid).
test-vm:
	./e2e/vm/run.sh --kernel $${KERNEL:-trixie}

# The chart installed with Helm on a real single-node cluster built here offline (control
# plane in a network namespace, node in a TCG VM with ublk), and the kind tests against it.
# Needs root and the repository snapshots e2e/cluster/build-kube.sh names; not part of
# `make test` (cold: the Kubernetes builds; see README "Real cluster"). CLUSTER_ARGS: run.sh's
# options (--keep, --only BINARY, --upstream).
test-cluster:
	./e2e/setup-host.sh --cluster
	./e2e/cluster/run.sh $(CLUSTER_ARGS)

# A short run of every fuzz target (needs the nightly toolchain).
fuzz-smoke:
	./proto/fuzz/smoke.sh
	./enbd-server/fuzz/smoke.sh

# enbd-server and the client engine vs qemu-nbd, nbdkit, nbd-server and libnbd.
bench: release
	./e2e/bench/run.sh

# Mirrored volumes on loopback: 1/2/3 replicas through the engine, and the resync measurement.
bench-mirror: release
	./e2e/bench/mirror.sh

# Both set-up profiles in clean debootstrap'ed Debian root filesystems, without Node.js, with
# Debian's and with a third-party one; builds and starts enbd-server --demo in one of them.
# Needs root; not part of `make test`.
check-fresh-machine:
	./e2e/fresh-machine/check.sh
