# node-loss: a node that runs a replica loses power; the mesh places the replica on the node
# that had none, within a bounded time, and nothing is lost even when the lost node is the one
# that accepted the manifest (DESIGN.md section 4, properties 3 and 4).
{ mkTest, ... }:
mkTest {
  name = "node-loss";
  size = 3;
  testScript = ''
    start_mesh()
    for m in nodes:
        load_workload_image(m)

    n1.succeed(f"beemesh apply {FIXTURES}/hello.signed.toml")
    placed = wait_placed(nodes, "hello", 2)

    # The node that accepted the manifest, if it runs a replica; else the first that does.
    victim = n1 if "n1" in placed else next(m for m in nodes if m.name == placed[0])
    survivors = [m for m in nodes if m is not victim]

    with subtest(f"{victim.name} loses power"):
        victim.crash()

    with subtest("its replica moves to the node that had none"):
        # reschedule_after (10 s) after peer_timeout (5 s), plus slack for slow VMs.
        now = wait_placed(survivors, "hello", 2, timeout=300)
        assert victim.name not in now, now
        for m in survivors:
            m.wait_until_succeeds(
                f"test $({PODMAN} ps --quiet --filter label=io.beemesh.workload=hello"
                + " --filter label=io.beemesh.container=web | wc -l) -eq 1",
                timeout=300,
            )
  '';
}
