# Pure helpers shared by the NixOS modules, the images and the VM tests. They use builtins
# only (no nixpkgs), so .ci/check-nix evaluates and tests them with a bare nix-instantiate.
rec {
  # The daemon's unit is beemesh.service: systemd puts its LoadCredential= files here.
  unitName = "beemesh.service";
  credentialsDir = "/run/credentials/${unitName}";

  # Where the node looks for a flashed image's config (DESIGN.md section 2): the BEEMESH FAT
  # partition, copied to this directory at boot (runtime/cli/src/daemon.rs). Root's, readable
  # by the node's group: not beneath /run/beemesh (the API socket's directory, which the node
  # writes), so the node cannot change its own configuration.
  configPartitionLabel = "BEEMESH";
  configPartitionCopy = "/run/beemesh-config";

  # The daemon's own default for [mesh] listen (runtime/manifest/src/host.rs).
  defaultListen = [
    "/ip4/0.0.0.0/tcp/4001"
    "/ip4/0.0.0.0/udp/4001/quic-v1"
  ];

  # The components of a multiaddr: "/ip4/0.0.0.0/tcp/4001" -> [ "ip4" "0.0.0.0" "tcp" "4001" ].
  multiaddrParts = addr: builtins.filter (p: builtins.isString p && p != "") (builtins.split "/" addr);

  # The port that follows `proto` ("tcp" or "udp") in a multiaddr, or null.
  portOf =
    proto: addr:
    let
      parts = multiaddrParts addr;
      n = builtins.length parts;
      go =
        i:
        if i + 1 >= n then
          null
        else if builtins.elemAt parts i == proto then
          builtins.fromJSON (builtins.elemAt parts (i + 1))
        else
          go (i + 1);
    in
    go 0;

  unique = builtins.foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ];

  # The firewall ports a node needs for its [mesh] listen addresses (QUIC runs over UDP).
  listenPorts =
    listen:
    let
      collect = proto: unique (builtins.filter (p: p != null) (map (portOf proto) listen));
    in
    {
      tcp = collect "tcp";
      udp = collect "udp";
    };

  # mDNS (DESIGN.md section 3: discovery on a LAN).
  mdnsPort = 5353;
}
