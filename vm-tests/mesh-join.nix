# mesh-join: three hosts boot into one mesh with nothing but their config: each lists the two
# others, runs confined (Landlock, no capabilities, no_new_privs, unprivileged, in a hardened
# unit) next to its rootless Podman, and keeps its PeerId across a restart.
{ mkTest, ... }:
mkTest {
  name = "mesh-join";
  size = 3;
  testScript = ''
    start_mesh()

    with subtest("every node lists the others by name"):
        for m in nodes:
            names = sorted(p["name"] for p in cli(m, "get peers"))
            assert names == sorted(o.name for o in nodes if o is not m), f"{m.name}: {names}"

    with subtest("the daemon is unprivileged and confined"):
        for m in nodes:
            sandbox = cli(m, "status")["sandbox"]
            assert sandbox["mode"] == "required", sandbox
            assert sandbox["landlock"]["enforcement"] in ("enforced", "partial"), sandbox
            assert sandbox["no_new_privs"], sandbox
            assert sandbox["capabilities"]["effective"] == [], sandbox
            assert sandbox["capabilities"]["permitted"] == [], sandbox
            pid = m.succeed("systemctl show --property=MainPID --value beemesh.service").strip()
            assert m.succeed(f"stat --format=%U /proc/{pid}").strip() == "beemesh"
            m.succeed("grep -q lsm=.*landlock /proc/cmdline")
            for prop, value in [
                ("NoNewPrivileges", "yes"),
                ("ProtectSystem", "strict"),
                ("RestrictNamespaces", "yes"),
                ("CapabilityBoundingSet", ""),
            ]:
                got = m.succeed(f"systemctl show --property={prop} --value beemesh.service").strip()
                assert got == value, f"{m.name}: {prop}={got}"

    with subtest("rootless Podman for the node user"):
        for m in nodes:
            m.succeed("grep -q '^beemesh:' /etc/subuid /etc/subgid")
            m.succeed("test -f /var/lib/systemd/linger/beemesh")
            m.wait_until_succeeds(f"{PODMAN} info --format '{{{{.Host.Security.Rootless}}}}' | grep -q true", timeout=120)

    with subtest("a restarted node keeps its identity and rejoins"):
        before = cli(n3, "status")["peer_id"]
        n3.systemctl("restart beemesh.service")
        n3.wait_for_unit("beemesh.service")
        n3.wait_until_succeeds("beemesh status -o json | jq -e '.peers == 2'", timeout=300)
        assert cli(n3, "status")["peer_id"] == before
        for m in (n1, n2):
            m.wait_until_succeeds(
                f"beemesh get peers -o json | jq -e 'map(.peer_id) | index(\"{before}\")'", timeout=300
            )
  '';
}
