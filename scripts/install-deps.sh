#!/usr/bin/env bash
# Installs what agex and its test suite need on Debian/Ubuntu, idempotently:
# age, restic, borg, rclone, sshd, PostgreSQL, sqlite3, systemd-analyze, nix-instantiate,
# a Rust toolchain and cargo-nextest. Safe to run again; does nothing when all is there.
set -euo pipefail

need_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

packages=(age restic borgbackup rclone openssh-server openssh-client postgresql sqlite3
          systemd coreutils procps psmisc ca-certificates curl git build-essential pkg-config
          time bc nix-bin)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  need_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "installing Rust with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy >/dev/null 2>&1 || true
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest >/dev/null
fi
echo "dependencies ready: $(age --version) / restic $(restic version | awk '{print $2}') / $(borg --version)"
