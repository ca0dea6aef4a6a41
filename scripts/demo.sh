#!/usr/bin/env bash
# Runs agex on a scratch copy of the bundled `bunk` example. Usage: demo.sh [AGEX_BINARY]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
AGEX="${1:-$repo/target/debug/agex}"
work="$(mktemp -d)"
cleanup() {
  umount -l "$work/root/run/agex.d" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cp -r "$repo/agex.toml" "$repo/secrets" "$repo/policies" "$repo/examples" "$work/" 2>/dev/null || true
cd "$work"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

echo "agex demo on the example host 'bunk' (throwaway demo keys from examples/keys/)"
step "$AGEX" check
step "$AGEX" secrets list
printf '\n\033[1m$ agex -i examples/keys/admin.txt decrypt vikunja-jwt-secret\033[0m\n'
"$AGEX" -i examples/keys/admin.txt decrypt vikunja-jwt-secret | cut -c1-16 | sed 's/$/… (cut)/'
step "$AGEX" rekey --dry-run

# Activation under a scratch root: the host key where bunk has it, and a user database
# for the owners the rules name (mapped to the current user when not root, so chown works).
root="$work/root"
mkdir -p "$root/etc/ssh"
install -m 0600 examples/keys/bunk_ssh_host_ed25519_key "$root/etc/ssh/ssh_host_ed25519_key"
me_u=0 me_g=0 flags=()
if [ "$(id -u)" != 0 ]; then
  me_u="$(id -u)" me_g="$(id -g)" flags=(--allow-unmounted)   # no ramfs mount without root
fi
n=1000
echo "root:x:$me_u:$me_g::/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:$me_g:" > "$root/etc/group"
for u in actual authelia-main caddy forgejo grafana hass immich jellyfin mealie miniflux n8n \
         paperless vaultwarden vikunja systemd-network; do
  n=$((n + 1))
  [ "$me_u" = 0 ] && id_u=$n id_g=$n || id_u=$me_u id_g=$me_g
  echo "$u:x:$id_u:$id_g::/nonexistent:/usr/sbin/nologin" >> "$root/etc/passwd"
  echo "$u:x:$id_g:" >> "$root/etc/group"
done
[ "$me_u" = 0 ] && echo "smtp-users:x:2000:" >> "$root/etc/group" || echo "smtp-users:x:$me_g:" >> "$root/etc/group"

step "$AGEX" --root "$root" --host bunk build
step "$AGEX" --root "$root" --host bunk activate --no-restart "${flags[@]}"
printf '\n\033[1m$ find root/run root/var/lib/hass (the tree activation produced)\033[0m\n'
echo "(owners are ids from root/etc/passwd; dot files, not shown, hold the digest key, keyed digests and a marker)"
(cd "$root" && find run var/lib/hass -name '.*' -prune \
  -o \( -type l -printf '%M %-5u %-5g %p -> %l\n' \) -o -printf '%M %-5u %-5g %p\n' | sort -k4)
printf '\n\033[1m$ printf new | agex encrypt secrets/grafana-admin-password.age; agex diff; agex activate\033[0m\n'
printf 'a-new-grafana-password' | "$AGEX" encrypt secrets/grafana-admin-password.age
"$AGEX" --root "$root" --host bunk diff
"$AGEX" --root "$root" --host bunk activate --no-restart "${flags[@]}"
step "$AGEX" --root "$root" generations
step "$AGEX" --root "$root" rollback --no-restart "${flags[@]}"

# Backups: the example's offsite repositories on servers the demo starts on loopback
# (as root with SeaweedFS installed): an S3 server for offsite-restic and an sshd for
# offsite-borg, whose host key `agex repo trust` pins. Otherwise local directories.
sed -i -e '/^healthchecks *=/d' agex.toml   # no ping to the demo healthchecks URL
weed="${AGEX_WEED:-/opt/agex-test/seaweedfs/bin/weed}"
pids=()
stop_servers() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -n "${borg_dir:-}" ] && rm -rf "$borg_dir"
  cleanup
}
trap stop_servers EXIT
# A free port whose gRPC companion (weed listens on port + 10000 too) is a port as well.
free_port() { python3 -c '
import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if p < 55000: print(p); break'; }
if [ "$(id -u)" = 0 ] && [ -x "$weed" ] && [ -x /usr/sbin/sshd ] && command -v python3 > /dev/null; then
  echo; echo "starting an S3 server (SeaweedFS) and an sshd on 127.0.0.1 for the two offsite repositories"
  s3port=$(free_port)
  mkdir -p "$work/weed"
  echo '{"identities":[{"name":"demo","credentials":[{"accessKey":"AKIDDEMO","secretKey":"demosecretkey1234"}],"actions":["Admin","Read","Write","List","Tagging"]}]}' > "$work/weed/s3.json"
  "$weed" server -dir="$work/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3 -s3.port="$s3port" \
    -s3.config="$work/weed/s3.json" -master.port="$(free_port)" -volume.port="$(free_port)" \
    -filer.port="$(free_port)" -iam.port="$(free_port)" -s3.port.iceberg=0 -s3.port.lance=0 \
    > "$work/weed/log" 2>&1 &
  pids+=($!)
  disown
  id agexdemo > /dev/null 2>&1 || { useradd -m -s /bin/sh agexdemo && usermod -p '*' agexdemo; }
  home="$(getent passwd agexdemo | cut -d: -f6)"
  borg_dir="$home/bunk-borg-$$"
  mkdir -p /run/sshd "$work/sshd" "$home/.ssh"
  cp secrets/borg-ssh-key.pub "$home/.ssh/authorized_keys"
  chown -R agexdemo: "$home/.ssh"
  ssh-keygen -q -t ed25519 -N '' -f "$work/sshd/hostkey"
  sshport=$(free_port)
  printf 'Port %s\nListenAddress 127.0.0.1\nHostKey %s\nPidFile %s\nUsePAM no\nPasswordAuthentication no\nAllowUsers agexdemo\n' \
    "$sshport" "$work/sshd/hostkey" "$work/sshd/pid" > "$work/sshd/config"
  /usr/sbin/sshd -D -f "$work/sshd/config" -E "$work/sshd/log" &
  pids+=($!)
  disown
  up=""
  for _ in $(seq 1 120); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$s3port/")" = 403 ] && { up=1; break; }
    sleep 0.5
  done
  [ -n "$up" ] || { echo "the S3 server did not come up:" >&2; tail -20 "$work/weed/log" >&2; exit 1; }
  sed -i -e "s#^url *= \"s3:.*#url             = \"s3:http://127.0.0.1:$s3port/bunk-restic\"#" \
    -e "s#^url *= \"ssh://.*#url             = \"ssh://agexdemo@127.0.0.1:$sshport/./$(basename "$borg_dir")\"#" \
    -e '/^known_hosts/d' agex.toml
  printf 'AWS_ACCESS_KEY_ID=AKIDDEMO\nAWS_SECRET_ACCESS_KEY=demosecretkey1234\n' | "$AGEX" encrypt secrets/b2-credentials.age
  step "$AGEX" repo trust offsite-borg --yes
