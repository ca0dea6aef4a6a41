#!/usr/bin/env bash
# Benchmark: activating 1000 secrets for one host. `agex activate` (decrypt in parallel in
# one process, place one file per service with owner and mode on a RAM-backed filesystem,
# render, switch) against agenix's way: one `age -d -i <host key>` process per file into
# a fresh directory. Both run in the same invocation on the same files. The generation is
# built first with `agex build` (like `nix build` before agenix runs) and that time is
# shown on its own; the timed `agex activate` still loads the config and checks the
# build is current. Last line: ratio: <agenix-way time / agex activate time>.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${N:-1000}"
cargo build --release -q -p agex-cli
AGEX="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/release/agex"   # where cargo built it (CARGO_TARGET_DIR honoured)
work="$(mktemp -d)"
root="$work/root"
fresh="$(mktemp -d /dev/shm/agenix-way.XXXXXX 2>/dev/null || mktemp -d)"
cleanup() {
  umount -l "$root/run/agex.d" 2>/dev/null || true
  rm -rf "$work" "$fresh"
}
trap cleanup EXIT
cd "$work"

age-keygen -o admin.txt 2>/dev/null
admin_pub="$(age-keygen -y admin.txt)"
mkdir -p "$root/etc/ssh" secrets
hostkey="$root/etc/ssh/ssh_host_ed25519_key"
ssh-keygen -q -t ed25519 -N '' -C root@bench -f "$hostkey"
cat > agex.toml <<TOML
[keys]
admin = "$admin_pub"
[groups]
admins = ["admin"]
[hosts.bench]
key = "$(cat "$hostkey.pub")"
TOML
{
  for i in $(seq -w 1 "$N"); do
    printf '[secrets.s%s]\nrecipients = ["admins", "bench"]\nservices = ["app%d.service"]\ngenerator = { kind = "password", length = 32 }\n' \
      "$i" "$((10#$i % 50))"
  done
} > secrets/secrets.toml
"$AGEX" generate > /dev/null

flags=(--root "$root" --host bench --no-restart)
[ "$(id -u)" = 0 ] || flags+=(--allow-unmounted)   # cannot mount a ramfs without root
echo "secrets: $N (each to 1 X25519 + 1 ssh-ed25519 recipient), services: 50, cores: $(nproc)"

now() { date +%s.%N; }

t0=$(now)
"$AGEX" --root "$root" --host bench build > /dev/null
t1=$(now)
build_s=$(echo "$t1 - $t0" | bc -l)

t0=$(now)
"$AGEX" activate "${flags[@]}" > /dev/null 2>&1
t1=$(now)
agex_s=$(echo "$t1 - $t0" | bc -l)

t0=$(now)
for f in secrets/*.age; do
  age -d -i "$hostkey" -o "$fresh/$(basename "$f" .age)" "$f"
done
t1=$(now)
age_s=$(echo "$t1 - $t0" | bc -l)

files=$(find "$root/run/agex/" -type f | wc -l)
[ "$files" -ge "$N" ] || { echo "agex placed only $files files" >&2; exit 1; }
[ "$(ls "$fresh" | wc -l)" = "$N" ] || { echo "the age loop did not decrypt every file" >&2; exit 1; }
cmp -s "$fresh/s0001" "$root/run/agex/app1.service/s0001" || { echo "contents differ" >&2; exit 1; }

printf 'agex build (store entry, once per change):   %8.3f s\n' "$build_s"
printf 'agex activate:                               %8.3f s\n' "$agex_s"
printf 'agenix way (one age -d per file):            %8.3f s\n' "$age_s"
printf 'ratio: %.1f\n' "$(echo "$age_s / $agex_s" | bc -l)"
