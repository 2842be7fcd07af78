# state: a strong workload of three replicas (examples/counter.toml with `mode = "strong"`),
# one per node, forms its Raft group across the mesh (3 voters, a leader), and every replica
# writes its count through its sidecar (rootless Podman, the daemon confined as in the image)
# into the group, where an operator reads all three (DESIGN.md sections 5 and 6).
{ mkTest, ... }:
mkTest {
  name = "state";
  size = 3;
  testScript = ''
    start_mesh()
    for m in nodes:
        load_workload_image(m)

    n1.succeed(f"beemesh apply {FIXTURES}/counter.signed.toml")

    with subtest("three replicas, one per node"):
        wait_placed(nodes, "counter", 3)

    with subtest("the nodes form the workload's Raft group: 3 voters and a leader"):
        n1.wait_until_succeeds(
            "beemesh get workloads -o json | jq -e '.[] | select(.name == \"counter\")"
            + " | .group | (.voters | length) == 3 and (.leader // \"\") != \"\"'",
            timeout=300,
        )

    with subtest("every replica writes through its sidecar; an operator reads all three"):
        n1.wait_until_succeeds(
            f"beemesh kv ls default/counter --prefix hits/ --key {FIXTURES}/operator.key -o json"
            + " | jq -e '.items | length >= 3'",
            timeout=300,
        )
  '';
}
