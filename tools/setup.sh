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
#   chromium-headless-shell  loads the web console in the suite (headless)
#   autoconf automake libtool make patch pkg-config uuid-dev xfslibs-dev
#   libattr1-dev libacl1-dev libaio-dev liburing-dev
#                   build xfstests (tools/xfstests.sh)
#   attr acl bc gawk psmisc xfsprogs e2fsprogs
#                   what xfstests runs (getfattr, setfacl, xfs_io, ...)
PACKAGES=(tgt libiscsi-bin fuse3 qemu-utils busybox-static iproute2 fio istgt etcd-server chromium-headless-shell
  autoconf automake libtool make patch pkg-config uuid-dev xfslibs-dev libattr1-dev libacl1-dev libaio-dev liburing-dev
  attr acl bc gawk psmisc xfsprogs e2fsprogs)

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

# `tools/setup.sh --qemu-system`: also qemu-system-x86, the `qemu` VM
# engine (real guests; the suite's qemu tests) and the VMM benchmark's peer
# (tools/bench/run vmm), and the Linux test guest built from Debian
# packages into target/qemu-guest (tools/guest/build-qemu-guest.sh). The
# tests run with it (tools/test.sh). qemu-system-x86 must come from the
# same Debian suite as the installed qemu-utils: installing bookworm's 7.2
# next to a qemu-utils from bookworm-backports makes apt remove qemu-utils
# (and with it qemu-img, the VHD tests' peer). So when qemu-utils is a
# backports build, qemu-system-x86 is taken from bookworm-backports too
# (the suite is added to apt's sources if it is missing).
if [ "${1:-}" = --qemu-system ] && ! command -v qemu-system-x86_64 >/dev/null; then
  sudo=()
  [ "$(id -u)" != 0 ] && sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  suite=()
  if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q 'bpo'; then
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    if ! grep -rqs "${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      echo "deb http://deb.debian.org/debian ${codename}-backports main" |
        "${sudo[@]}" tee /etc/apt/sources.list.d/csv-backports.list >/dev/null
    fi
    suite=(-t "${codename}-backports")
  fi
  echo "setup: installing qemu-system-x86 ${suite[*]}"
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${suite[@]}" qemu-system-x86 qemu-utils >/dev/null
fi

if [ "${1:-}" = --qemu-system ]; then
  root=$(cd "$(dirname "$0")/.." && pwd)
  missing=()
  for t in gcc objcopy mke2fs syslinux mcopy mkfs.vfat sfdisk; do command -v "$t" >/dev/null || missing+=("$t"); done
  for f in /usr/lib/SYSLINUX.EFI/efi64/syslinux.efi /usr/share/ovmf/OVMF.fd; do [ -e "$f" ] || missing+=("$f"); done
  if ((${#missing[@]})); then
    sudo=()
    [ "$(id -u)" != 0 ] && sudo=(sudo)
    echo "setup: installing what the Linux test guest is built with (${missing[*]} missing)"
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends gcc libc6-dev binutils e2fsprogs \
      syslinux syslinux-common syslinux-efi mtools dosfstools fdisk ovmf >/dev/null
  fi
  if [ ! -s "$root/target/qemu-guest/bootable.raw" ] || [ "$root/tools/guest/build-qemu-guest.sh" -nt "$root/target/qemu-guest/initramfs.cpio.gz" ] ||
     [ "$root/tools/guest/writer.c" -nt "$root/target/qemu-guest/initramfs.cpio.gz" ]; then
    echo "setup: building the Linux test guest (target/qemu-guest)"
    "$root/tools/guest/build-qemu-guest.sh" "$root/target/qemu-guest"
  fi
fi
