#!/usr/bin/env bash
# The packaging test. It INSTALLS PACKAGES ON THIS MACHINE and removes them again, so it runs
# as root on a disposable machine (CI runs it from .ci/run):
#
#   1. builds the three packages and a repository signed with a throwaway GPG key;
#   2. adds it with signed-by, `apt-get install sensei-agent sensei-control-plane sensei-cli`;
#   3. checks the binaries, their man pages, the users, the units (systemd-analyze verify and
#      security), the conffiles and lintian;
#   4. runs the installed control plane as its user, checks /healthz's binary SHA-256
#      against the packaged binary, signs in with the installed `sensei`, enrolls the agent
#      as root with the command it prints, and runs the agent as the service user;
#   5. upgrades to a newer build through the agent's upgrade unit, as an upgrade rollout
#      does (identity and config survive, the binary reports the new version; a malformed
#      version is refused and installs nothing), refuses a repository signed with another
#      key, removes (identity kept) and purges (identity and users gone).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test-apt: run as root on a disposable machine" >&2; exit 2; }

work=$(mktemp -d /tmp/sensei-apt.XXXXXX)
chmod 755 "$work"
list=/etc/apt/sources.list.d/sensei-test.list
keyring=/usr/share/keyrings/sensei-test-archive-keyring.gpg
pids=()
cleanup() {
  for pid in "${pids[@]}"; do [ "$pid" = 0 ] || kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -f "$list" "$keyring"
  rm -rf "$work"
}
trap cleanup EXIT

