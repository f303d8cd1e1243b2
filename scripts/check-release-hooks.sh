#!/usr/bin/env bash
# A release build (no dev-dependencies, so no `test-hooks` feature) must not contain the
# fault-injection hooks that the tests use: `ftvm-resync serve --fault` is refused as an
# unknown argument. Run after the tests (which build the binary with the hooks).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p disksync --bin ftvm-resync
out=$(target/release/ftvm-resync serve --fault close=1 --disk /nonexistent --listen 127.0.0.1:0 \
    --tls /nonexistent --node n 2>&1 || true)
if ! grep -q "unexpected argument '--fault'" <<<"$out"; then
    echo "check-release-hooks: the release ftvm-resync accepts the --fault test hook:" >&2
    echo "$out" >&2
    exit 1
fi
echo "check-release-hooks: the release ftvm-resync has no fault-injection hooks"
