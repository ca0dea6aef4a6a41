#!/usr/bin/env bash
# The full test suite, as CI runs it: installs what it needs (idempotent), then
# formatting, lints, and every test with cargo-nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo nextest run --workspace --locked --no-fail-fast --profile ci
