#!/usr/bin/env bash
# What `meson install` puts on a machine to run streamkv as a service, checked from a
# `meson install --destdir` copy (TAP output; meson runs it as the "dist" suite):
#   - the binaries, systemd units, sysusers.d entry, man pages and the shipped model land where
#     the build's prefix says, the model byte for byte, with no template placeholder left;
#   - every path ExecStart= names (programs, --model) is in the installed tree;
#   - systemd-analyze verify accepts the units without a warning, and systemd-analyze security
#     rates them "OK" (exposure at most 2.0); systemd-sysusers creates the users they run as;
#   - every man page renders without a groff warning and has a NAME line apropos can read;
#   - every flag of each binary's --help is in its man page (so the pages cannot go stale);
#   - the installed daemon, with the flags of its unit (minus the system paths), serves the
#     installed model with the installed engine, the same bytes as local mode, and snapshots a
#     resumable stream into its --state-dir on SIGTERM;
#   - the installed daemon (with its engines) and skv-http work with writable-and-executable
#     memory refused (both units set MemoryDenyWriteExecute=yes), checked under prctl(PR_SET_MDWE);
#   - under strace -f, the daemon, its engines and the gateway make only the system calls their
#     units' SystemCallFilter= allows, open only the socket families RestrictAddressFamilies=
#     allows, and the daemon writes only its socket and state directory (ProtectSystem=strict).
# A missing tool or program is a skip with its reason. Environment (tests/meson.build style,
# set by dist/meson.build): MESON, SKV_BUILD_ROOT, SKV_PREFIX, SKV_BINDIR, SKV_MANDIR,
# SKV_MODELDIR, SKV_UNITDIR, SKV_SYSUSERSDIR, SKV_SOURCE_ROOT, SKV_HTTP_BIN (may not exist yet).
set -u

n=0
failed=0
skipped=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() { n=$((n + 1)); failed=$((failed + 1)); echo "not ok $n - $1"; shift; for l in "$@"; do printf '%s\n' "$l" | sed 's/^/# /'; done; }
skip() { n=$((n + 1)); skipped=$((skipped + 1)); echo "ok $n - $1 # SKIP $2"; }
# The last lines: Criterion's summary line as a TAP comment, which tools/test counts, then the plan.
finish() {
	echo "# Synthesis: Tested: $n | Passing: $((n - failed - skipped)) | Failing: $failed | Crashing: 0"
	echo "1..$n"
	exit $((failed > 0))
}

for v in MESON SKV_BUILD_ROOT SKV_PREFIX SKV_BINDIR SKV_MANDIR SKV_MODELDIR SKV_UNITDIR \
	SKV_SYSUSERSDIR SKV_SOURCE_ROOT SKV_HTTP_BIN; do
	[ -n "${!v:-}" ] || { echo "Bail out! $v is not set (run through meson test)"; exit 1; }
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/skv-test-dist-$$.XXXXXX")
pids=()
daemon_pid= http_pid=
cleanup() { # the processes themselves first: a tracing strace outlives a SIGTERM of its own
	for p in $daemon_pid $http_pid "${pids[@]}"; do kill "$p" 2>/dev/null; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
	rm -rf "$tmp"
}
trap cleanup EXIT
root="$tmp/root"
D() { printf '%s%s' "$root" "$1"; } # an installed path inside the destdir copy

# ---- install ----------------------------------------------------------------------------------
if out=$("$MESON" install -C "$SKV_BUILD_ROOT" --no-rebuild --destdir "$root" --quiet 2>&1); then
	ok "meson install --destdir"
else
	not_ok "meson install --destdir" "$out"
	finish
fi

