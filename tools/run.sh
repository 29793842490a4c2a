#!/usr/bin/env bash
# The main job: installs what is missing, builds csv, and starts the
# embedded default cluster with `csvctl up`: three csvd hosts on loopback,
# a 4 GiB LUN file as Volume1, mounted on every host under
# DIR/nodeK/ClusterStorage/Volume1. It prints `ready:` once every mount is
# up and runs until Ctrl-C, which unmounts and stops the hosts.
#   tools/run.sh [csvctl up options]    (default: --nodes 3 --dir /tmp/csv-up)
#   tools/run.sh --linux-vm             also a Linux VM in QEMU on host 1
#                                       (installs QEMU and builds the guest)
set -euo pipefail
cd "$(dirname "$0")/.."
case " $* " in
  *" --linux-vm"*) tools/setup.sh --qemu-system ;;
  *) tools/setup.sh ;;
esac
cargo build --release --locked -q -p csv-tools --bin csvctl -p csvd --bin csvd -p hypervisor-shim --bin csv-vmm
exec target/release/csvctl up "$@"
