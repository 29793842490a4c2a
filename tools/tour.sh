#!/usr/bin/env bash
# A guided tour of the parts, step by step: a SAN LUN served by a real
# iSCSI target, VM disks (VHD) made, written, checked and converted with
# csvctl, and a three-host cluster on this machine (csvd processes on
# loopback) with Volume1 on the LUN file, whose coordinator is moved and
# then killed. (The main job, a cluster with mounts, is tools/run.sh.)
#   tools/tour.sh [DIR]     (default DIR: /tmp/csv-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/csv-demo}

tools/setup.sh
cargo build --release --locked -q -p csv-tools --bin csvctl -p csvd --bin csvd
csvctl="$PWD/target/release/csvctl"
csvd="$PWD/target/release/csvd"
rm -rf "$dir"; mkdir -p "$dir"; cd "$dir"
step() { printf '\n== %s\n' "$*"; }

step "A SAN: a 1 GiB LUN file exported by tgtd on 127.0.0.1:3261"
truncate -s 1G lun1.img
export TGT_IPC_SOCKET="$dir/tgtd.sock"
tgtd -f --iscsi portal=127.0.0.1:3261 --pid-file "$dir/tgtd.pid" >tgtd.log 2>&1 &
tgtd_pid=$!
hosts=()
trap 'for p in "${hosts[@]}"; do kill "$p" 2>/dev/null || true; done
      tgtadm --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true;
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

step "A cluster: three csvd hosts on 127.0.0.1:7101-7103, one cluster key"
"$csvctl" cluster init --key-file "$dir/cluster.key"
export CSV_KEY_FILE="$dir/cluster.key" CSV_CLUSTER=demo
export CSV_ENDPOINTS=127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103
peers=(--peer 1=127.0.0.1:7101 --peer 2=127.0.0.1:7102 --peer 3=127.0.0.1:7103)
start_host() {
  "$csvd" --id "$1" --data-dir "$dir/host$1" --listen "127.0.0.1:710$1" "${peers[@]}" \
    --cluster demo --key-file "$dir/cluster.key" --init >"$dir/host$1.out" 2>>"$dir/host$1.log" &
  hosts[$1]=$!
}
for i in 1 2 3; do start_host $i; done
for i in 1 2 3; do
  for _ in $(seq 100); do grep -q serving "$dir/host$i.out" 2>/dev/null && break; sleep 0.1; done
done
"$csvctl" volume add iscsi://127.0.0.1:3261/iqn.2026-11.io.csv:demo/1 --number 1
sleep 1.5   # Volume1's group elects its coordinator
"$csvctl" volume list
"$csvctl" cluster status

step "Move Volume1's coordinator to host 1, then to host 2 (Raft leader transfers)"
"$csvctl" volume move 1 --to 1
"$csvctl" volume move 1 --to 2

step "Kill host 2 (SIGKILL): hosts 1 and 3 elect a new coordinator"
kill -9 "${hosts[2]}"; wait "${hosts[2]}" 2>/dev/null || true
sleep 1.5
CSV_ENDPOINTS=127.0.0.1:7101,127.0.0.1:7103 "$csvctl" cluster status
start_host 2
sleep 1

step "Host 2 is back and has caught up"
"$csvctl" cluster status

step "Done"
echo "Files and host logs are in $dir. 'tools/test.sh' runs the suite; README.md says what comes next."
