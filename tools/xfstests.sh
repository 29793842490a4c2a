#!/usr/bin/env bash
# Runs xfstests, the regression suite Linux filesystems are tested with,
# against csv's FUSE mount.
#
#   tools/xfstests.sh quick          the whole `quick` group (about an hour
#                                    on 2 cores; docs/FILESYSTEM.md has the
#                                    table)
#   tools/xfstests.sh ci             the subset the test command runs (about
#                                    5 minutes): tools/xfstests/ci.list
#   tools/xfstests.sh generic/013 …  the tests named (any `check` arguments)
#
# What it does:
#   - builds xfstests from its source (XFSTESTS_SRC, else ../shared/xfstests
#     beside the repository) in target/xfstests/src, with Debian's packages
#     (tools/setup.sh installs them);
#   - makes the users the permission tests run as (fsgqa, fsgqa2,
#     123456-fsgqa) when missing;
#   - maps the mount type fuse.csv to fuse (tools/xfstests/fstype.patch);
#   - installs (a copy of) tools/xfstests/mount.fuse.csv as
#     /usr/sbin/mount.fuse.csv;
#   - prepares a test and a scratch volume, each a one-host csv cluster
#     with a LUN file under target/xfstests/run (two numbers from 901
#     up that no other csv mount on this machine has: xfstests finds and
#     unmounts its volumes by source name, csv-VolumeN), and
#     runs `check` with FSTYP=fuse FUSE_SUBTYP=.csv: every mount is csvd's
#     own FUSE mount, so every call goes through csvd, the coordinator and
#     the LUN;
#   - leaves out the tests in tools/xfstests/exclude (one reason each);
#   - prints each failure's diff, stops both volumes, and exits 1 if any
#     test failed.
# Results: target/xfstests/run/results (check.log, *.out.bad, *.full).
# (Read whole before it runs: an edit during a run does not change it.)
{
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

[ $# -ge 1 ] || { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
case $1 in
  quick) args=(-g quick) ;;
  ci) mapfile -t args < <(sed 's/#.*//; /^[[:space:]]*$/d; s/[[:space:]]//g' tools/xfstests/ci.list) ;;
  *) args=("$@") ;;
esac

skip() {
  echo "SKIP xfstests: $1"
  [ -n "${CSV_SKIP_LOG:-}" ] && echo "SKIP xfstests: $1" >>"$CSV_SKIP_LOG"
  exit 0
}
[ "$(id -u)" = 0 ] || skip "needs root (mount(8), users, /usr/sbin)"
[ -c /dev/fuse ] || skip "no /dev/fuse"

src=${XFSTESTS_SRC:-}
if [ -z "$src" ]; then
  for c in "$root/../shared/xfstests" /work/shared/xfstests; do
    [ -f "$c/check" ] && { src=$(cd "$c" && pwd); break; }
  done
fi
[ -n "$src" ] && [ -f "$src/check" ] ||
  skip "the xfstests source is not here (set XFSTESTS_SRC, or keep it at ../shared/xfstests)"

