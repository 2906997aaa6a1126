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

# wait_port PORT PID WHAT: waits up to 15 s for 127.0.0.1:PORT to answer,
# and dies at once if PID (the process that should listen there) exits.
wait_port() {
  for _ in $(seq 150); do
    port_free "$1" || return 0
    kill -0 "$2" 2>/dev/null || break
    sleep 0.1
  done
  die "$3 did not start on port $1 (taken?)"
}

# make_test_tls DIR NAME: a test CA (DIR/ca.pem) and a certificate for
# localhost signed by it (DIR/sink.pem, DIR/sink.key), made for one run
# only; a fanout run trusts the CA through SSL_CERT_FILE (the lean path
# loads the platform's roots with rustls-native-certs, which reads it).
make_test_tls() {
  local dir="$1" name="$2"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=fanout $name test CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$dir/sink.key" -out "$dir/sink.csr" 2>/dev/null
  printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
    "keyUsage=digitalSignature" "extendedKeyUsage=serverAuth" >"$dir/sink.ext"
  openssl x509 -req -in "$dir/sink.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 2 -extfile "$dir/sink.ext" -out "$dir/sink.pem" 2>/dev/null
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
