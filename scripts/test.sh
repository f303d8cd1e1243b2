#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy (host and guest workspaces) and the whole test
# suite, in release mode (the same build the demo uses). Needs root and /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup
cargo fmt --all --check
(cd guest && cargo fmt --all --check)
cargo clippy --release --workspace --all-targets -- -D warnings
(cd guest && cargo clippy --release -- -D warnings)
cargo test --release --workspace
cargo build --release --workspace --bins && target/release/ftvm-soak --trials 3 --seed 1  # short soak: docs/testing.md
scripts/check-release-hooks.sh
