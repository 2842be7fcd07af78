# The VM test scenarios, by the names the local QEMU harness uses too; each is ./<name>.nix.
# Pure: .ci/check-nix checks that every one has its file.
[
  "mesh-join"
  "schedule"
  "node-loss"
  "unsigned-rejected"
  "state"
]
