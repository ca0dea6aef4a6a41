#!/usr/bin/env bash
# Benchmark: re-encrypting 1000 secrets. agex rekey --force (in-process, all cores)
# against what agenix does: one `age -d | age -e` pipeline per file, serially.
# Both run in the same invocation on the same files. Last line: ratio: <age loop / agex>,
# with agex's time the median of RUNS (default 11) runs.
#
# Where the files live matters for agex (its CPU work is ~0.15 s, so file creation and
# renames weigh): as root, both run on a fresh ext4 with mkfs's defaults (journal) on a
# loop device whose image sits on this machine's disk, i.e. a normal install's
# filesystem. Without root, or with BENCH_DIR=<dir>, they run there instead. The
# filesystem used is printed. (This sandbox's own root is ext4 without a journal and
# with online discard: there ext4 scans recently freed inodes on every create and frees
# blocks synchronously on rename, which costs agex 0.1-0.4 s, varying with what was
# deleted in the last minute.)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${N:-1000}"
cargo build --release -q -p agex-cli
AGEX="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/release/agex"   # where cargo built it (CARGO_TARGET_DIR honoured)

mnt=""
img=""
cleanup() {
  cd /
  if [ -n "$mnt" ]; then umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true; rmdir "$mnt" 2>/dev/null || true; fi
  if [ -n "$img" ]; then rm -f "$img"; fi
  if [ -n "${work:-}" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

if [ -n "${BENCH_DIR:-}" ]; then
  work="$BENCH_DIR/agex-rekey-bench.$$"
  mkdir -p "$work"
elif [ "$(id -u)" = 0 ] && command -v mkfs.ext4 > /dev/null; then
  img="$(mktemp /var/tmp/agex-rekey-bench.XXXXXX.img)"
  truncate -s 1G "$img"
  mkfs.ext4 -q -F "$img"
  mnt="$(mktemp -d /tmp/agex-rekey-bench.XXXXXX)"
  mount -o loop "$img" "$mnt"
  work="$mnt/work"
  mkdir "$work"
else
  echo "note: not root, so running in $TMPDIR's filesystem (set BENCH_DIR to choose)" >&2
  work="$(mktemp -d)"
fi
cd "$work"

age-keygen -o admin.txt 2>/dev/null
admin_pub="$(age-keygen -y admin.txt)"
ssh-keygen -q -t ed25519 -N '' -C host -f host_key
host_pub="$(cat host_key.pub)"
mkdir -p secrets
cat > agex.toml <<TOML
[keys]
admin = "$admin_pub"
[groups]
admins = ["admin"]
[hosts.bench]
key = "$host_pub"
TOML
{
  for i in $(seq -w 1 "$N"); do
    printf '[secrets.s%s]\nrecipients = ["admins", "bench"]\ngenerator = { kind = "password", length = 32 }\n' "$i"
  done
} > secrets/secrets.toml
"$AGEX" generate > /dev/null
fs="$(findmnt -no FSTYPE,SOURCE --target "$work" | tail -1 | tr -s ' ')"
if [ "${fs%% *}" = ext4 ]; then
  if dumpe2fs -h "${fs#* }" 2>/dev/null | grep -q has_journal; then fs="$fs (journal)"; else fs="$fs (no journal)"; fi
fi
echo "secrets: $N (each to 1 X25519 + 1 ssh-ed25519 recipient), cores: $(nproc), filesystem: $fs"

now() { date +%s.%N; }

# agex's run is short (a quarter of a second), so one scheduling hiccup of this VM moves
# it by a fifth: it runs RUNS times and the median counts. The age loop's 1000 processes
# average that out within its one run.
RUNS="${RUNS:-11}"
agex_runs=()
for _ in $(seq "$RUNS"); do
  t0=$(now)
  "$AGEX" -i admin.txt rekey --force > /dev/null
  t1=$(now)
  agex_runs+=("$(echo "$t1 - $t0" | bc -l)")
done
agex_s=$(printf '%s\n' "${agex_runs[@]}" | sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}')

t0=$(now)
for f in secrets/*.age; do
  age -d -i admin.txt "$f" | age -e -r "$admin_pub" -R host_key.pub -o "$f.new"
  mv "$f.new" "$f"
done
t1=$(now)
age_s=$(echo "$t1 - $t0" | bc -l)

"$AGEX" -i admin.txt rekey > /dev/null   # the age loop bypassed the lock; record it again
"$AGEX" check > /dev/null

printf 'agex rekey --force runs:   %s s\n' "$(printf '%.3f ' "${agex_runs[@]}")"
printf 'agex rekey --force:        %8.3f s (median of %d)\n' "$agex_s" "$RUNS"
printf 'serial age -d | age -e:    %8.3f s\n' "$age_s"
printf 'ratio: %.1f\n' "$(echo "$age_s / $agex_s" | bc -l)"
