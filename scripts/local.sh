# Sourced by the scripts that start local processes (the demo, the tests,
# the image check, the stack test): what each of them needs to find a free
# port, wait for a peer, and stop what it started, by PID.
#
# The sourcing script defines die().

# Whether nothing listens on 127.0.0.1:$1.
port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# wait_for WHAT SECONDS COMMAND...: runs COMMAND until it succeeds, or dies
# after SECONDS.
wait_for() {
  local what="$1" seconds="$2"
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" 2>/dev/null; do
    ((SECONDS < deadline)) || die "timed out waiting for $what"
    sleep 0.2
  done
}

# stop_pids PID...: asks each to stop, then waits for each.
stop_pids() {
  local pid
  for pid in "$@"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "$@"; do
    wait "$pid" 2>/dev/null || true
  done
}
