#!/usr/bin/env bash
# The test command: installs what is missing, then checks formatting, lints
# and runs the whole suite. CI (.ci/run) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

tools/setup.sh --qemu-system
tools/cleanup.sh

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo build --bins (the integration tests run csvctl and friends)"
cargo build --workspace --bins --locked

echo "== cargo nextest run"
export CSV_SKIP_LOG="$PWD/target/csv-skips.log"
mkdir -p target
rm -f "$CSV_SKIP_LOG"
status=0
cargo nextest run --workspace --locked --profile ci || status=$?

echo "== xfstests, the subset of tools/xfstests/ci.list (tools/xfstests.sh ci)"
tools/xfstests.sh ci || status=$?

if [ -s "$CSV_SKIP_LOG" ]; then
  echo "== skipped tests (this machine lacks what they need)"
  sort "$CSV_SKIP_LOG"
fi

echo "== leftovers"
if ! tools/cleanup.sh --check; then
  echo "tests left the above behind; removing it" >&2
  tools/cleanup.sh
  status=1
else
  echo "none"
fi
exit $status
