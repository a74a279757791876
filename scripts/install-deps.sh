#!/usr/bin/env bash
# Installs the Debian packages a make target needs, idempotently: packages already present are
# not touched, and `apt-get update` runs only when something is missing.
#
#   scripts/install-deps.sh test|demo|bench|fuzz
set -euo pipefail

target="${1:-test}"
# Always: C toolchain for zlib/zstd/libdeflate sys crates, the plain tools the round-trip tests
# compare against (gzip, tar, zstd), and the Go reference library for the interop tests.
# The lazy filesystem and snapshotter tests add containerd, runc and ctr-remote (package
# stargz-snapshotter: `image rpull` sets the remote-snapshot labels). python3 regenerates the SOCI
# fixture layers (crates/soci/tests/fixtures/gen_layers.py). e2fsprogs and mount: `bake` makes and
# loop-mounts ext4 volume images.
pkgs=(build-essential pkg-config gzip tar zstd attr curl openssl apache2-utils docker-registry containerd runc busybox-static ca-certificates python3 e2fsprogs mount
      golang-go golang-github-containerd-stargz-snapshotter-dev stargz-snapshotter)
case "$target" in
  test|fuzz) ;;
  demo) pkgs+=(jq curl python3) ;;
  bench) pkgs+=(jq curl pigz stargz-snapshotter debootstrap skopeo umoci docker-registry containerd runc iproute2 python3 python3-matplotlib) ;;
  *) echo "usage: $0 test|demo|bench|fuzz" >&2; exit 2 ;;
esac

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}" >&2
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# FUSE: lazypull speaks to /dev/fuse directly (no libfuse); make sure the module is loaded.
if [ ! -e /dev/fuse ] && [ "$(id -u)" -eq 0 ]; then
  modprobe fuse 2>/dev/null || true
fi
