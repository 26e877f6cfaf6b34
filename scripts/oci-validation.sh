#!/bin/bash
# Run the opencontainers/runtime-tools validation suite against an OCI runtime.
#
# usage: scripts/oci-validation.sh RUNTIME [RUNTIME_TOOLS_DIR]
#
#   RUNTIME            runtime command (runc, crun, /work/main/.venv/bin/oci-launcher, ...)
#   RUNTIME_TOOLS_DIR  an already built runtime-tools source tree (default: $RUNTIME_TOOLS_DIR,
#                      else /work/runtime-tools). This script never builds it: check out commit
#                      260e151 yourself and run, in that tree,
#                        GOPROXY=off GOFLAGS=-mod=vendor make runtimetest validation-executables
#
# Environment:
#   OCI_VALIDATION_TIMEOUT  seconds allowed per test file (default 120)
#   OCI_VALIDATION_LOGDIR   where each file's TAP output and stderr go (default: a new temp dir)
#   OCI_VALIDATION_FILTER   extended regex; only test files whose path matches run
#   OCI_VALIDATION_LOCK     lock file serialising runs on one machine (default
#                           /tmp/oci-validation.lock)
#   OCI_VALIDATION_HIDE_CGROUP2
#                           1: unmount /sys/fs/cgroup/unified inside the test's private mount
#                           namespace (crun refuses hybrid cgroup layouts); 0: never. Default: 1
#                           when the runtime's basename is crun, else 0.
#
# Each validation/*/*.t runs from the source root (the tests read ./runtimetest and
# ./rootfs-<arch>.tar.gz relative to the cwd) inside `unshare -m --propagation private`, because
# some tests leave mounts behind that would otherwise land in the host's namespace.
#
# A file passes when it exits 0, each of its TAP streams (a file may print several) has a plan
# and as many results as planned, and no result is "not ok". Only the *_fail tests may print no
# TAP at all (they check that the runtime refuses a bad config and report through their exit
# status); any other file without TAP output failed, e.g. runtimetest printed nothing in the
# container. SKIP results count as passes of their test point (the plan is met),
# which matches how the suite reports features a runtime may legitimately lack. Perl's `prove`
# is not used: it rejects the YAML diagnostic blocks the suite prints.
#
# Exit status: 0 when every file passed, 1 when some failed, 2 on a usage error.

set -u

usage() {
	sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//' >&2
	exit 2
}

[ $# -ge 1 ] && [ $# -le 2 ] || usage
case "$1" in -h|--help) usage ;; esac

runtime_arg=$1
tools_dir=${2:-${RUNTIME_TOOLS_DIR:-/work/runtime-tools}}
per_test_timeout=${OCI_VALIDATION_TIMEOUT:-120}
filter=${OCI_VALIDATION_FILTER:-}

# The tests exec $RUNTIME from the source root, so a relative or bare name must be resolved now.
if ! runtime=$(command -v -- "$runtime_arg"); then
	echo "oci-validation: runtime '$runtime_arg' not found in PATH or not executable" >&2
	exit 2
