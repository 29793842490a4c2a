#!/usr/bin/env bash
# Finds what csv test fixtures left on this host (a test killed before its
# fixtures' Drop ran): tgtd daemons, network namespaces, FUSE mounts, temp
# directories. Every such name carries the prefix "csvt-".
#   tools/cleanup.sh          remove them, say what was removed
#   tools/cleanup.sh --check  only list them; exit 1 when any exist
set -uo pipefail
check=0
[ "${1:-}" = --check ] && check=1
found=0

mounts=$(awk '$2 ~ /csvt-/ {print $2}' /proc/mounts)
for m in $mounts; do
  found=1; echo "leftover mount: $m"
  [ $check = 1 ] || fusermount3 -uz "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
done

pids=$(pgrep -f '(tgtd|istgt|csvd|csv-vmm|qemu-system-x86_64) .*csvt-' || true)
for p in $pids; do
  found=1; echo "leftover daemon: pid $p"
  [ $check = 1 ] || kill -9 "$p" 2>/dev/null
done

if command -v ip >/dev/null; then
  for ns in $(ip netns list 2>/dev/null | awk '/^csvt-/ {print $1}'); do
    found=1; echo "leftover netns: $ns"
    [ $check = 1 ] || ip netns delete "$ns" 2>/dev/null
  done
fi

if [ $check = 0 ]; then
  # Temp dirs of killed tests (not of running ones: only those over an hour old).
  find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'csvt-*' -mmin +60 -exec rm -rf {} + 2>/dev/null
fi
[ $check = 1 ] && [ $found = 1 ] && exit 1
exit 0