else
  echo; echo "(not root or no SeaweedFS: the offsite repositories are local directories for this demo)"
  sed -i -e "s#^url *= \"s3:.*#url = \"$work/restic\"#" -e "s#^url *= \"ssh://.*#url = \"$work/borg\"#" \
    -e '/^ssh_key_secret/d' -e '/^env_secret/d' -e '/^known_hosts/d' -e '/^limit_upload/d' agex.toml
fi
mkdir -p "$root/var/lib/vikunja/files" "$root/var/lib/mealie"
echo "an attachment" > "$root/var/lib/vikunja/files/task-1.txt"
sqlite3 "$root/var/lib/vikunja/vikunja.db" "CREATE TABLE tasks(id INTEGER PRIMARY KEY, title TEXT); INSERT INTO tasks(title) VALUES ('water the plants'), ('renew the domain');"
step "$AGEX" -i examples/keys/admin.txt --root "$root" repo init offsite-restic
step "$AGEX" -i examples/keys/admin.txt --root "$root" repo init offsite-borg
step "$AGEX" -i examples/keys/admin.txt --root "$root" backup --service vikunja
step "$AGEX" -i examples/keys/admin.txt --root "$root" snapshots
step "$AGEX" -i examples/keys/admin.txt --root "$root" drill --service vikunja
step "$AGEX" --root "$root" status
step "$AGEX" --root "$root" --host bunk systemd generate --out "$work/units"
ls "$work/units" | head -8; echo "… ($(ls "$work/units" | wc -l) units and timers for bunk)"
echo
echo "demo finished: every secret checked without a key, one decrypted with the admin key,"
echo "bunk's generation built, activated (one directory per service), changed and rolled back,"
echo "vikunja's files and SQLite database backed up to a Restic (S3) and a Borg (ssh) repository at once,"
echo "both snapshots restored into scratch space and verified (drill), and bunk's timers generated."
