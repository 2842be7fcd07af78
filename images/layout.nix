# The GPT layout of the BeeMesh node disk image (DESIGN.md section 8): the partitions, labels
# and types of the Debian builder's (runtime/image/src/build.rs), but for the root's type.
# images/disk.nix builds the first three with image.repart; the data partition is created and
# grown at boot by systemd-repart. Pure (builtins only): .ci/check-nix evaluates it.
rec {
  partitions = {
    # systemd-boot and the kernel (as a unified kernel image).
    esp = {
      label = "esp";
      type = "esp";
      format = "vfat";
      size = "128M";
    };
    # The read-only system. On NixOS it holds the Nix store and is mounted at /usr (/ is a
    # tmpfs, /nix/store is bound from /usr/nix/store), so its GPT type is usr, as in nixpkgs'
    # appliance-repart-image-verity-store test; the Debian image's is root (it is mounted at /).
    # That type is the one difference between the two layouts.
    root = {
      label = "beemesh-root";
      type = "usr";
      format = "erofs";
    };
    # The host's own host.toml, ticket (with a fleet ticket's ticket.key) and network files,
    # written by `beemesh image configure` or by hand from any OS. Its own GPT type, so tools can find
    # it by type as well as by label, and systemd-repart never mistakes it for the data
    # partition.
    config = {
      label = "BEEMESH";
      type = "8b1e6b2c-5d59-4f1e-9a54-3c0a7b7e6d21";
      format = "vfat";
      size = "16M";
    };
    # Node state and container storage: created at first boot behind the others, then grown
    # to whatever the disk offers.
    data = {
      label = "beemesh-data";
      type = "linux-generic";
      format = "ext4";
    };
  };

  # The seed of every UUID systemd-repart derives (partition table, partitions, file
  # systems): a hash of this layout, so the same layout gives the same UUIDs.
  seed =
    let
      h = builtins.hashString "sha256" (builtins.toJSON partitions);
      s = builtins.substring;
    in
    "${s 0 8 h}-${s 8 4 h}-${s 12 4 h}-${s 16 4 h}-${s 20 12 h}";
}
