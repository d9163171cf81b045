#!/bin/sh
# Two real sites on one machine, set up the way two hospitals do it: each has its own folder
# (its own copy of alliance.toml), makes its own keys and tokens with `hutong site init`, and
# they swap public key files; the first site (the coordinator) makes the alliance's
# patient-hash key and the second copies it. Both run as separate processes and send one
# packet each way; the script ends when both packets are acknowledged (exit 0) or after
# $WAIT_S seconds (exit 1). tests/test_site_init.py runs this file as it is.
#
#   sh docs/it/two-sites.sh                      # from the repository, after `make demo`/venv
#   HUTONG=hutong WORK=/srv/try PORT_BASE=18000 sh docs/it/two-sites.sh
set -eu

HUTONG=${HUTONG:-.venv/bin/hutong}          # the hutong command (in PATH: HUTONG=hutong)
SAMPLE=${SAMPLE:-docs/it/sample-bundle.json} # a FHIR R4 Bundle to send (no ID number in it)
WORK=${WORK:-$(mktemp -d)}                  # where the two sites' folders go
PORT_BASE=${PORT_BASE:-18000}               # ports PORT_BASE+1 .. PORT_BASE+12 are used
WAIT_S=${WAIT_S:-120}

A="$WORK/site-a"   # 复兴医院 (the core hospital)
B="$WORK/site-b"   # 月坛社区卫生服务中心 (a community centre)
mkdir -p "$A" "$B"

# 1. The alliance file, agreed by both and copied to each site (no secrets in it).
cat > "$A/alliance.toml" <<TOML
[alliance]
id = "pair"
names = { zh = "双站点试验医联体", en = "Two-site trial alliance" }
patient_hash_key = "file:secrets/patient-hash.key"
national_id_system = "urn:oid:2.16.156.10011.1.3"

[[members]]
id = "hosp-a"
names = { zh = "复兴医院", en = "Fuxing Hospital" }
role = "core"
exchange_url = "http://127.0.0.1:$((PORT_BASE + 11))"
signing_key = "keys/hosp-a.pub.json"
encryption_key = "keys/hosp-a.pub.json"

[[members]]
id = "chc-b"
names = { zh = "月坛社区卫生服务中心", en = "Yuetan Community Health Centre" }
role = "community"
exchange_url = "http://127.0.0.1:$((PORT_BASE + 12))"
signing_key = "keys/chc-b.pub.json"
encryption_key = "keys/chc-b.pub.json"

[[rules]]
from = "hosp-a"
to = "chc-b"
kinds = ["result.lab"]

[[rules]]
from = "chc-b"
to = "hosp-a"
kinds = ["result.lab"]
TOML
cp "$A/alliance.toml" "$B/alliance.toml"

# 2. Each site makes its own files; neither touches the other's.
"$HUTONG" site init --alliance-dir "$A" --node hosp-a \
    --local-bind "127.0.0.1:$((PORT_BASE + 1))" --new-patient-hash-key
"$HUTONG" site init --alliance-dir "$B" --node chc-b \
    --local-bind "127.0.0.1:$((PORT_BASE + 2))"

# 3. Swap public keys; the coordinator's patient-hash key goes to the other site
#    (in real life by a trusted channel, e.g. on paper or an encrypted USB stick).
cp "$A/keys/hosp-a.pub.json" "$B/keys/"
cp "$B/keys/chc-b.pub.json" "$A/keys/"
cp "$A/secrets/patient-hash.key" "$B/secrets/patient-hash.key"
"$HUTONG" config check "$A"
"$HUTONG" config check "$B"

# 4. Run both sites; stop them whatever happens next.
"$HUTONG" run --config "$A/nodes/hosp-a.toml" > "$WORK/site-a.log" 2>&1 &
PID_A=$!
"$HUTONG" run --config "$B/nodes/chc-b.toml" > "$WORK/site-b.log" 2>&1 &
PID_B=$!
trap 'kill $PID_A $PID_B 2>/dev/null || true; wait $PID_A $PID_B 2>/dev/null || true' EXIT INT TERM

# wait until each node has opened its store (its first log line), then queue
for log in "$WORK/site-a.log" "$WORK/site-b.log"; do
    waited=0
    until grep -q "^hutong node" "$log" 2>/dev/null; do
        if [ "$waited" -ge "$WAIT_S" ]; then echo "a node did not start; see $log" >&2; exit 1; fi
        sleep 1
        waited=$((waited + 1))
    done
done

# 5. One packet each way.
"$HUTONG" send --config "$A/nodes/hosp-a.toml" --to chc-b --kind result.lab "$SAMPLE"
"$HUTONG" send --config "$B/nodes/chc-b.toml" --to hosp-a --kind result.lab "$SAMPLE"

# 6. Wait until each site's packet is acknowledged by the other (a signed receipt).
acked() {
    "$HUTONG" outbox list --config "$1" --state acknowledged --json | grep -q '"acknowledged"'
}
waited=0
until acked "$A/nodes/hosp-a.toml" && acked "$B/nodes/chc-b.toml"; do
    if [ "$waited" -ge "$WAIT_S" ]; then
        echo "not acknowledged after $WAIT_S s; see $WORK/site-a.log and $WORK/site-b.log" >&2
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done
echo "both packets acknowledged: hosp-a -> chc-b and chc-b -> hosp-a (folders in $WORK)"
