#!/usr/bin/env bash
# Makes a throw-away test PKI with openssl: a CA, a server certificate for the broker and one
# client certificate per gateway (CN = device id, for mosquitto's use_identity_as_username).
# EC P-256 keys, SHA-256 signatures. For tests and trials: production uses your own PKI.
#
#   deploy/tls/make-test-certs.sh OUT_DIR [--days N] [--server-name NAME]... [--client ID]...
#
# --server-name: a DNS name or an IP address the broker is reached at (repeatable; default
# localhost and 127.0.0.1); it goes into the certificate's subjectAltName, which clients check.
# Writes OUT_DIR/ca.crt ca.key server.crt server.key and <ID>.crt <ID>.key per client; keys are
# mode 0600. Refuses to overwrite an existing CA.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
out=$1; shift
days=30
names=()
clients=()
while [ $# -gt 0 ]; do
  case $1 in
    --days) days=${2:?--days needs a number}; shift 2 ;;
    --server-name) names+=("${2:?--server-name needs a value}"); shift 2 ;;
    --client) clients+=("${2:?--client needs a device id}"); shift 2 ;;
    -h|--help) usage ;;
    *) echo "make-test-certs.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ ${#names[@]} -gt 0 ] || names=(localhost 127.0.0.1)
command -v openssl >/dev/null || { echo "make-test-certs.sh: openssl is not installed" >&2; exit 2; }
mkdir -p "$out"
if [ -e "$out/ca.key" ]; then
  echo "make-test-certs.sh: $out/ca.key exists: refusing to overwrite a CA" >&2
  exit 2
fi
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)

# The CA.
openssl req -x509 "${ec[@]}" -keyout "$out/ca.key" -out "$out/ca.crt" -days "$days" \
  -subj "/CN=edge-stn test CA" -sha256 \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

sign() {  # sign CSR $1 into certificate $2 with the extensions file $3
  openssl x509 -req -in "$1" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -CAserial "$tmp/ca.srl" -out "$2" -days "$days" -sha256 -extfile "$3" 2>/dev/null
}

# The broker.
san=""
for n in "${names[@]}"; do
  if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
done
cat > "$tmp/server.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=${san%,}
EXT
openssl req "${ec[@]}" -keyout "$out/server.key" -out "$tmp/server.csr" \
  -subj "/CN=${names[0]}" 2>/dev/null
sign "$tmp/server.csr" "$out/server.crt" "$tmp/server.ext"

# The gateways.
cat > "$tmp/client.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
EXT
for id in "${clients[@]}"; do
  if ! [[ $id =~ ^[A-Za-z0-9_-]{1,64}$ ]]; then
    echo "make-test-certs.sh: --client $id is not a device id (A-Z a-z 0-9 _ -, 1-64)" >&2
    exit 2
  fi
  openssl req "${ec[@]}" -keyout "$out/$id.key" -out "$tmp/$id.csr" -subj "/CN=$id" 2>/dev/null
  sign "$tmp/$id.csr" "$out/$id.crt" "$tmp/client.ext"
done
chmod 0644 "$out"/*.crt
echo "wrote $out: ca.crt, server.crt (${names[*]})${clients:+, clients: ${clients[*]}}"