# Build (again when the source changed).
build=$root/target/xfstests/src
stamp="$src $(stat -c %Y "$src/check" "$src/VERSION" | tr '\n' ' ')"
if [ ! -x "$build/ltp/fsx" ] || [ "$(cat "$build/.csv-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "== building xfstests from $src"
  rm -rf "$build"
  mkdir -p "$build"
  cp -a "$src/." "$build/"
  # xfstests knows a FUSE file system's type as `fuse`; csv's mounts are
  # `fuse.csv` (as glusterfs's are `fuse.glusterfs`, which it maps the
  # same way).
  patch -s -d "$build" -p1 <tools/xfstests/fstype.patch
  (cd "$build" && make -j"$(nproc)" >"$root/target/xfstests/build.log" 2>&1) ||
    { tail -n 30 "$root/target/xfstests/build.log" >&2; echo "xfstests: build failed" >&2; exit 1; }
  echo "$stamp" >"$build/.csv-stamp"
fi

# The users the permission and ACL tests run as.
getent group fsgqa >/dev/null || groupadd fsgqa
for u in fsgqa fsgqa2 123456-fsgqa; do
  id "$u" >/dev/null 2>&1 || useradd -g fsgqa -m -N -s /bin/bash "$u" 2>/dev/null ||
    useradd -g fsgqa -m -N -s /bin/bash --badname "$u"
  home=$(getent passwd "$u" | cut -d: -f6)
  [ -d "$home" ] || { mkdir -p "$home" && chown "$u:fsgqa" "$home"; }
done


[ -x target/debug/csvd ] && [ -x target/debug/csvctl ] || cargo build --bins --locked

run=$root/target/xfstests/run
stop_volumes() {
  # Every csvd serving a volume under $run (an orderly stop, then a kill),
  # then whatever is still mounted there.
  local pids p
  pids=$(pgrep -f "csvd .*--data-dir $run/" || true)
  for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
  for p in $pids; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$p" 2>/dev/null || true
  done
  rm -f "$run"/*/csvd.pid
  for m in $(awk -v d="$run/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
}
stop_volumes
rm -rf --one-file-system "$run"
mkdir -p "$run/results" "$run/bin"
# The run's own copies: a build or an edit during the run does not
# change it.
cp target/debug/csvd target/debug/csvctl tools/xfstests/mount.fuse.csv "$run/bin/"
ln -sf "$run/bin/mount.fuse.csv" /usr/sbin/mount.fuse.csv

free_port() {
  local p
  for p in $(seq "$1" $(($1 + 200))); do
    ss -Htan "sport = :$p" 2>/dev/null | grep -q . || { echo "$p"; return; }
  done
  echo "$1"
}
port=$(free_port 17300)
# Volume numbers no other csv mount on this machine has (another
# clone's run, or one a killed run left): xfstests finds and unmounts its
# volumes by source name (csv-VolumeN).
taken() { awk -v s="csv-Volume$1" '$1 == s {f = 1} END {exit !f}' /proc/mounts; }
tn=901
while taken "$tn" || taken $((tn + 1)); do tn=$((tn + 2)); done
sn=$((tn + 1))
for v in test:$tn scratch:$sn; do
  name=${v%:*} n=${v#*:}
  d=$run/$name
  mkdir -p "$d/mnt/Volume$n"
  port=$(free_port $((port + 1)))
  cat >"$d/env" <<EOF
CSVD=$run/bin/csvd
CSVCTL=$run/bin/csvctl
PORT=$port
CLUSTER=xfstests-$name
SIZE=${XFSTESTS_SIZE:-8G}
EOF
done
trap stop_volumes EXIT

cat >"$run/local.config" <<EOF
export FSTYP=fuse
export FUSE_SUBTYP=.csv
export TEST_DEV=csv-Volume$tn
export TEST_DIR=$run/test/mnt/Volume$tn
export SCRATCH_DEV=csv-Volume$sn
export SCRATCH_MNT=$run/scratch/mnt/Volume$sn
export RESULT_BASE=$run/results
export MOUNT_OPTIONS=""
export TEST_FS_MOUNT_OPTS=""
EOF

# The test volume is mounted before check starts (check expects it).
mount -t fuse.csv "csv-Volume$tn" "$run/test/mnt/Volume$tn"

echo "== xfstests ${args[*]} on csv (FSTYP=fuse FUSE_SUBTYP=.csv)"
set +e
(cd "$build" && HOST_OPTIONS="$run/local.config" ./check -E "$root/tools/xfstests/exclude" "${args[@]}") |
  tee "$run/results/check.log"
status=${PIPESTATUS[0]}
set -e
for bad in "$run"/results/*/*.out.bad; do
  [ -e "$bad" ] || continue
  echo "== ${bad#"$run"/results/}"
  t=${bad%.out.bad}
  diff -u "$build/tests/${t#"$run"/results/}.out" "$bad" | head -n 40 || true
done
grep -q '^Failures:' "$run/results/check.log" && status=1
exit "$status"
}
