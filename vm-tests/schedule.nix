# schedule: a signed workload with two replicas, applied on one node of three, is placed on
# exactly two distinct nodes (spread = "node"), every node agrees on where, and the containers
# run in those nodes' rootless Podman and nowhere else (DESIGN.md section 4, properties 1, 7).
{ mkTest, ... }:
mkTest {
  name = "schedule";
  size = 3;
  testScript = ''
    start_mesh()
    for m in nodes:
        load_workload_image(m)

    n1.succeed(f"beemesh apply {FIXTURES}/hello.signed.toml")

    with subtest("two replicas, on two distinct nodes, seen alike by every node"):
        placed = wait_placed(nodes, "hello", 2)

    with subtest("the containers run where the replicas are placed, and only there"):
        for m in nodes:
            want = 1 if m.name in placed else 0
            m.wait_until_succeeds(
                f"test $({PODMAN} ps --quiet --filter label=io.beemesh.workload=hello"
                + f" --filter label=io.beemesh.container=web | wc -l) -eq {want}",
                timeout=300,
            )
            assert containers(m, "hello") == want, m.name
  '';
}
