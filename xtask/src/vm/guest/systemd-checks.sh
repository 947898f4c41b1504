#!/bin/bash
# The checks of `cargo xtask vm --systemd`, run inside the guest by
# portwatch-vmtest.service once multi-user.target is reached.
#
# The guest is a Debian 12 userspace with systemd as PID 1 and the portwatch
# package installed with `dpkg -i`; the shipped unit is unchanged. It boots
# with the sock_diag modules blocked (/etc/modprobe.d/pwsd-block-diag.conf),
# as on a hardened server, so the first checks see the degraded daemon.
#
# Each check prints one line on the serial console, the only thing the host
# reads:
#   PWSD-CHECK <name>: ok[: detail]      or   PWSD-CHECK <name>: FAIL: why
#   PWSD-FACT <name>: <value>            something to report, not judged
#   PWSD-DONE                            every check ran
# A check that never prints counts as failed on the host.
set -u
exec >/dev/ttyS0 2>&1

API=http://127.0.0.1:7464
# More curl arguments for the API (a CA and credentials while it serves TLS).
CURL_ARGS=()
PORT=8080
NS_PORT=8081

one_line() { tr '\n' ' ' | tr -s ' ' | cut -c1-400; }
ok() { echo "PWSD-CHECK $1: ok${2:+: $(printf "%s" "$2" | one_line)}"; }
fail() { echo "PWSD-CHECK $1: FAIL: $(printf '%s' "$2" | one_line)"; }
fact() { echo "PWSD-FACT $1: $(printf '%s' "$2" | one_line)"; }
# verdict STATUS NAME DETAIL-IF-OK DETAIL-IF-FAILED: ok when STATUS is 0.
# Called as `verdict $? ...`: the details' command substitutions would reset
# $? before a function could read it.
verdict() { if [ "$1" = 0 ]; then ok "$2" "$3"; else fail "$2" "$4"; fi; }