fi
case "$runtime" in /*) ;; *) runtime=$(cd "$(dirname "$runtime")" && pwd)/$(basename "$runtime") ;; esac

if [ ! -d "$tools_dir/validation" ]; then
	echo "oci-validation: '$tools_dir' is not a runtime-tools source tree (no validation/ dir)" >&2
	exit 2
fi
tools_dir=$(cd "$tools_dir" && pwd)
if [ ! -x "$tools_dir/runtimetest" ]; then
	echo "oci-validation: '$tools_dir/runtimetest' is missing: build the tree first" \
		"(make runtimetest validation-executables)" >&2
	exit 2
fi

hide_cgroup2=${OCI_VALIDATION_HIDE_CGROUP2:-}
if [ -z "$hide_cgroup2" ]; then
	case "$(basename "$runtime")" in crun) hide_cgroup2=1 ;; *) hide_cgroup2=0 ;; esac
fi

logdir=${OCI_VALIDATION_LOGDIR:-}
if [ -z "$logdir" ]; then
	logdir=$(mktemp -d /tmp/oci-validation.XXXXXX)
fi
mkdir -p "$logdir"

# Reads one file's TAP output on stdin. Prints "<ok> <not_ok> <skip>" on the first line, then
# "plan: <problem>" lines for streams whose plan is missing or not met, then the failed points.
# A file may hold several TAP streams (each starts with "TAP version"); each has its own plan.
# Results are only recognised at column 0: the YAML diagnostics are indented.
tap_summary() {
	awk '
		function close_stream() {
			if (!started) return
			if (!has_plan) problems[++np] = "plan: stream " streams " has no plan"
			else if (plan != n) problems[++np] = "plan: stream " streams " plans " plan " results, has " n
		}
		/^TAP version/ { close_stream(); streams++; started = 1; n = 0; has_plan = 0; next }
		/^ok([ \t]|$)/ {
			if (!started) { streams++; started = 1 }
			ok++; n++
			if ($0 ~ /#[ \t]*[Ss][Kk][Ii][Pp]/) skip++
			next
		}
		/^not ok([ \t]|$)/ {
			if (!started) { streams++; started = 1 }
			n++
			if ($0 ~ /#[ \t]*[Tt][Oo][Dd][Oo]/) { ok++; next }
			notok++
			fails[notok] = $0
			next
		}
		/^1\.\.[0-9]+/ {
			if (!started) { streams++; started = 1 }
			split($0, p, /\.\./); sub(/[^0-9].*$/, "", p[2]); plan = p[2] + 0; has_plan = 1
		}
		END {
			close_stream()
			if (!streams) problems[++np] = "plan: no TAP output"
			printf "%d %d %d\n", ok, notok, skip
			for (i = 1; i <= np; i++) print problems[i]
			for (i = 1; i <= notok; i++) print fails[i]
		}
	'
}

# Several tests use fixed cgroup paths (/cgrouptest): two runs at once would disturb each other.
lock=${OCI_VALIDATION_LOCK:-/tmp/oci-validation.lock}
exec 9>"$lock"
if ! flock -n 9; then
	echo "oci-validation: another run holds $lock; waiting for it" >&2
	flock 9
fi

cd "$tools_dir" || exit 2
mapfile -t tests < <(ls validation/*/*.t 2>/dev/null | sort)
if [ ${#tests[@]} -eq 0 ]; then
	echo "oci-validation: no validation/*/*.t in '$tools_dir': build the tree first" >&2
	exit 2
fi

echo "runtime: $runtime"
echo "suite:   $tools_dir"
echo "logs:    $logdir"
echo "hide cgroup2 mount: $hide_cgroup2; timeout per file: ${per_test_timeout}s"
echo

total=0 passed=0 points_ok=0 points_total=0
failed_files=()
for t in "${tests[@]}"; do
	if [ -n "$filter" ] && ! [[ $t =~ $filter ]]; then
		continue
	fi
	name=$(basename "$t" .t)
	out="$logdir/$name.tap"
	err="$logdir/$name.stderr"
	total=$((total + 1))
	start=$(date +%s.%N)
	# The inner shell keeps the unmount inside the new namespace; `timeout -k` makes sure a test
	# that ignores SIGTERM is still gone before the next one starts.
	RUNTIME=$runtime HIDE_CGROUP2=$hide_cgroup2 timeout -k 5 "$per_test_timeout" \
		unshare -m --propagation private sh -c '
			if [ "$HIDE_CGROUP2" = 1 ] && mountpoint -q /sys/fs/cgroup/unified; then
				umount /sys/fs/cgroup/unified || exit 125
			fi
			exec "$0"' "./$t" >"$out" 2>"$err" </dev/null
	rc=$?
	elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')

	summary=$(tap_summary <"$out")
	read -r n_ok n_notok n_skip <<<"$(head -n1 <<<"$summary")"
	plan_problems=$(grep '^plan: ' <<<"$summary" | sed 's/^plan: //' | paste -sd';' -)
	if [ "$plan_problems" = "no TAP output" ] && [ "$rc" -eq 0 ] && [[ $name == *_fail ]]; then
		plan_problems=""  # the *_fail tests report through their exit status alone
	fi
	points_ok=$((points_ok + n_ok))
	points_total=$((points_total + n_ok + n_notok))

	reason=""
	if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
		reason="timeout after ${per_test_timeout}s"
	elif [ "$rc" -ne 0 ]; then
		reason="exit status $rc"
	fi
	if [ -n "$plan_problems" ]; then
		reason="${reason:+$reason; }$plan_problems"
	fi
	if [ "$n_notok" -gt 0 ]; then
		reason="${reason:+$reason; }$n_notok not ok"
	fi

	skipinfo=""
	[ "$n_skip" -gt 0 ] && skipinfo=", $n_skip skipped"
	if [ -z "$reason" ]; then
		passed=$((passed + 1))
		printf 'PASS %-40s %3d ok%s (%ss)\n' "$name" "$n_ok" "$skipinfo" "$elapsed"
	else
		failed_files+=("$name")
		printf 'FAIL %-40s %3d ok, %d not ok%s (%ss): %s\n' \
			"$name" "$n_ok" "$n_notok" "$skipinfo" "$elapsed" "$reason"
		grep -v '^plan: ' <<<"$summary" | tail -n +2 | head -n 5 | sed 's/^/       /'
		if [ "$n_notok" -eq 0 ] && [ -s "$err" ]; then
			# No failed test point to show: the first stderr lines say why the file died.
			head -n 3 "$err" | cut -c1-200 | sed 's/^/       stderr: /'
		fi
	fi
done

echo
echo "test points: $points_ok/$points_total ok"
echo "failed files: ${failed_files[*]:-none}"
echo "$passed/$total files passed"
[ "$passed" -eq "$total" ]
