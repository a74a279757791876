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
	scripts/bench-soci-build.sh

# Bounded fuzzing of footer+TOC parsing, tar conversion, layer serving and zTOC reading
# (FUZZ_SECONDS per target).
FUZZ_SECONDS ?= 120
fuzz:
	scripts/install-deps.sh fuzz
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh

clean:
	$(CARGO) clean
