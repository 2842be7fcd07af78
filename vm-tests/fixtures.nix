# Test fixtures, made at build time (never committed): the operator, admission and stranger
# keys, a fleet ticket, and the signed (or deliberately unsigned) workload manifests the VM
# tests apply. The workloads run localhost/busybox:vm, the image of ./lib.nix, which the tests
# load into each node's Podman (VMs reach no registry).
{ runCommand, beemesh }:
runCommand "beemesh-vm-test-fixtures" { nativeBuildInputs = [ beemesh ]; } ''
  mkdir -p $out
  cd $out

  # `key gen` prints the public key ("ed25519:...").
  beemesh key gen --out operator.key > operator.pub
  beemesh key gen --out admission.key > admission.pub
  beemesh key gen --out stranger.key > stranger.pub
  # A fleet ticket (fleet.ticket) and its ticket secret key (fleet.ticket.key): admits any
  # node that holds both.
  beemesh ticket issue --key admission.key --out fleet.ticket

  workload() {
    cat <<EOF
  api = "beemesh/v1"
  kind = "Workload"
  namespace = "default"
  name = "$1"
  generation = 1

  [placement]
  replicas = $2
  spread = "node"

  [[container]]
  name = "web"
  image = "localhost/busybox:vm"
  command = ["httpd", "-f", "-p", "8080"]
  ports = [{ name = "http", container = 8080 }]
  resources = { cpu = "100m", memory = "32Mi" }
  EOF
  }

  # schedule, node-loss: two replicas on three nodes.
  workload hello 2 > hello.toml
  beemesh sign hello.toml --key operator.key --out hello.signed.toml

  # state: examples/counter.toml as a strong workload of 3 replicas, on the tests' image.
  sed -e 's/^replicas = 2$/replicas = 3/' -e 's/^mode = "eventual"$/mode = "strong"/' \
    -e 's|localhost/busybox:latest|localhost/busybox:vm|' ${../examples/counter.toml} > counter.toml
  grep -q '^mode = "strong"$' counter.toml
  grep -q '^replicas = 3$' counter.toml
  beemesh sign counter.toml --key operator.key --out counter.signed.toml

  # unsigned-rejected: the same envelope without its signatures, one signed by a key the
  # nodes do not trust, and a control that they accept.
  workload intruder 1 > intruder.toml
  beemesh sign intruder.toml --key operator.key --out intruder.signed.toml
  sed '/^\[\[signature\]\]/,$d' intruder.signed.toml > intruder.unsigned.toml
  rm intruder.signed.toml
  beemesh sign intruder.toml --key stranger.key --out intruder.stranger.toml
  workload control 1 > control.toml
  beemesh sign control.toml --key operator.key --out control.signed.toml
''
