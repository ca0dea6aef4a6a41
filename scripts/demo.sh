#!/usr/bin/env bash
# Runs agex on a scratch copy of the bundled `bunk` example. Usage: demo.sh [AGEX_BINARY]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
AGEX="${1:-$repo/target/debug/agex}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$repo/agex.toml" "$repo/secrets" "$repo/policies" "$repo/examples" "$work/" 2>/dev/null || true
cd "$work"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

echo "agex demo on the example host 'bunk' (throwaway demo keys from examples/keys/)"
step "$AGEX" check
step "$AGEX" secrets list
printf '\n\033[1m$ agex -i examples/keys/admin.txt decrypt vikunja-jwt-secret\033[0m\n'
"$AGEX" -i examples/keys/admin.txt decrypt vikunja-jwt-secret | cut -c1-16 | sed 's/$/… (cut)/'
step "$AGEX" rekey --dry-run
echo
echo "demo finished: every secret checked without a key, one decrypted with the admin key."
