#!/usr/bin/env bash
# Quick start: installs everything agex needs, builds it, and runs its main job on the
# bundled example host `bunk` (in a scratch copy, so this checkout stays untouched).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --locked -q -p agex-cli
exec bash scripts/demo.sh "$PWD/target/debug/agex"
