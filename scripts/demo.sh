#!/usr/bin/env bash
# Builds ftvm and shows it working on this one machine. Needs root and /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup
cargo build --release --workspace
node=target/release/ftvm-node
echo "== the bundled guests: $($node guests | tr '\n' ' ')"
echo "== ftvm-node run --solo --guest selftest"
$node run --solo --guest selftest
echo "== the cost of one POLL exit on this host"
$node run --solo --guest exitbench --guest-args "poll 20000"
