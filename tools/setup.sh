#!/usr/bin/env bash
# Installs what csv's tests, benchmarks and demo need and this machine lacks.
# Idempotent: packages already present are not touched, and nothing is
# fetched when nothing is missing. Debian packages come from apt; the test
# runner (cargo-nextest) from crates.io.
set -euo pipefail

# Debian packages and why:
#   tgt             tgtd, the iSCSI target the SAN tests run against
#   libiscsi-bin    iscsi-ls/-inq/-perf: a second initiator and the iSCSI peer
#   fuse3           fusermount3 and /etc/fuse.conf for the FUSE mounts
#   qemu-utils      qemu-img/qemu-io: the VHD interop peer
#   busybox-static  the test guest's initramfs
#   iproute2        network namespaces for multi-host tests
#   fio             the filesystem benchmark
#   istgt           a second iSCSI target (it has COMPARE AND WRITE, tgtd not)
#   etcd-server     the metadata benchmark's peer (a Raft-replicated store)
#   qemu-system-x86 the VMM benchmark's peer (boots the same test guest)
PACKAGES=(tgt libiscsi-bin fuse3 qemu-utils busybox-static iproute2 fio istgt etcd-server qemu-system-x86)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then sudo=(sudo); else
      echo "setup: need root to install ${missing[*]} (run as root or install them)" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