# wait_for SECONDS COMMAND...: polls every second; true once COMMAND is.
wait_for() {
  local limit=$1 i
  shift
  for ((i = 0; i < limit; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 1
  done
  "$@" >/dev/null 2>&1
}

prop() { systemctl show -p "$1" --value portwatch.service; }
running() { [ "$(prop ActiveState)" = active ] && [ "$(prop SubState)" = running ]; }
ready() { curl -sf "${CURL_ARGS[@]}" "$API/readyz" >/dev/null; }
# A place in the journal, and the daemon's lines after it.
journal_cursor() { journalctl -q -n 0 --show-cursor | sed -n 's/^-- cursor: //p'; }
journal_after() { journalctl -u portwatch.service -o cat --no-pager --after-cursor="$1"; }

# The ids of the BPF programs portwatch's main process holds open, from its
# fds' fdinfo (Debian's bpftool cannot show which process holds a program).
portwatch_programs() {
  local pid
  pid="$(prop MainPID)"
  [ "$pid" != 0 ] || return 0
  cat /proc/"$pid"/fdinfo/* 2>/dev/null | sed -n 's/^prog_id:[[:space:]]*//p' | sort -un
}

# The ids of programs that still exist, of those given.
existing_programs() {
  local id
  for id in "$@"; do
    bpftool prog show id "$id" >/dev/null 2>&1 && echo "$id"
  done
}

# The ids of the programs attached to any cgroup.
attached_programs() {
  bpftool cgroup tree /sys/fs/cgroup --json | python3 -c '
import json, sys
for cgroup in json.load(sys.stdin):
    for prog in cgroup.get("programs", []):
        print(prog["id"])'
}

# /ports as sorted lines: protocol address port state unit, without
# portwatch's own listener (whose pid changes with every start).
listeners() {
  curl -sf "${CURL_ARGS[@]}" "$API/ports" | python3 -c '
import json, sys
rows = set()
for port in json.load(sys.stdin)["ports"]:
    for l in port["listeners"]:
        if l.get("unit") == "portwatch.service":
            continue
        rows.add((l["protocol"], l["address"], l["port"], l["state"], l.get("unit"), tuple(l["pids"])))
for row in sorted(rows, key=str):
    print(*row)'
}

echo "PWSD-BEGIN $(uname -r)"
fact kernel "$(uname -r)"
fact systemd "$(systemctl --version | head -1)"

# --- 1. Started by the package, READY through Type=notify ------------------
wait_for 180 running
state="$(systemctl show -p Type,ActiveState,SubState,NRestarts portwatch.service | one_line)"
[ "$(prop Type)" = notify ] && running && [ "$(prop NRestarts)" = 0 ]
verdict $? "the package's unit is active (running) through Type=notify READY" "$state" "$state; $(journalctl -u portwatch.service -o cat --no-pager | tail -5)"

status_line="$(systemctl status portwatch.service --no-pager 2>&1 | grep -m1 'Status:')"
[ -n "$status_line" ] && [ "$(prop StatusText)" != "" ]
verdict $? "systemctl status shows the STATUS= line" "$status_line" "no Status: line in systemctl status"
fact "STATUS" "$(prop StatusText)"
fact "hooks" "$(curl -sf "$API/metrics" | grep '^portwatch_program_attached' | sed 's/^portwatch_program_attached//')"

# --- 2. Without the sock_diag modules: degraded, not crash-looping ---------
if [ -d /sys/module/tcp_diag ]; then
  fail "without the sock_diag modules it runs on live events and says what it cannot see" "tcp_diag is loaded or built in: the block did not hold"
else
  says_degraded() { curl -sf "$API/readyz" | grep -q tcp_diag; }
  wait_for 60 says_degraded
  readyz="$(curl -s -w ' (HTTP %{http_code})' "$API/readyz")"
  metrics="$(curl -sf "$API/metrics")"
  said="$(journalctl -u portwatch.service -o cat --no-pager | grep -c 'tcp_diag')"
  missing="$(printf '%s\n' "$metrics" | grep -E '^portwatch_[a-z_]+\{[^}]*module="tcp_diag"[^}]*\} 1' | head -1)"
  [ "$(prop NRestarts)" = 0 ] && running \
    && [[ "$readyz" == *"HTTP 200"* ]] && [[ "$readyz" == *tcp_diag* ]] \
    && [ -n "$missing" ] && [ "$said" = 1 ]
  verdict $? "without the sock_diag modules it runs on live events and says what it cannot see" \
    "no restarts; readyz: $readyz; metric: $missing; said once in the journal" \
    "restarts=$(prop NRestarts) state=$(prop ActiveState); readyz: $readyz; metric: ${missing:-none}; journal lines naming tcp_diag: $said"
fi

# --- 3. Modules become loadable: reconciliation resumes by itself ---------
# Nobody loads them: the kernel does, on the daemon's next sock_diag request
# (request_module runs modprobe outside the unit's sandbox).
rm -f /etc/modprobe.d/pwsd-block-diag.conf
unblocked=$SECONDS
restarts="$(prop NRestarts)"
# Recovered, said by a daemon that answers: plain `ready`, the listing
# available, no module missing.
recovered() {
  [ -d /sys/module/tcp_diag ] && [ -d /sys/module/udp_diag ] \
    && [ "$(curl -sf "$API/readyz")" = ready ] \
    && curl -sf "$API/metrics" | grep -qx 'portwatch_sock_diag_available 1' \
    && ! curl -sf "$API/metrics" | grep -qE '^portwatch_kernel_module_missing\{.*\} 1$'
}
wait_for 90 recovered && [ "$(prop NRestarts)" = "$restarts" ]
verdict $? "once the modules can load, reconciliation resumes by itself" \
  "the kernel loaded them on the daemon's retry, $((SECONDS - unblocked)) s later; no restart" \
  "not recovered $((SECONDS - unblocked)) s after unblocking: restarts $restarts -> $(prop NRestarts); modules: $(echo /sys/module/*_diag); readyz: $(curl -s "$API/readyz")"

# --- 4. A unit's listener is named by its unit ----------------------------
systemctl start demo-listener.service
demo_named() { curl -sf "$API/ports/$PORT" | grep -q '"unit":"demo-listener.service"'; }
wait_for 30 demo_named
verdict $? "a unit's listener is attributed to demo-listener.service" "curl $API/ports/$PORT names it" "$(curl -s "$API/ports/$PORT" | cut -c1-300)"

# --- 5. A transient unit fails to bind the port ----------------------------
rm -f /run/pwsd-clash.pid
systemd-run --unit=pwsd-clash --wait --collect --quiet \
  /usr/bin/python3 /usr/local/lib/portwatch-vmtest/clash.py "$PORT" /run/pwsd-clash.pid
clash_status=$?
clash_pid="$(cat /run/pwsd-clash.pid 2>/dev/null)"
clash_seen() {
  curl -sf "$API/failures" | python3 -c '
import json, sys
pid = int(sys.argv[1])
for f in json.load(sys.stdin)["failures"]:
    if f["pid"] == pid and f["errno"] == "EADDRINUSE" and f.get("unit") == "pwsd-clash.service" and any(
        h.get("unit") == "demo-listener.service" for b in f["blocked_by"] for h in b["holders"]
    ):
        print(f["unit"], f["endpoint"], f["errno"], "blocked_by", [b["endpoint"] for b in f["blocked_by"]])
        sys.exit(0)
sys.exit(1)' "${clash_pid:-0}"
}
wait_for 20 clash_seen
verdict $? "a systemd-run unit's failed bind is in /failures with its unit, blocked_by demo-listener.service" \
  "$(clash_seen)" "exit $clash_status, pid ${clash_pid:-none}: $(curl -s "$API/failures" | cut -c1-300)"

# --- 6. The sandbox, as systemd scores it ----------------------------------
exposure="$(systemd-analyze security portwatch.service --no-pager 2>&1 | grep -m1 'Overall exposure level')"
[ -n "$exposure" ]
verdict $? "systemd-analyze security portwatch.service" "${exposure#*: }" "no score: $(systemd-analyze security portwatch.service --no-pager 2>&1 | tail -2)"
fact "exposure" "${exposure#*: }"

# --- 7. A restart rebuilds the same map ------------------------------------
# A second listener in a network namespace of its own, as a container's:
# the restart's snapshot must enter it (setns) through the sandbox.
ip netns add pwsd-ns && ip -n pwsd-ns link set lo up
systemd-run --unit=pwsd-ns-listener --quiet -p NetworkNamespacePath=/run/netns/pwsd-ns \
  /usr/bin/python3 -m http.server "$NS_PORT" --bind 127.0.0.1
ns_seen() { curl -sf "$API/ports/$NS_PORT" | grep -q '"unit":"pwsd-ns-listener.service"'; }
wait_for 30 ns_seen
before="$(listeners)"
systemctl restart portwatch.service && wait_for 120 ready
after="$(listeners)"
[ -n "$before" ] && [ "$before" = "$after" ] && [[ "$after" == *demo-listener.service* ]] \
  && [[ "$after" == *pwsd-ns-listener.service* ]]
verdict $? "systemctl restart rebuilds the same map" "$(printf '%s\n' "$after" | wc -l) listeners, units included" "before: $before | after: $after"

# What only the start-up snapshot reads, through the sandbox: a listener in
# another namespace (setns), and the options of sockets made before the
# daemon (pidfd_getfd): http.server sets SO_REUSEADDR.
snapshot_facts() {
  for port in "$PORT" "$NS_PORT"; do
    curl -sf "$API/ports/$port" | python3 -c '
import json, sys
for l in json.load(sys.stdin)["listeners"]:
    print(l["endpoint"], l.get("unit"), "netns", l["netns"], "reuse_addr", l.get("reuse_addr"), "holders", len(l["holders"]))'
  done
}
facts="$(snapshot_facts)"
host_netns="$(printf '%s\n' "$facts" | awk '/demo-listener/ {print $4}')"
printf '%s\n' "$facts" | grep -q 'pwsd-ns-listener.service netns [0-9]* reuse_addr True holders 1' \
  && printf '%s\n' "$facts" | grep -q 'demo-listener.service netns [0-9]* reuse_addr True holders 1' \
  && ! printf '%s\n' "$facts" | grep 'pwsd-ns-listener' | grep -q "netns $host_netns "
verdict $? "after a restart, a namespaced unit's listener and existing sockets' options are read (setns, pidfd_getfd)" \
  "$(printf '%s' "$facts" | one_line)" "$(printf '%s' "$facts" | one_line)"

# --- 7b. Remote access: TLS, basic auth, the key as a credential, reload ---
# As the unit's comment and the README say to set it up: a root-only key
# handed over with LoadCredential=, web_config naming the copy, a user made
# with `portwatch hash-password`.
TLS=/etc/portwatch/tls
PW='pwsd correct horse'
mkdir -p "$TLS"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=pwsd-ca -keyout /run/pwsd-ca.key -out "$TLS/ca.crt" 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$TLS/portwatch.key" 2>/dev/null
chmod 600 "$TLS/portwatch.key"
# issue_cert SERIAL: a certificate for localhost on the same key, replaced
# in one rename as a renewal does.
issue_cert() {
  openssl req -new -key "$TLS/portwatch.key" -subj /CN=localhost -out /run/pwsd.csr 2>/dev/null \
    && printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >/run/pwsd-ext.cnf \
    && openssl x509 -req -in /run/pwsd.csr -CA "$TLS/ca.crt" -CAkey /run/pwsd-ca.key \
      -set_serial "$1" -days 2 -extfile /run/pwsd-ext.cnf -out "$TLS/portwatch.crt.new" 2>/dev/null \
    && mv "$TLS/portwatch.crt.new" "$TLS/portwatch.crt"
}
issue_cert 1
hash="$(printf '%s\n' "$PW" | portwatch hash-password)"
printf 'tls_server_config:\n  cert_file: %s/portwatch.crt\n  key_file: /run/credentials/portwatch.service/portwatch.key\nbasic_auth_users:\n  operator: %s\n' \
  "$TLS" "$hash" >/etc/portwatch/web.yml
mkdir -p /etc/systemd/system/portwatch.service.d
printf '[Service]\nLoadCredential=portwatch.key:%s/portwatch.key\n' "$TLS" \
  >/etc/systemd/system/portwatch.service.d/pwsd-tls.conf
cp /etc/portwatch/portwatch.toml /run/pwsd-portwatch.toml
echo 'web_config = "/etc/portwatch/web.yml"' >>/etc/portwatch/portwatch.toml
systemctl daemon-reload
# By address: the guest's /etc/hosts may not name localhost (curl knows it
# anyway; the resolver does not).
API=https://127.0.0.1:7464
CURL_ARGS=(--cacert "$TLS/ca.crt" -u "operator:$PW")
systemctl restart portwatch.service && wait_for 120 ready
code() { curl -s -o /dev/null -w '%{http_code}' --cacert "$TLS/ca.crt" "$@" "$API/ports/$PORT"; }
anonymous="$(code)"
wrong="$(code -u operator:wrong)"
cli="$(PORTWATCH_USER=operator PORTWATCH_PASSWORD="$PW" portwatch ports --server "$API" --ca-cert "$TLS/ca.crt" 2>&1)"
[ "$anonymous" = 401 ] && [ "$wrong" = 401 ] && ready && [[ "$cli" == *demo-listener* ]] \
  && [ "$(stat -c %a "$TLS/portwatch.key")" = 600 ]
verdict $? "over TLS with basic auth and the key from LoadCredential=, 401 without the password and the CLI with it" \
  "no password $anonymous, wrong password $wrong, the CLI names demo-listener" \
  "no password $anonymous, wrong password $wrong; CLI: $cli; $(journalctl -u portwatch.service -o cat --no-pager | tail -3)"

# systemctl reload: SIGHUP re-reads web_config in the same process; a
# renewed certificate is then what new connections get, the map unchanged.
served_serial() {
  openssl s_client -connect 127.0.0.1:7464 -servername localhost </dev/null 2>/dev/null \
    | openssl x509 -noout -serial 2>/dev/null
}
pid="$(prop MainPID)"
before="$(listeners)"
first="$(served_serial)"
cursor="$(journal_cursor)"
systemctl reload portwatch.service
heard() { journal_after "$cursor" | grep -q 'SIGHUP: web_config unchanged'; }
wait_for 15 heard
issue_cert 2
systemctl reload portwatch.service
rotated() { [ -n "$first" ] && [ "$(served_serial)" != "$first" ] && [ -n "$(served_serial)" ]; }
wait_for 30 rotated
after="$(listeners)"
heard && rotated && [ "$(prop MainPID)" = "$pid" ] && running && [ -n "$before" ] && [ "$before" = "$after" ]
verdict $? "systemctl reload serves a renewed certificate in the same process, the map unchanged" \
  "$first -> $(served_serial), pid $pid, $(printf '%s\n' "$after" | wc -l) listeners" \
  "$first -> $(served_serial); pid $pid -> $(prop MainPID); heard: $(journal_after "$cursor" | grep -c SIGHUP); before: $before | after: $after"

# Back to plain HTTP on loopback for the checks below.
cp /run/pwsd-portwatch.toml /etc/portwatch/portwatch.toml
rm -rf /etc/systemd/system/portwatch.service.d/pwsd-tls.conf /etc/portwatch/web.yml "$TLS"
systemctl daemon-reload
API=http://127.0.0.1:7464
CURL_ARGS=()
systemctl restart portwatch.service && wait_for 120 ready

# --- 8. Stop leaves nothing attached ---------------------------------------
mapfile -t held < <(portwatch_programs)
systemctl stop portwatch.service
# The kernel frees a program once its last holder is gone; allow it that.
programs_gone() { [ -z "$(existing_programs "${held[@]}")" ]; }
wait_for 15 programs_gone
left="$(existing_programs "${held[@]}" | one_line)"
still=""
for id in $(attached_programs); do
  printf '%s\n' "${held[@]}" | grep -qx "$id" && still="$still $id"
done
[ "${#held[@]}" -gt 0 ] && [ -z "$left" ] && [ -z "$still" ]
verdict $? "systemctl stop leaves no program loaded or attached (bpftool)" \
  "${#held[@]} programs before, none after" \
  "held before: ${held[*]}; held after: $left; still attached: $still"
systemctl start portwatch.service && wait_for 120 ready

# --- 9. A configuration error stops at ExecStartPre, in one line -----------
cp /etc/portwatch/portwatch.toml /run/pwsd-portwatch.toml
echo 'reconcile_interval = "soon"' >>/etc/portwatch/portwatch.toml
restarts="$(prop NRestarts)"
cursor="$(journal_cursor)"
systemctl restart portwatch.service
# With a restart scheduled the unit would be `activating (auto-restart)`:
# `failed` means it stays stopped.
stopped_for_good() { [ "$(prop ActiveState)" = failed ]; }
wait_for 30 stopped_for_good
journal="$(journal_after "$cursor" | grep -i 'reconcile_interval')"
pre="$(systemctl status portwatch.service --no-pager 2>&1 | grep -m1 'ExecStartPre=')"
[ "$(prop ActiveState)" = failed ] && [ "$(prop NRestarts)" = "$restarts" ] \
  && [ "$(printf '%s\n' "$journal" | grep -c .)" = 1 ] && [[ "$pre" == *status=* ]] \
  && [ "$(prop ExecMainPID)" = 0 ]
verdict $? "a configuration error stops the start at ExecStartPre with one journal line, and no restart loop" \
  "journal: $journal; $pre" \
  "state=$(prop ActiveState) restarts $restarts -> $(prop NRestarts), main pid $(prop ExecMainPID); journal: $journal; $pre"
cp /run/pwsd-portwatch.toml /etc/portwatch/portwatch.toml
systemctl reset-failed portwatch.service
systemctl start portwatch.service && wait_for 120 ready

# --- 10. The watchdog restarts a stuck daemon ------------------------------
pid="$(prop MainPID)"
restarts="$(prop NRestarts)"
cursor="$(journal_cursor)"
# MainPID 0 (not running) would make `kill -STOP 0` stop this script.
[ "$pid" != 0 ] && kill -STOP "$pid"
stopped=$SECONDS
replaced() { [ "$(prop MainPID)" != "$pid" ] && [ "$(prop MainPID)" != 0 ] && running && ready; }
[ "$pid" != 0 ] && wait_for 150 replaced \
  && [ "$(prop NRestarts)" -gt "$restarts" ] && journal_after "$cursor" | grep -q -i watchdog
verdict $? "the watchdog restarts a SIGSTOPped daemon" \
  "pid $pid replaced by $(prop MainPID) after $((SECONDS - stopped)) s" \
  "pid $pid, now $(prop MainPID), restarts $restarts -> $(prop NRestarts): $(journal_after "$cursor" | tail -3)"

# --- 11. dpkg --purge removes everything -----------------------------------
mapfile -t held < <(portwatch_programs)
dpkg --purge portwatch >/run/pwsd-purge.log 2>&1
purge_status=$?
wait_for 15 programs_gone
leftovers=""
for path in /usr/bin/portwatch /etc/portwatch /usr/lib/systemd/system/portwatch.service \
  /lib/systemd/system/portwatch.service /etc/systemd/system/multi-user.target.wants/portwatch.service; do
  [ -e "$path" ] && leftovers="$leftovers $path"
done
[ -n "$(existing_programs "${held[@]}")" ] && leftovers="$leftovers bpf-programs"
pgrep -x portwatch >/dev/null && leftovers="$leftovers process"
curl -s -o /dev/null "$API/livez" && leftovers="$leftovers listener"
[ "$purge_status" = 0 ] && [ -z "$leftovers" ]
verdict $? "dpkg --purge removes the package, its unit, config and programs" "nothing left" \
  "dpkg exit $purge_status; left:$leftovers; $(tail -3 /run/pwsd-purge.log)"

# The daemon's journal, for whoever reads a failed run's console.
journalctl -u portwatch.service -o cat --no-pager | sed 's/^/PWSD-JOURNAL /'
echo "PWSD-DONE"
systemctl poweroff -ff
