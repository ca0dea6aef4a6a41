#!/usr/bin/env bash
# Benchmark: restores, agex against the peer binaries on the same snapshots, measured in
# the same run, for the two shapes that stress a restorer:
#
#   huge    one large, highly compressible file (a SQL dump's shape; HUGE_MB, default 1100)
#   files   many small files (FILES, default 150000, ~1 KB each)
#
# For each: `agex restore --to` from the Restic repository (rustic_core restore plus
# verification of every file against the manifest) against `restic restore` of the same
# snapshot (no verification), then `agex restore --to` from the Borg repository against
# `borg extract`, then `agex drill` of both repositories.
#
# Wall, CPU (user+sys, children included) and peak RSS come from /usr/bin/time. Prints
# per case `ratio restore rss <case>:` (restic's peak RSS / agex's, target >= 1.0) and
# `ratio restore time <case>:` (restic's wall time / agex's, target >= 0.83), then
# `ratio restore rss:` and `ratio restore time:`, the worse of the two cases. The
# repositories are local directories written by `agex backup`. AGEX=path picks the
# binary (default: a release build, made here; CARGO_TARGET_DIR is honoured).
set -euo pipefail
cd "$(dirname "$0")/.."
for t in restic borg /usr/bin/time python3; do
  command -v "$t" > /dev/null || { echo "missing $t: run scripts/install-deps.sh" >&2; exit 2; }
done
HUGE_MB="${HUGE_MB:-1100}"
FILES="${FILES:-150000}"
if [ -z "${AGEX:-}" ]; then
  cargo build --release -q -p agex-cli
  AGEX="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/release/agex"   # where cargo built it (CARGO_TARGET_DIR honoured)
fi
work="$(mktemp -d /var/tmp/agex-bench-restore.XXXXXX)"
pass="$(mktemp -d /dev/shm/agex-bench-restore.XXXXXX)"
trap 'rm -rf "$work" "$pass"' EXIT
cfg="$work/config" root="$work/root"
mkdir -p "$cfg/policies" "$root/srv/huge" "$root/srv/files"
cp -r agex.toml secrets examples "$cfg/"
# Both repositories become local directories; what only a remote one needs (credentials,
# pinned host keys, upload limits) and the example's healthchecks ping go.
python3 - "$cfg/agex.toml" "$work" <<'PY'
import re, sys
path, work = sys.argv[1], sys.argv[2]
out, section = [], ""
for line in open(path).read().splitlines():
    t = line.strip()
    if t.startswith("["):
        section = t.strip("[]")
    key = re.split(r"[ =]", t, maxsplit=1)[0]
    if section in ("repositories.offsite-restic", "repositories.offsite-borg"):
        if key == "url":
            line = f'url = "{work}/{section.split("-")[-1]}"'
        elif key in ("env_secret", "known_hosts", "limit_upload", "limit_download", "ssh_key_secret"):
            continue
    if section == "notify" and key == "healthchecks":
        continue
    out.append(line)
open(path, "w").write("\n".join(out) + "\n")
PY
printf '\n[backup]\nlock_wait = 5\n' >> "$cfg/agex.toml"
for svc in huge files; do
  printf 'paths = ["/srv/%s"]\nschedule = "*-*-* 03:00:00"\n' "$svc" > "$cfg/policies/$svc.toml"
done

echo "generating data: one ${HUGE_MB} MB compressible file, $FILES small files ..."
python3 - "$root" "$HUGE_MB" "$FILES" <<'PY'
import os, random, sys
root, huge_mb, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(7)
words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
with open(f"{root}/srv/huge/dump.sql", "w") as f:
    size, i = 0, 0
    while size < huge_mb * 1_000_000:
        rows = "".join(f"{i + k}\t{rnd.choice(words)} {rnd.choice(words)}\t2026-11-{(i + k) % 28 + 1:02d}\t{(i + k) * 7 % 1000}\n" for k in range(1000))
        f.write(rows)
        size += len(rows)
        i += 1000
for n in range(files):
    d = f"{root}/srv/files/d{n // 1000:03d}"
    if n % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{n}", "wb") as f:
        f.write(os.urandom(512) + b"x" * 512)
PY
echo "data: $(du -sh "$root/srv/huge" | cut -f1) huge, $(du -sh "$root/srv/files" | cut -f1) in small files"

AG=("$AGEX" -C "$cfg" -i "$cfg/examples/keys/admin.txt" --root "$root")
agex() { "${AG[@]}" "$@"; }
agex repo init offsite-restic > /dev/null
agex repo init offsite-borg > /dev/null
agex backup > /dev/null 2>&1
agex decrypt restic-password > "$pass/restic"
agex decrypt borg-passphrase > "$pass/borg"

# measure NAME CMD...: runs CMD, prints a line and leaves "wall rss" in $work/last.
measure() {
  local name="$1"; shift
  /usr/bin/time -f "%e %U %S %M" -o "$work/time" "$@" > /dev/null 2>&1
  read -r wall user sys rss < "$work/time"
  printf '%-34s %7.2f s wall %7.2f s cpu %8d KB peak RSS\n' "$name" "$wall" \
    "$(python3 -c "print($user + $sys)")" "$rss"
  echo "$wall $rss" > "$work/last"
}
ratio() { python3 -c "print(f'{$1 / max($2, 1e-9):.2f}')"; }

declare -A rss_ratio time_ratio
for svc in huge files; do
  echo "== $svc"
  measure "agex restore --to (restic)" "${AG[@]}" restore --service "$svc" --repo offsite-restic --to "$work/out-agex"
  read -r agex_wall agex_rss < "$work/last"
  rm -rf "$work/out-agex"
  measure "restic restore (binary)" restic -r "$work/restic" --password-file "$pass/restic" --no-cache \
    restore latest --tag "service=$svc" --target "$work/out-restic"
  read -r restic_wall restic_rss < "$work/last"
  rm -rf "$work/out-restic"
  measure "agex restore --to (borg)" "${AG[@]}" restore --service "$svc" --repo offsite-borg --to "$work/out-agex"
  rm -rf "$work/out-agex"
  archive="$(BORG_PASSCOMMAND="cat $pass/borg" borg list --short --glob-archives "$svc-*" "$work/borg" | tail -n 1)"
  mkdir -p "$work/out-borg"
  measure "borg extract (binary)" sh -c "cd '$work/out-borg' && BORG_PASSCOMMAND='cat $pass/borg' borg extract '$work/borg::$archive'"
  rm -rf "$work/out-borg"
  measure "agex drill (both)" "${AG[@]}" drill --service "$svc"
  rss_ratio[$svc]="$(ratio "$restic_rss" "$agex_rss")"
  time_ratio[$svc]="$(ratio "$restic_wall" "$agex_wall")"
done
for svc in huge files; do
  echo "ratio restore rss $svc: ${rss_ratio[$svc]}"
  echo "ratio restore time $svc: ${time_ratio[$svc]}"
done
min() { python3 -c "print(min($1, $2))"; }
echo "ratio restore rss: $(min "${rss_ratio[huge]}" "${rss_ratio[files]}")"
echo "ratio restore time: $(min "${time_ratio[huge]}" "${time_ratio[files]}")"
