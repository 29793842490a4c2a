#!/usr/bin/env bash
# The main job: installs what is missing, builds csv, and runs the most
# complete thing that exists today. Until the cluster daemon lands this is a
# tour of the parts that work: a SAN LUN served by a real iSCSI target, and
# VM disks (VHD) made, written, checked, converted and merged with csvctl.
# It will become `csvctl up` (a local cluster with mounts) when csvd exists.
#   tools/run.sh [DIR]     (default DIR: /tmp/csv-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/csv-demo}

tools/setup.sh
cargo build --release --locked -q -p csv-tools --bin csvctl
csvctl="$PWD/target/release/csvctl"
rm -rf "$dir"; mkdir -p "$dir"; cd "$dir"
step() { printf '\n== %s\n' "$*"; }

step "A SAN: a 1 GiB LUN file exported by tgtd on 127.0.0.1:3261"
truncate -s 1G lun1.img
export TGT_IPC_SOCKET="$dir/tgtd.sock"
tgtd -f --iscsi portal=127.0.0.1:3261 --pid-file "$dir/tgtd.pid" >tgtd.log 2>&1 &
tgtd_pid=$!
trap 'tgtadm --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true;
      tgtadm --op delete --mode system >/dev/null 2>&1 || kill -9 $tgtd_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do tgtadm --op show --mode sys >/dev/null 2>&1 && break; sleep 0.1; done
tgtadm --lld iscsi --op new --mode target --tid 1 -T iqn.2026-11.io.csv:demo
tgtadm --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 --backing-store "$dir/lun1.img"
tgtadm --lld iscsi --op bind --mode target --tid 1 -I ALL
iscsi-ls -s iscsi://127.0.0.1:3261

step "A VM disk: a 10 GiB dynamic VHD, written by QEMU, read by csvctl"
"$csvctl" vhd create base.vhd --size 10G
qemu-io -f vpc -c 'write -P 0x42 0 64M' base.vhd | tail -1
"$csvctl" vhd info base.vhd

step "A differencing disk on top of it, and its chain"
"$csvctl" vhd create vm1.vhd --parent base.vhd
"$csvctl" vhd info vm1.vhd

step "Consistency check (what qemu-img check cannot do for VHD)"
"$csvctl" vhd check vm1.vhd

step "Convert the chain to a fixed disk; QEMU compares it with the original"
"$csvctl" vhd convert vm1.vhd vm1-fixed.vhd --to fixed
qemu-img compare -f vpc -F vpc base.vhd vm1-fixed.vhd

step "Done"
echo "Files are in $dir. Next: 'tools/test.sh' runs the suite; README.md says what comes next."
