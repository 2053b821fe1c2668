#!/usr/bin/env bash
# Runs the OTA fleet scenario end to end: builds what it needs, makes certificates for three cars with
# `tollgate certs`, starts a broker with vin-acl and msg-auth, runs fleet.py against it and stops the broker.
# Ports: OTA_TLS_PORT (default 8884) and OTA_TCP_PORT (default 1886). Exit status: fleet.py's.
set -euo pipefail
cd "$(dirname "$0")/../.."
TLS_PORT="${OTA_TLS_PORT:-8884}"
TCP_PORT="${OTA_TCP_PORT:-1886}"
VINS=(1J9RP1A36A1644345 1G1BN53E6NW128495 1M8GDM9AXKP042788)

if [ "${OTA_SKIP_BUILD:-0}" != 1 ]; then
  rustup target list --installed 2>/dev/null | grep -q '^wasm32-wasip2$' || rustup target add wasm32-wasip2
  cargo build --release --quiet -p tollgate
  cargo build --release --quiet --target wasm32-wasip2 -p vin-acl -p msg-auth
fi
TOLLGATE="${TOLLGATE_BIN:-target/release/tollgate}"

WORK="$(mktemp -d)"
BROKER_PID=""
cleanup() {
  if [ -n "$BROKER_PID" ]; then kill "$BROKER_PID" 2>/dev/null || true; wait "$BROKER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

"$TOLLGATE" certs init --dir "$WORK/certs" --host localhost --host 127.0.0.1 >/dev/null
for vin in "${VINS[@]}"; do
  "$TOLLGATE" certs client --dir "$WORK/certs" --cn "TCU $vin" --san-uri "urn:vin:$vin" --out "$vin" >/dev/null
done
sed -e "s|@WORK@|$WORK|g" -e "s|@TLS_PORT@|$TLS_PORT|g" -e "s|@TCP_PORT@|$TCP_PORT|g" \
  examples/ota-fleet/broker.toml >"$WORK/broker.toml"
"$TOLLGATE" check-config "$WORK/broker.toml" >/dev/null

RUST_LOG="${RUST_LOG:-warn}" "$TOLLGATE" run --config "$WORK/broker.toml" 2>"$WORK/broker.log" &
BROKER_PID=$!
# The first start compiles the two plugins (cached afterwards), which takes a few seconds.
up=0
for _ in $(seq 1 600); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$TCP_PORT") 2>/dev/null; then up=1; break; fi
  kill -0 "$BROKER_PID" 2>/dev/null || { cat "$WORK/broker.log" >&2; exit 1; }
  sleep 0.1
done
[ "$up" = 1 ] || { echo "the broker did not come up within 60 s" >&2; cat "$WORK/broker.log" >&2; exit 1; }

status=0
python3 examples/ota-fleet/fleet.py --work "$WORK" --tls-port "$TLS_PORT" --tcp-port "$TCP_PORT" "${VINS[@]}" || status=$?
if [ "${OTA_SHOW_LOG:-0}" = 1 ] || [ "$status" != 0 ]; then
  echo "--- broker log (security events are JSON lines) ---"
  cat "$WORK/broker.log"
fi
exit "$status"
