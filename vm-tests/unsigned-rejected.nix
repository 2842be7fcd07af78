# unsigned-rejected: a manifest without signatures, and one signed by a key the mesh does not
# trust, are refused by the node's API and never reach any node, while a properly signed one
# submitted afterwards reaches every node (DESIGN.md section 2, "Signed manifest").
{ mkTest, ... }:
mkTest {
  name = "unsigned-rejected";
  size = 2;
  testScript = ''
    start_mesh()

    with subtest("the API refuses unsigned and untrusted manifests"):
        for m in nodes:
            m.fail(f"beemesh apply {FIXTURES}/intruder.unsigned.toml")
            m.fail(f"beemesh apply {FIXTURES}/intruder.stranger.toml")

    with subtest("a signed manifest applied afterwards reaches every node"):
        n1.succeed(f"beemesh apply {FIXTURES}/control.signed.toml")
        for m in nodes:
            m.wait_until_succeeds(
                "beemesh get workloads -o json | jq -e 'map(.name) | index(\"control\")'",
                timeout=300,
            )

    with subtest("the refused manifests are nowhere"):
        for m in nodes:
            assert not listed(m, "intruder"), m.name
  '';
}
