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
# A short fuzz pass over every parser (issue 15 §2); FUZZ_SECONDS per target.
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "SKIP fuzz: no nightly toolchain (rustup toolchain install nightly)"
elif ! cargo fuzz --version >/dev/null 2>&1; then
  echo "SKIP fuzz: cargo-fuzz is not installed (cargo install --locked cargo-fuzz)"
else
  fuzz/run.sh "${FUZZ_SECONDS:-20}"
fi
