# The helper every VM test uses: `mkTest { name; size; testScript; }` runs `size` NixOS VMs
# (n1, n2, ...) with pkgs.testers.runNixOSTest, each a BeeMesh node made by `node`, on one
# VLAN with static addresses, admitted by one fleet ticket and trusting one operator key.
# The nodes find each other by mDNS (the LAN default of the images) and listen on their
# static address only. The scenarios are the local QEMU harness's: ./scenarios.nix.
{ pkgs, self }:
let
  inherit (pkgs) lib;
  beemesh = self.packages.${pkgs.stdenv.hostPlatform.system}.beemesh;
  pure = import ../modules/lib.nix;
  tomlFormat = pkgs.formats.toml { };

  fixtures = pkgs.callPackage ./fixtures.nix { inherit beemesh; };

  # The workload image: busybox (httpd, sh), loaded into each node's rootless Podman.
  workloadImage = pkgs.dockerTools.buildImage {
    name = "localhost/busybox";
    tag = "vm";
    copyToRoot = pkgs.buildEnv {
      name = "busybox-root";
      paths = [ pkgs.busybox ];
      pathsToLink = [ "/bin" ];
    };
    config = {
      Cmd = [ "/bin/sh" ];
      Env = [ "PATH=/bin" ];
    };
  };

  nodeName = i: "n${toString i}";
  address = i: "192.168.1.${toString (10 + i)}";

  # The node's host.toml: its settings (everything but [trust], rendered like any module's)
  # plus a [trust] section with the fixture keys. Those exist only once the fixtures are
  # built, so they are added by a derivation rather than at evaluation time; the result is
  # checked like every host config the module installs.
  hostConfig =
    name: settings:
    pkgs.runCommand "beemesh-${name}-host.toml" { } ''
      cat ${tomlFormat.generate "settings.toml" (removeAttrs settings [ "trust" ])} > $out
      cat >> $out <<EOF

      [trust]
      domain = "vm.test"
      signers = ["$(cat ${fixtures}/operator.pub)"]
      admission = "$(cat ${fixtures}/admission.pub)"
      ticket = "${pure.credentialsDir}/ticket"
      ticket_key = "${pure.credentialsDir}/ticket.key"
      EOF
      ${lib.getExe beemesh} config check $out
    '';

  node =
    i:
    { config, ... }:
    {
      imports = [ self.nixosModules.beemesh ];

      virtualisation = {
        memorySize = 1536;
        diskSize = 4096;
      };
      networking.interfaces.eth1.ipv4.addresses = lib.mkForce [
        {
          address = address i;
          prefixLength = 24;
        }
      ];
      networking.primaryIPAddress = lib.mkForce (address i);

      environment.systemPackages = [ pkgs.jq ];

      services.beemesh = {
        enable = true;
        openFirewall = true;
        ticketFile = "${fixtures}/fleet.ticket";
        # The fleet ticket's secret key (a test fixture in the store; a real host keeps it
        # out of the world-readable store).
        ticketKeyFile = "${fixtures}/fleet.ticket.key";
        settings = {
          node = {
            name = nodeName i;
            labels.vm = "yes";
          };
          mesh = {
            listen = [
              "/ip4/${address i}/tcp/4001"
              "/ip4/${address i}/udp/4001/quic-v1"
            ];
            mdns = true;
            announce_interval = "1s";
            peer_timeout = "5s";
          };
        };
        configFile = hostConfig (nodeName i) config.services.beemesh.settings;
      };
    };

  # Python shared by the test scripts, after the machines exist.
  preamble =
    { nodes, count }:
    let
      uid = toString nodes.n1.users.users.beemesh.uid;
    in
    ''
      import json

      nodes = [${lib.concatMapStringsSep ", " nodeName (lib.range 1 count)}]
      # The nodes' own rootless Podman, through the API socket the daemon uses.
      PODMAN = "podman --url unix:///run/user/${uid}/podman/podman.sock"
      FIXTURES = "${fixtures}"


      def cli(m, args):
          """`beemesh ARGS -o json` on m, through the node's default API socket."""
          return json.loads(m.succeed(f"beemesh {args} -o json"))


      def start_mesh():
          """Boots every node and waits until each one lists all the others."""
          start_all()
          for m in nodes:
              m.wait_for_unit("beemesh.service")
          for m in nodes:
              m.wait_until_succeeds(
                  f"beemesh status -o json | jq -e '.peers == {len(nodes) - 1}'", timeout=600
              )


      def load_workload_image(m):
          m.wait_until_succeeds(f"{PODMAN} info", timeout=120)
          m.succeed(f"{PODMAN} load --input ${workloadImage}")


      def running_on(m, name):
          """The nodes where default/NAME runs, as m sees them (sorted)."""
          for w in cli(m, "get workloads"):
              if w["namespace"] == "default" and w["name"] == name:
                  return sorted(
                      p["node"] for p in w.get("placements", []) if p["state"] == "running"
                  )
          return []


      def listed(m, name):
          return any(w["name"] == name for w in cli(m, "get workloads"))


      def containers(m, name):
          """How many of default/NAME's containers run in m's Podman."""
          out = m.succeed(
              f"{PODMAN} ps --quiet --filter label=io.beemesh.workload={name}"
              + " --filter label=io.beemesh.container=web"
          )
          return len(out.split())


      def wait_placed(among, name, replicas, timeout=600):
          """Waits until every node in AMONG sees exactly REPLICAS running replicas of NAME on
          distinct nodes of AMONG; returns their names."""
          names = {m.name for m in among}
          placed = []

          def converged(_last_try):
              nonlocal placed
              views = [running_on(m, name) for m in among]
              placed = views[0]
              return (
                  len(placed) == replicas
                  and len(set(placed)) == replicas
                  and set(placed) <= names
                  and all(v == placed for v in views)
              )

          retry(converged, timeout=timeout)
          return placed


    '';
in
{
  inherit fixtures workloadImage;

  mkTest =
    {
      name,
      size ? 3,
      testScript,
    }:
    pkgs.testers.runNixOSTest {
      name = "beemesh-${name}";
      nodes = lib.listToAttrs (map (i: lib.nameValuePair (nodeName i) (node i)) (lib.range 1 size));
      # Software emulation (no KVM) is slow: waits inside have their own timeouts.
      globalTimeout = 3600;
      testScript =
        args:
        preamble {
          inherit (args) nodes;
          count = size;
        }
        + testScript;
    };
}
