#!/usr/bin/env bash
# README command 1: installs what is needed, builds everything, and shows the product on this
# one machine (root and /dev/kvm needed): an FT pair — a witness and two nodes in their own
# network namespaces running one kv VM, a client namespace with stock redis-benchmark and a
# checker of acknowledged writes — surviving a clean stop (disks verified identical), a
# kill -9 of the primary under load (the client carries on, nothing acknowledged is lost), the
# dead node restarting and joining the survivor while it serves, and a second kill -9.
# `scripts/demo.sh --parts` shows the parts instead: solo, record/replay, witness, resync.
# Fails with a non-zero exit and one line saying what went wrong; cleans up, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--parts" ]]; then
  exec scripts/demo-parts.sh
fi
# Installing and building is noisy: it goes to a log, shown only if it fails.
log="${TMPDIR:-/tmp}/ftvm-demo-build.log"
echo "== installing what is needed and building (log: $log)"
if ! { scripts/setup && cargo build --release --workspace --bins; } >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  echo "demo: FAILED: setup or build (the whole log: $log)" >&2
  exit 1
fi
exec target/release/ftvm-demo
