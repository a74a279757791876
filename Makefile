# lazypull — two commands matter: `make demo` and `make test`.
# Both install what they need (Debian packages, idempotently) and need nothing but Rust.

CARGO ?= cargo
SHELL := /bin/bash

.PHONY: all build release test demo bench fuzz deps clean

all: build

build:
	$(CARGO) build --workspace --locked

release:
	$(CARGO) build --release --locked -p lazypull

# Unit + integration tests, including interop with the Go reference library and the real
# runtime (required here: a missing tool fails the run instead of skipping); ends with a
# one-line summary (passed / failed / skipped, wall time).
test:
	scripts/install-deps.sh test
	CARGO=$(CARGO) scripts/test.sh

demo:
	scripts/install-deps.sh demo
	scripts/demo.sh

# Long benchmarks (convert throughput vs ctr-remote / gzip / pigz, random reads; the lazy
# filesystem vs stargz-snapshotter and a full overlayfs pull; hello-bench cold starts through
# containerd on loopback and shaped links); writes docs/benchmarks.md and
# docs/bench-coldstart.png. Peer tools come from Debian packages and ../shared/peer.
bench:
	scripts/install-deps.sh bench
	scripts/bench.sh
	scripts/bench-fs.sh
	scripts/bench-coldstart.sh
	scripts/bench-start.sh
	# issue 17's cache bound at full size (cache_size = 200 MiB, two ~550 MB images read whole).
	scripts/bench-cache-bound.sh
	# ... and its dedup across layer daemons at full size (test/big:1 converted at two levels).
	scripts/bench-dedup.sh
	scripts/bench-soci-build.sh
	MODES="overlayfs lazypull lazypull-soci" NETS="loopback 1gbit-2ms" RESULTS=results-soci.jsonl REPORT=soci \
	  scripts/bench-coldstart.sh
	# SOCI on the peers' unmodified images (fallback tag, referrers API, v2): issue 18's check.
	LAZYPULL_PEER_REGISTRY=127.0.0.1:5000 LAZYPULL_INTEROP=required \
	  cargo test --release --locked -p lazypull --test containerd soci_indexes_of_the_peer_images -- --nocapture
	# Baked node cache volumes of the peers' images: start time vs the warm floor, budget run
	# (issue 19's check).
	LAZYPULL_PEER_REGISTRY=127.0.0.1:5000 LAZYPULL_INTEROP=required \
	  cargo test --release --locked -p lazypull --test containerd baked_volumes_of_the_peer_images -- --nocapture
	# Pods through CRI (RunPodSandbox … ready): full pull vs the Go stargz-snapshotter vs lazypull,
	# on loopback and 1 Gbit/s + 2 ms (issue 20's pod-level start).
	scripts/bench-pods.sh

# Bounded fuzzing of footer+TOC parsing, tar conversion, layer serving and zTOC reading
# (FUZZ_SECONDS per target).
FUZZ_SECONDS ?= 120
fuzz:
	scripts/install-deps.sh fuzz
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh

clean:
	$(CARGO) clean