step() { echo; echo "== test-apt: $*"; }
fail() { echo "test-apt: FAILED: $*" >&2; exit 1; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

# Only our repository: the test must not depend on (or wait for) any other source.
apt_only() {
  apt-get -q -o Dir::Etc::sourcelist="$list" -o Dir::Etc::sourceparts=- \
    -o APT::Get::List-Cleanup=0 "$@"
}

step "a throwaway signing key, and another one apt must refuse"
export GNUPGHOME="$work/gnupg"
mkdir -m 700 "$GNUPGHOME"
gpg --batch --passphrase '' --quick-gen-key "Sensei test repository <repo@sensei.test>" ed25519 sign never 2>/dev/null
key=$(gpg --batch --list-keys --with-colons repo@sensei.test | awk -F: '/^fpr/ {print $10; exit}')
gpg --batch --passphrase '' --quick-gen-key "Someone else <evil@sensei.test>" ed25519 sign never 2>/dev/null
evil=$(gpg --batch --list-keys --with-colons evil@sensei.test | awk -F: '/^fpr/ {print $10; exit}')

step "build the packages and the repository"
packaging/build-repo.sh "$work/repo" "$key"
cp "$work/repo/sensei-archive-keyring.gpg" "$keyring"
chmod 644 "$keyring"
echo "deb [signed-by=$keyring] file:$work/repo stable main" > "$list"

step "lintian (errors fail the test; the warnings left are explained in docs/packaging.md)"
for deb in "$work"/repo/pool/main/s/*/*.deb; do
  lintian --fail-on error --suppress-tags non-standard-file-perm "$deb"
done

step "apt-get install from the signed repository (over a data directory another user left)"
apt_only update
# What a quickstart run as root used to leave in the packaged control plane's directory.
mkdir -p /var/lib/sensei/postgres
echo 15 > /var/lib/sensei/postgres/PG_VERSION
DEBIAN_FRONTEND=noninteractive apt_only install -y sensei-agent sensei-control-plane sensei-cli 2>&1 | tee "$work/install.log"
grep -q "/var/lib/sensei holds files the sensei user does not own" "$work/install.log" \
  || fail "postinst did not explain the foreign data directory"
grep -q "/var/lib/sensei/postgres, owned by root" "$work/install.log" || fail "postinst did not name the file"
rm -rf /var/lib/sensei/postgres
sensei-agent --version | grep -q "^sensei-agent 0.1.0" || fail "sensei-agent --version"
sensei-control-plane --version | grep -q "^sensei-control-plane 0.1.0" || fail "control plane --version"
sensei --version | grep -q "^sensei 0.1.0" || fail "sensei --version"
for page in sensei-agent sensei-agent-enroll sensei-control-plane sensei-control-plane-serve sensei sensei-deploy sensei-rollout-start; do
  [ -f "/usr/share/man/man1/$page.1.gz" ] || fail "no man page $page(1)"
done
[ -f /usr/share/bash-completion/completions/sensei ] || fail "no bash completion for sensei"
getent passwd sensei-agent >/dev/null || fail "no sensei-agent user"
getent passwd sensei-deploy >/dev/null || fail "no sensei-deploy user"
grep -q '^deploy_user = "sensei-deploy"' /etc/sensei/agent.toml || fail "agent.toml names no deploy user"
getent passwd sensei >/dev/null || fail "no sensei user"
[ "$(stat -c '%U %a' /var/lib/sensei-agent)" = "sensei-agent 700" ] || fail "state dir owner/mode"
[ "$(stat -c '%U:%G %a' /etc/sensei/control-plane.env)" = "root:sensei 640" ] || fail "env file mode"
dpkg-query -W -f='${Conffiles}\n' sensei-agent | grep -q /etc/sensei/agent.toml || fail "agent.toml is not a conffile"
dpkg-query -W -f='${Conffiles}\n' sensei-control-plane | grep -q /etc/sensei/control-plane.env || fail "control-plane.env is not a conffile"
for unit in sensei-agent.service sensei-agent.path sensei-control-plane.service; do
  [ -f "/usr/lib/systemd/system/$unit" ] || fail "$unit missing"
done
grep -q '^net.core.rmem_max = 33554432$' /usr/lib/sysctl.d/60-sensei-control-plane.conf \
  || fail "the gateway's socket buffer ceiling is not installed"

step "systemd-analyze verify and security"
systemd-analyze verify /usr/lib/systemd/system/sensei-agent.service \
  /usr/lib/systemd/system/sensei-agent.path /usr/lib/systemd/system/sensei-control-plane.service
# The upgrade template, verified as the instance an upgrade to 0.1.1-1 starts.
mkdir -p "$work/units"
ln -s /usr/lib/systemd/system/sensei-agent-upgrade@.service "$work/units/sensei-agent-upgrade@0.1.1\x2d1.service"
systemd-analyze verify "$work/units/sensei-agent-upgrade@0.1.1\x2d1.service"
[ -x /usr/lib/sensei-agent/upgrade ] || fail "the upgrade script is missing"
[ -f /usr/share/polkit-1/rules.d/50-sensei-agent-upgrade.rules ] || fail "the polkit rule is missing"
for unit in sensei-agent.service sensei-control-plane.service; do
  systemd-analyze security --offline=true --no-pager "/usr/lib/systemd/system/$unit" | tail -n 1
done

step "the installed control plane, run as its user"
api_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
agent_port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
field_key=$(sensei-control-plane generate-field-key)
# Signup is closed by default: the operator makes the first owner, before the service runs.
echo "packaging test password" | setpriv --reuid sensei --regid sensei --init-groups \
  env -u DATABASE_URL HOME=/var/lib/sensei CODESENSEI_FIELD_KEY="$field_key" SENSEI_DATA_DIR=/var/lib/sensei \
  sensei-control-plane create-owner \
  --email ops@sensei.test --account Ops --password-stdin > "$work/create-owner.log" 2>&1 \
  || { cat "$work/create-owner.log"; fail "create-owner failed"; }
# setpriv executes in place (no forking wrapper), so $! is the control plane itself.
setpriv --reuid sensei --regid sensei --init-groups env -u DATABASE_URL HOME=/var/lib/sensei CODESENSEI_FIELD_KEY="$field_key" SENSEI_DATA_DIR=/var/lib/sensei \
  sensei-control-plane serve --api-addr "127.0.0.1:$api_port" --agent-addr "127.0.0.1:$agent_port" \
  > "$work/control-plane.log" 2>&1 &
pids+=($!)
api="https://127.0.0.1:$api_port"
for _ in $(seq 1 300); do
  [ -f /var/lib/sensei/ca.pem ] && curl -sf --cacert /var/lib/sensei/ca.pem "$api/healthz" >/dev/null && break
  sleep 0.2
done
health=$(curl -sf --cacert /var/lib/sensei/ca.pem "$api/healthz") || { cat "$work/control-plane.log"; fail "control plane did not start"; }
served=$(echo "$health" | json 'd["binary_sha256"]')
packaged=$(sha256sum /usr/bin/sensei-control-plane | cut -d' ' -f1)
[ "$served" = "$packaged" ] || fail "/healthz says $served, the package holds $packaged"
echo "binary_sha256 $served matches the packaged binary"

step "enroll as root, run as the service would"
signup=$(curl -s -o /dev/null -w '%{http_code}' --cacert /var/lib/sensei/ca.pem -H 'content-type: application/json' \
  -d '{"email":"stranger@sensei.test","password":"a stranger password","account_name":"X"}' "$api/v1/auth/signup")
[ "$signup" = 403 ] || fail "a stranger's signup answered $signup, not 403"
# The operator signs in with the packaged CLI, pinning the CA by the fingerprint of the CA
# file the control plane wrote, and adds this host; the line it prints enrolls the agent.
fingerprint=$(python3 -c 'import hashlib, ssl; print("SHA256:" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(open("/var/lib/sensei/ca.pem").read())).hexdigest())')
export XDG_CONFIG_HOME="$work/cli-config"
echo "packaging test password" | sensei login "$api" --email ops@sensei.test --password-stdin \
  --ca-fingerprint "$fingerprint" || fail "the owner create-owner made cannot sign in with sensei"
[ "$(stat -c '%a' "$XDG_CONFIG_HOME/sensei/credentials.json")" = 600 ] || fail "sensei stored its credentials readable by others"
enroll=$(sensei servers add this-host --agent --host 127.0.0.1 | grep '^sudo sensei-agent enroll ') \
  || fail "sensei servers add printed no enroll command"
server_id=$(sensei --json servers show this-host | json 'd["id"]')
${enroll#sudo }
for f in identity.key identity.crt ca.crt agent.json; do
  [ "$(stat -c '%U %a' "/var/lib/sensei-agent/$f")" = "sensei-agent 600" ] || fail "$f not the service user's"
done
if [ -d /run/systemd/system ]; then
  # systemd runs here: sensei-agent.path must start the service by itself.
  for _ in $(seq 1 100); do systemctl is-active --quiet sensei-agent.service && break; sleep 0.2; done
  systemctl is-active --quiet sensei-agent.service || { systemctl status sensei-agent.service || true; fail "enrolling did not start the service"; }
  pids+=(0)
else
  # No running systemd (a container): run what sensei-agent.service runs, as its user.
  # The unit's two ambient capabilities come along: the agent switches to the deploy user.
  setpriv --reuid sensei-agent --regid sensei-agent --init-groups \
    --inh-caps +setuid,+setgid,+kill --ambient-caps +setuid,+setgid,+kill \
    /usr/bin/sensei-agent run > "$work/agent.log" 2>&1 &
  pids+=($!)
fi
connected=false
for _ in $(seq 1 100); do
  if sensei --json servers show "$server_id" | json 'd["agent"]["connected"]' | grep -q True; then
    connected=true
    break
  fi
  sleep 0.2
done
[ "$connected" = true ] || { cat "$work/agent.log" 2>/dev/null || journalctl -u sensei-agent --no-pager | tail -n 30; fail "the enrolled agent did not connect"; }
echo "the agent, running as sensei-agent, is connected"
stop() {
  if [ "$1" = 0 ]; then
    systemctl stop sensei-agent.service
  else
    kill "$1" 2>/dev/null || true
  fi
  for _ in $(seq 1 150); do pgrep -u "$2" >/dev/null || return 0; sleep 0.2; done
  fail "processes of $2 still running"
}
stop "${pids[1]}" sensei-agent
identity_sum=$(sha256sum /var/lib/sensei-agent/identity.crt | cut -d' ' -f1)
echo "# a local edit" >> /etc/sensei/agent.toml

step "upgrade to a newer build through the upgrade unit: identity and configuration survive"
packaging/build-repo.sh "$work/repo" "$key" --version 0.1.1-1 --no-build
apt_only update
before=$(dpkg-query -W -f='${Version}' sensei-agent)
# A malformed version is refused before apt sees it, and nothing changes.
for bad in "0.1.1-1; touch $work/pwned" "--reinstall" "0.1.1-1 -o APT::Get::AllowUnauthenticated=1" ""; do
  if /usr/lib/sensei-agent/upgrade "$bad" 2>/dev/null; then fail "the upgrade script took version '$bad'"; fi
done
[ ! -e "$work/pwned" ] || fail "a version ran a command"
[ "$(dpkg-query -W -f='${Version}' sensei-agent)" = "$before" ] || fail "a refused version changed the package"
# The unit the agent starts (its instance escaped as the agent escapes it).
[ "$(systemd-escape 0.1.1-1)" = '0.1.1\x2d1' ] || fail "systemd-escape disagrees with the agent's escaping"
if [ -d /run/systemd/system ]; then
  systemctl start 'sensei-agent-upgrade@0.1.1\x2d1.service' \
    || { journalctl -u 'sensei-agent-upgrade@*' --no-pager | tail -n 30; fail "the upgrade unit failed"; }
else
  # Without systemd: the script as the unit runs it, as root.
  /usr/lib/sensei-agent/upgrade 0.1.1-1
fi
[ "$(dpkg-query -W -f='${Version}' sensei-agent)" = "0.1.1-1" ] || fail "not upgraded"
# The binary reports the package's upstream version (build-repo.sh stamps it).
sensei-agent --version | grep -qx "sensei-agent 0.1.1" || fail "sensei-agent --version after the upgrade: $(sensei-agent --version)"
[ "$(sha256sum /var/lib/sensei-agent/identity.crt | cut -d' ' -f1)" = "$identity_sum" ] || fail "identity changed"
grep -q "# a local edit" /etc/sensei/agent.toml || fail "local configuration lost"
if [ -d /run/systemd/system ]; then
  systemctl is-active --quiet sensei-agent.service || fail "the upgrade did not restart the service"
fi

step "a repository signed with another key is refused"
packaging/build-repo.sh "$work/repo" "$evil" --version 0.1.2-1 --no-build
if apt_only update 2>"$work/apt-evil.log"; then
  grep -q "NO_PUBKEY\|not signed\|signatures were invalid" "$work/apt-evil.log" || fail "apt accepted a foreign signature"
fi
grep -q "NO_PUBKEY\|not signed\|signatures were invalid\|couldn't be verified" "$work/apt-evil.log" \
  || { cat "$work/apt-evil.log"; fail "no signature error from apt"; }
if DEBIAN_FRONTEND=noninteractive apt_only install -y sensei-agent=0.1.2-1 2>/dev/null; then
  fail "installed a package from a repository signed by another key"
fi
[ "$(dpkg-query -W -f='${Version}' sensei-agent)" = "0.1.1-1" ] || fail "version changed"

step "remove keeps the identity; purge takes it and the users"
DEBIAN_FRONTEND=noninteractive apt-get -q remove -y sensei-agent
[ -f /var/lib/sensei-agent/identity.key ] || fail "remove deleted the identity"
getent passwd sensei-agent >/dev/null || fail "remove deleted the user"
stop "${pids[0]}" sensei
DEBIAN_FRONTEND=noninteractive apt-get -q purge -y sensei-agent sensei-control-plane sensei-cli
[ ! -e /var/lib/sensei-agent ] || fail "purge kept /var/lib/sensei-agent"
[ ! -e /var/lib/sensei ] || fail "purge kept /var/lib/sensei"
[ ! -e /etc/sensei/agent.toml ] || fail "purge kept the agent's conffile"
! getent passwd sensei-agent >/dev/null || fail "purge kept the sensei-agent user"
! getent passwd sensei >/dev/null || fail "purge kept the sensei user"

echo
echo "test-apt: all packaging checks passed"
