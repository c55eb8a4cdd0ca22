# graceful: every entry point a user or CI runs. The scripts behind each target install what
# they need (idempotently, cached under $(CACHE)), so a fresh machine needs nothing but this.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CACHE ?= $(HOME)/.cache/graceful
export GRACEFUL_CACHE := $(CACHE)
export PATH := $(CACHE)/bin:$(HOME)/.cargo/bin:$(PATH)

# Static release binaries (crt-static) for the images and the benchmark. The explicit --target
# keeps RUSTFLAGS off build scripts and proc macros, which cannot be linked statically.
TARGET := x86_64-unknown-linux-gnu
STATIC_BUILD := RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target $(TARGET)

.PHONY: help deps build-static lint unit fuzz crds cluster-up cluster-down cluster-status images \
	deploy demo test e2e baseline bench-sidecar screenshot scale release upgrade-test compat

help:
	@echo "make demo           real cluster, chart, rollouts under load, dropped-request report"
	@echo "make test           lint, unit and process tests, then the e2e suite on the real cluster"
	@echo "make release REGISTRY=host[:port]  images and chart of this commit's version, pushed there"
	@echo "make upgrade-test FROM=<git ref>   that version upgraded to this tree under load, on the e2e cluster"
	@echo "make compat K8S=1.MM               the e2e cluster on another Kubernetes minor, its core scenarios"
	@echo "make fuzz           the property tests of the parsers of outside input, 20,000 cases each"
	@echo "make cluster-up | cluster-down | cluster-status | images | deploy | baseline | bench-sidecar | screenshot | scale"

deps:
	scripts/deps.sh

# What ships (the images' binaries and the kubectl plugin) and what the benchmark runs: the e2e
# crate is never built for release.
build-static:
	$(STATIC_BUILD) --bin graceful-sidecar --bin graceful-operator --bin graceful-demo --bin kubectl-graceful

lint:
	cargo fmt --all --check
	cargo clippy --locked --workspace --all-targets -- -D warnings
	scripts/lint.sh

# Process-level tests start the built binaries (sidecar and demo) on real sockets.
# The property tests (parsers of outside input fed anything: annotations, flags, review
# bodies, the metrics rewriter, request heads through the sidecar) run a fixed seed here, so a
# run is repeatable; `make fuzz` runs many more cases from a fresh seed.
unit:
	cargo build --locked --workspace --bins
	PROPTEST_RNG_SEED=$${PROPTEST_RNG_SEED:-27} cargo test --locked --workspace

fuzz:
	cargo build --locked --workspace --bins
	PROPTEST_CASES=$${PROPTEST_CASES:-20000} cargo test --locked -p graceful-operator -p graceful-sidecar properties
	PROPTEST_CASES=$${PROPTEST_CASES:-20000} cargo test --locked -p graceful-sidecar --test heads

crds:
	mkdir -p crds charts/graceful/crds
	cargo run --locked -q -p graceful-operator --bin crdgen > crds/gracefulrollouts.yaml
	cp crds/gracefulrollouts.yaml charts/graceful/crds/gracefulrollouts.yaml

cluster-up: deps
	e2e/scripts/cluster-up.sh

cluster-down:
	e2e/scripts/cluster-down.sh

cluster-status:
	e2e/scripts/cluster-status.sh

# Build the images and push them to the cluster's registry (127.0.0.1:5000), as make release
# would, under a development version of these binaries; the node pulls the :dev ones.
images: deps build-static
	e2e/scripts/images.sh

# graceful into the e2e cluster from that registry, as a user installs a release.
deploy: images
	e2e/scripts/deploy.sh

# A versioned release of a clean tree: images and chart pushed to REGISTRY (scripts/release.sh).
release:
	REGISTRY="$(REGISTRY)" scripts/release.sh

# The e2e cluster on another Kubernetes minor (its newest patch, built by
# e2e/scripts/build-kube-compat.sh), graceful installed, and the core scenarios; the next plain
# make cluster-up starts the usual minor's cluster anew.
compat:
	@[[ -n "$(K8S)" ]] || { echo "usage: make compat K8S=1.MM" >&2; exit 2; }
	GRACEFUL_K8S=$(K8S) $(MAKE) --no-print-directory cluster-up deploy
	GRACEFUL_K8S=$(K8S) GRACEFUL_KUBE_BIN=$(CACHE)/compat/kube-$(K8S)/bin \
		e2e/run.sh --test injection --test rollout --test zero_drop

# graceful as it was at FROM (a git ref), upgraded under load to this tree on the e2e cluster.
upgrade-test: cluster-up deploy
	FROM="$(FROM)" scripts/upgrade-test.sh

demo: deps
	e2e/demo.sh $(ARGS)

e2e: cluster-up deploy
	e2e/run.sh

# docs/dashboard.png: the dashboard's queries in Prometheus during a GracefulRollout under load.
screenshot: cluster-up deploy
	scripts/deps.sh --screenshot
	cargo run --locked -q -p graceful-e2e --bin screenshot

# What every graceful figure is compared with: plain RollingUpdate rollouts under vegeta's load.
baseline: cluster-up images
	e2e/run.sh baseline

# The operator in a big cluster, simulated: KWOK fake nodes in the e2e cluster, fleets of 100,
# 1,000 and 10,000 pods, 100 rollouts at once (ARGS: --sizes, --nodes, --at-once, ...; --help).
scale: cluster-up deploy
	cargo run --locked -q -p graceful-e2e --bin scale -- $(ARGS)

# The cluster's Go builds run in the background meanwhile (scripts/test.sh).
test:
	scripts/test.sh

# oha (the benchmark's latency client) is built only here: the suite's load is vegeta's.
bench-sidecar: build-static
	scripts/deps.sh --bench
	sidecar/bench/run.sh