have_http=0
[ -x "$SKV_HTTP_BIN" ] && have_http=1
want_files=(
	"$SKV_BINDIR/skv" "$SKV_BINDIR/skv-cached" "$SKV_BINDIR/skv-engine" "$SKV_BINDIR/skv-admin"
	"$SKV_UNITDIR/skv-cached.service" "$SKV_UNITDIR/skv-http.service"
	"$SKV_SYSUSERSDIR/streamkv.conf"
	"$SKV_MANDIR/man1/skv.1" "$SKV_MANDIR/man8/skv-cached.8" "$SKV_MANDIR/man8/skv-http.8"
	"$SKV_MANDIR/man8/skv-admin.8"
)
[ $have_http = 1 ] && want_files+=("$SKV_BINDIR/skv-http")
missing=()
for f in "${want_files[@]}"; do [ -f "$(D "$f")" ] || missing+=("$f"); done
if [ ${#missing[@]} = 0 ]; then ok "installed: binaries, units, sysusers.d, man pages"
else not_ok "installed: binaries, units, sysusers.d, man pages" "missing: ${missing[*]}"; fi
[ $have_http = 1 ] || skip "installed: skv-http" "$SKV_HTTP_BIN is not built yet"

model_src="$SKV_SOURCE_ROOT/models/stories260K"
bad=()
for f in stories260K.bin stories260K.gguf tok512.bin README.md LICENSE-llama2.c-MIT.txt; do
	cmp -s "$model_src/$f" "$(D "$SKV_MODELDIR/stories260K/$f")" || bad+=("$f")
done
if [ ${#bad[@]} = 0 ]; then ok "installed: the shipped model under $SKV_MODELDIR, byte for byte"
else not_ok "installed: the shipped model under $SKV_MODELDIR, byte for byte" "differ or missing: ${bad[*]}"; fi

units=("$(D "$SKV_UNITDIR/skv-cached.service")" "$(D "$SKV_UNITDIR/skv-http.service")")
pages=("$(D "$SKV_MANDIR/man1/skv.1")" "$(D "$SKV_MANDIR/man8/skv-cached.8")"
	"$(D "$SKV_MANDIR/man8/skv-http.8")" "$(D "$SKV_MANDIR/man8/skv-admin.8")")
if left=$(grep -n '@[A-Z_]*@' "${units[@]}" "${pages[@]}"); then
	not_ok "no template placeholder left in units and pages" "$left"
else
	ok "no template placeholder left in units and pages"
fi

# ---- units ------------------------------------------------------------------------------------
# Every absolute path on an ExecStart= line (the program, --model) exists in the installed tree.
bad=()
for u in "${units[@]}"; do
	line=$(grep '^ExecStart=' "$u") || { bad+=("$(basename "$u"): no ExecStart="); continue; }
	for word in ${line#ExecStart=}; do
		case "$word" in
		/run/* | /var/lib/*) ;; # the runtime and state directories: made by systemd
		/*) [ -e "$(D "$word")" ] || bad+=("$(basename "$u"): $word") ;;
		esac
	done
done
if [ ${#bad[@]} = 0 ]; then ok "units: every path ExecStart= names is installed"
else not_ok "units: every path ExecStart= names is installed" "not installed: ${bad[*]}"; fi

# systemd-analyze checks that ExecStart= programs exist and that Documentation= man pages
# resolve: point both at the destdir copy.
mkdir -p "$tmp/units"
for u in "${units[@]}"; do
	sed "s|=$SKV_PREFIX/|=$root$SKV_PREFIX/|; s| $SKV_PREFIX/| $root$SKV_PREFIX/|g" "$u" \
		> "$tmp/units/$(basename "$u")"
done
if ! command -v systemd-analyze >/dev/null; then
	skip "systemd-analyze verify" "no systemd-analyze (apt-get install systemd)"
	skip "systemd-analyze security" "no systemd-analyze (apt-get install systemd)"
else
	# verify exits 0 on unknown keys and bad values too: any output is a failure.
	out=$(cd "$tmp/units" && MANPATH="$(D "$SKV_MANDIR")" systemd-analyze verify \
		skv-cached.service skv-http.service 2>&1)
	rc=$?
	if [ $rc = 0 ] && [ -z "$out" ]; then ok "systemd-analyze verify: no warnings"
	else not_ok "systemd-analyze verify: no warnings" "exit $rc" "$out"; fi
	for u in skv-cached.service skv-http.service; do
		# Exposure on systemd's 0-100 scale (shown as 0.0-10.0); 20 and below is "OK".
		out=$(cd "$tmp/units" && systemd-analyze security --offline=yes --threshold=20 "$u" 2>&1)
		rc=$?
		level=$(printf '%s\n' "$out" | grep -o 'Overall exposure level for [^:]*: [0-9.]*' | tail -1)
		if [ $rc = 0 ]; then ok "systemd-analyze security $u: ${level##*: } (at most 2.0)"
		else not_ok "systemd-analyze security $u: at most 2.0" "$(printf '%s\n' "$out" | grep -E '✗|Overall')"; fi
	done
fi

if ! command -v systemd-sysusers >/dev/null; then
	skip "systemd-sysusers creates streamkv and skv-http" "no systemd-sysusers (apt-get install systemd)"
else
	mkdir -p "$tmp/sysroot/etc"
	out=$(systemd-sysusers --root="$tmp/sysroot" "$(D "$SKV_SYSUSERSDIR/streamkv.conf")" 2>&1)
	gid=$(awk -F: '$1 == "streamkv" { print $3 }' "$tmp/sysroot/etc/group" 2>/dev/null)
	daemon=$(awk -F: '$1 == "streamkv" { print $4 }' "$tmp/sysroot/etc/passwd" 2>/dev/null)
	gateway=$(awk -F: '$1 == "skv-http" { print $4 }' "$tmp/sysroot/etc/passwd" 2>/dev/null)
	if [ -n "$gid" ] && [ "$daemon" = "$gid" ] && [ "$gateway" = "$gid" ]; then
		ok "systemd-sysusers: users streamkv and skv-http, primary group streamkv"
	else
		not_ok "systemd-sysusers: users streamkv and skv-http, primary group streamkv" "$out" \
			"group streamkv: '$gid', streamkv's gid: '$daemon', skv-http's gid: '$gateway'"
	fi
	# The units run as those users, in that group, and the daemon admits the group.
	c="$tmp/units/skv-cached.service" h="$tmp/units/skv-http.service"
	if grep -qx 'User=streamkv' "$c" && grep -qx 'Group=streamkv' "$c" &&
		grep -q '^ExecStart=.* --group streamkv' "$c" && grep -qx 'User=skv-http' "$h" &&
		grep -qx 'Group=streamkv' "$h"; then
		ok "units: skv-cached runs as streamkv with --group streamkv, skv-http in group streamkv"
	else
		not_ok "units: skv-cached runs as streamkv with --group streamkv, skv-http in group streamkv"
	fi
fi

# ---- man pages --------------------------------------------------------------------------------
for p in "${pages[@]}"; do
	name=$(basename "$p")
	if command -v groff >/dev/null; then
		out=$(groff -man -ww -z "$p" 2>&1)
		if [ -z "$out" ]; then ok "$name: groff -man -ww renders it without a warning"
		else not_ok "$name: groff -man -ww renders it without a warning" "$out"; fi
	else
		skip "$name: groff -man -ww" "no groff (apt-get install groff-base)"
	fi
	if command -v man >/dev/null && command -v lexgrog >/dev/null; then
		out=$(MANWIDTH=80 man --warnings -l "$p" 2>&1 >/dev/null)
		what=$(lexgrog "$p" 2>&1)
		if [ -z "$out" ] && printf '%s' "$what" | grep -q ": \"${name%.*} - "; then
			ok "$name: man --warnings -l is silent, lexgrog reads its NAME"
		else
			not_ok "$name: man --warnings -l is silent, lexgrog reads its NAME" "$out" "$what"
		fi
	else
		skip "$name: man --warnings, lexgrog" "no man-db (apt-get install man-db)"
	fi
done

# Every long flag (--x) and short flag (-x) of a binary's --help is in its page's source.
flags_of() { # the flags a --help text names, one per line
	grep -oE -- '(^|[^A-Za-z0-9_-])--?[A-Za-z][A-Za-z0-9-]*' | sed -E 's/^[^-]*//' |
		grep -E -- '^(--[a-z][a-z0-9-]+|-[A-Za-z])$' | sort -u
}
check_flags() { # check_flags BINARY PAGE
	local bin="$1" page="$2" help missing=()
	if ! help=$("$bin" --help 2>&1); then
		not_ok "$(basename "$page"): every flag of $(basename "$bin") --help" "$bin --help failed: $help"
		return
	fi
	local text
	text=$(sed -e 's/\\-/-/g' -e 's/\\f[BIRP]//g' -e 's/\\(dq/"/g' "$page")
	for f in $(printf '%s\n' "$help" | flags_of); do
		printf '%s\n' "$text" | grep -qE -- "(^|[^A-Za-z0-9-])$f([^A-Za-z0-9-]|$)" || missing+=("$f")
	done
	if [ ${#missing[@]} = 0 ]; then ok "$(basename "$page"): every flag of $(basename "$bin") --help"
	else not_ok "$(basename "$page"): every flag of $(basename "$bin") --help" "not in the page: ${missing[*]}"; fi
}
check_flags "$(D "$SKV_BINDIR/skv")" "$(D "$SKV_MANDIR/man1/skv.1")"
check_flags "$(D "$SKV_BINDIR/skv-cached")" "$(D "$SKV_MANDIR/man8/skv-cached.8")"
check_flags "$(D "$SKV_BINDIR/skv-admin")" "$(D "$SKV_MANDIR/man8/skv-admin.8")"
if [ $have_http = 1 ]; then
	check_flags "$(D "$SKV_BINDIR/skv-http")" "$(D "$SKV_MANDIR/man8/skv-http.8")"
else
	skip "skv-http.8: every flag of skv-http --help" "$SKV_HTTP_BIN is not built yet"
fi

# ---- the installed tree runs ------------------------------------------------------------------
# The daemon with its unit's flags (a private socket and state directory, no --group: the
# test's user may have no group to give), the installed model, and the engine it finds next to
# itself. Under strace -f
# when it can trace here, so that what the daemon, its engines and the gateway do can be held
# against what their units allow.
tracing=0
if ! command -v strace >/dev/null; then
	trace_why="no strace (apt-get install strace)"
elif ! command -v systemd-analyze >/dev/null; then
	trace_why="no systemd-analyze to list @system-service"
elif ! strace -f -qq -o /dev/null true 2>/dev/null; then
	trace_why="strace cannot trace here (ptrace refused)"
else
	tracing=1
fi
tracer=()
[ $tracing = 1 ] && tracer=(strace -f -qq -o "$tmp/cached.trace")
# PR_SET_MDWE (65) with PR_MDWE_REFUSE_EXEC_GAIN (1) is kept across execve and fork: the
# kernel's form of what MemoryDenyWriteExecute=yes refuses (W+X mappings, mprotect adding
# PROT_EXEC), so the daemon and the engines it starts run under it.
mdwe_probe='import ctypes, sys; sys.exit(0 if ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) == 0 else 1)'
mdwe_exec_py='import ctypes, os, sys
if ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0: sys.exit("PR_SET_MDWE failed")
os.execvp(sys.argv[1], sys.argv[1:])'
have_mdwe=0
if ! command -v python3 >/dev/null; then
	mdwe_why="no python3 to set PR_SET_MDWE"
elif ! python3 -c "$mdwe_probe" 2>/dev/null; then
	mdwe_why="the kernel has no prctl(PR_SET_MDWE) (Linux < 6.3)"
else
	have_mdwe=1
fi
mdwe=()
[ $have_mdwe = 1 ] && mdwe=(python3 -c "$mdwe_exec_py")
model="$(D "$SKV_MODELDIR/stories260K/stories260K.bin")"
sock="$tmp/cached.sock"
state="$tmp/state"
mkdir -m 0700 "$state"
"${mdwe[@]}" "${tracer[@]}" "$(D "$SKV_BINDIR/skv-cached")" --socket "$sock" --state-dir "$state" \
	--model "$model" --engines 1 --arena-mb 16 > "$tmp/cached.log" 2>&1 &
pids+=($!)
daemon_pid=$!
for _ in $(seq 300); do [ -S "$sock" ] && break; sleep 0.1; done
[ $tracing = 1 ] && daemon_pid=$(pgrep -P "$daemon_pid" | head -1)
prompt="Once upon a time"
# The bytes on stdout are compared; stderr (a sanitizer's report, say) is shown on failure.
want=$("$(D "$SKV_BINDIR/skv")" --model "$model" generate --temp 0 -n 40 "$prompt" 2>"$tmp/local.err")
got=$("$(D "$SKV_BINDIR/skv")" --socket "$sock" generate --temp 0 -n 40 "$prompt" 2>"$tmp/remote.err")
served="installed skv-cached serves the installed model: the same bytes as local mode"
[ $have_mdwe = 1 ] && served="$served, with W+X memory refused (PR_SET_MDWE)"
[ $have_mdwe = 0 ] && skip "skv-cached under MemoryDenyWriteExecute" "$mdwe_why"
if [ -S "$sock" ] && [ -n "$want" ] && [ "$got" = "$want" ]; then
	ok "$served"
else
	not_ok "$served" \
		"local: $want" "$(cat "$tmp/local.err")" "daemon: $got" "$(cat "$tmp/remote.err")" \
		"$(cat "$tmp/cached.log")"
fi
# A resumable stream, left detached for the daemon to snapshot into its state directory.
SKV_STREAM_DIR="$tmp" "$(D "$SKV_BINDIR/skv")" --socket "$sock" generate --stream dist --temp 0 \
	-n 8 "$prompt" > "$tmp/resumable.out" 2>&1
resumable_rc=$?
engine_pid=$(pgrep -P "$daemon_pid" | head -1)
exe=$(readlink "/proc/$engine_pid/exe" 2>/dev/null)
if [ "$exe" = "$(D "$SKV_BINDIR/skv-engine")" ]; then
	ok "the installed daemon runs the installed skv-engine"
else
	not_ok "the installed daemon runs the installed skv-engine" "engine pid '$engine_pid' runs '$exe'"
fi

http_ran=0
if [ $have_http = 0 ]; then
	skip "skv-http under MemoryDenyWriteExecute" "$SKV_HTTP_BIN is not built yet"
elif [ $have_mdwe = 0 ]; then
	skip "skv-http under MemoryDenyWriteExecute" "$mdwe_why"
else
	http_tracer=()
	[ $tracing = 1 ] && http_tracer=(strace -f -qq -o "$tmp/http.trace")
	"${http_tracer[@]}" "${mdwe[@]}" "$(D "$SKV_BINDIR/skv-http")" --socket "$sock" \
		--listen 127.0.0.1:0 > "$tmp/http.log" 2>&1 &
	pids+=($!)
	http_pid=$!
	port=
	for _ in $(seq 100); do
		port=$(grep -oE 'listening on http://127\.0\.0\.1:[0-9]+' "$tmp/http.log" | grep -oE '[0-9]+$')
		[ -n "$port" ] && break
		sleep 0.1
	done
	reply=$(python3 - "$port" "$prompt" <<-'PY' 2>&1
		import json, sys, urllib.request
		base = "http://127.0.0.1:%s" % sys.argv[1]
		urllib.request.urlopen(base + "/health", timeout=60).read()
		urllib.request.urlopen(base + "/metrics", timeout=60).read()
		body = json.dumps({"prompt": sys.argv[2], "max_tokens": 40, "temperature": 0}).encode()
		req = urllib.request.Request(base + "/v1/completions", body,
		                             {"Content-Type": "application/json"})
		with urllib.request.urlopen(req, timeout=60) as r:
		    print(sys.argv[2] + json.load(r)["choices"][0]["text"], end="")
	PY
	)
	if [ -n "$port" ] && [ "$reply" = "$want" ]; then
		ok "skv-http with W+X memory refused (PR_SET_MDWE) answers a completion, greedy = local mode"
		http_ran=1
	else
		not_ok "skv-http with W+X memory refused (PR_SET_MDWE) answers a completion, greedy = local mode" \
			"port '$port'" "reply: $reply" "local: $want" "$(cat "$tmp/http.log")"
	fi
	[ $tracing = 1 ] && http_pid=$(pgrep -P "$http_pid" | head -1)
	kill "$http_pid" 2>/dev/null
fi
# SIGTERM, as systemctl stop sends it: the daemon shuts down, strace ends with it.
kill "$daemon_pid" 2>/dev/null
for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
pids=()
snaps=$(find "$state" -name '*-dist.snap' -size +0 | wc -l)
if [ $resumable_rc = 0 ] && [ "$snaps" = 1 ]; then
	ok "skv-cached --state-dir (the unit's /var/lib/streamkv): SIGTERM snapshots a resumable stream there"
else
	not_ok "skv-cached --state-dir (the unit's /var/lib/streamkv): SIGTERM snapshots a resumable stream there" \
		"skv generate --stream: exit $resumable_rc: $(cat "$tmp/resumable.out")" \
		"in $state: $(ls -l "$state")" "$(cat "$tmp/cached.log")"
fi

# ---- what the processes did, against what their units allow -----------------------------------
expand_group() { # the system calls of a systemd-analyze syscall-filter group, recursively
	systemd-analyze syscall-filter "$1" | sed -e '1d' -e 's/#.*//' | awk 'NF { print $1 }' |
		while read -r s; do case "$s" in @*) expand_group "$s" ;; *) echo "$s" ;; esac; done
}
syscalls_of() { # syscalls_of TRACE [AFTER]: the system calls in a trace (after the execve of AFTER)
	awk -v after="${2:-}" '
		after != "" && !started { if ($0 ~ ("execve\\(\"[^\"]*" after "\"") && $0 ~ /= 0$/) started = 1; next }
		{ if (match($0, /^[0-9]+ +[a-z_0-9]+\(/)) { s = substr($0, RSTART, RLENGTH - 1); sub(/^[0-9]+ +/, "", s); print s } }
		' "$1" | sort -u
}
if [ $tracing = 0 ]; then
	skip "skv-cached and its engines: system calls, socket families and writes within its unit" "$trace_why"
	skip "skv-http: system calls and socket families within its unit" "$trace_why"
else
	expand_group @system-service | sort -u > "$tmp/system-service"
	{ expand_group @privileged; expand_group @resources; } | sort -u > "$tmp/refused-http"
	syscalls_of "$tmp/cached.trace" > "$tmp/cached.calls"
	outside=$(comm -23 "$tmp/cached.calls" "$tmp/system-service" | tr '\n' ' ')
	families=$(grep -oE 'socket\(AF_[A-Z0-9]+' "$tmp/cached.trace" | sed 's/socket(//' | sort -u | grep -vx AF_UNIX | tr '\n' ' ')
	# ProtectSystem=strict: writes only the socket (in /run/streamkv under the unit) and in the
	# state directory (/var/lib/streamkv).
	writes=$(grep -E 'open(at)?\(.*O_(WRONLY|RDWR|CREAT)|mkdir\(|unlink\(|rename\(|bind\(' "$tmp/cached.trace" |
		grep -v -- '= -1 E' | grep -oE '"/[^"]*"' | tr -d '"' | grep -v "^$tmp/cached.sock\$" |
		grep -v "^$state/" | grep -vx "$tmp" | sort -u | tr '\n' ' ')
	n_calls=$(wc -l < "$tmp/cached.calls")
	if [ -s "$tmp/cached.calls" ] && [ -z "$outside" ] && [ -z "$families" ] && [ -z "$writes" ]; then
		ok "skv-cached and its engines: $n_calls system calls, all in @system-service; AF_UNIX only; writes only the socket and state"
	else
		not_ok "skv-cached and its engines: system calls, socket families and writes within its unit" \
			"outside @system-service: $outside" "socket families besides AF_UNIX: $families" \
			"written outside the socket's directory: $writes"
	fi
	if [ $http_ran = 0 ]; then
		skip "skv-http: system calls and socket families within its unit" "skv-http did not run"
	else
		syscalls_of "$tmp/http.trace" skv-http > "$tmp/http.calls"
		outside=$(comm -23 "$tmp/http.calls" "$tmp/system-service" | tr '\n' ' ')
		refused=$(comm -12 "$tmp/http.calls" "$tmp/refused-http" | tr '\n' ' ')
		families=$(grep -oE 'socket\(AF_[A-Z0-9]+' "$tmp/http.trace" | sed 's/socket(//' | sort -u |
			grep -vxE 'AF_UNIX|AF_INET|AF_INET6' | tr '\n' ' ')
		n_calls=$(wc -l < "$tmp/http.calls")
		if [ -s "$tmp/http.calls" ] && [ -z "$outside" ] && [ -z "$refused" ] && [ -z "$families" ]; then
			ok "skv-http: $n_calls system calls, in @system-service, none in @privileged or @resources; AF_UNIX/AF_INET(6)"
		else
			not_ok "skv-http: system calls and socket families within its unit" \
				"outside @system-service: $outside" "in @privileged or @resources: $refused" \
				"socket families besides AF_UNIX, AF_INET, AF_INET6: $families"
		fi
	fi
fi
finish
