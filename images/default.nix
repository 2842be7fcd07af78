# The image packages of the flake: `nix build .#image-raw`, `.#image-qcow2`, `.#image-iso`.
{ pkgs, nixosConfigurations }:
let
  node = nixosConfigurations.node.config;
  inherit (node.image.repart) imageFile imageFileBasename;
in
{
  # $out/beemesh-node_<version>.raw (and systemd-repart's JSON report of the partitions).
  image-raw = node.system.build.image;

  # The same disk for VMs, with room for the data partition: a sparse 8 GiB virtual size
  # (systemd-repart moves the backup GPT to the end of the grown disk at first boot).
  image-qcow2 =
    pkgs.runCommand "${imageFileBasename}-qcow2"
      {
        nativeBuildInputs = [ pkgs.qemu-utils ];
      }
      ''
        mkdir -p $out
        qemu-img convert -f raw -O qcow2 ${node.system.build.image}/${imageFile} $out/${imageFileBasename}.qcow2
        qemu-img resize $out/${imageFileBasename}.qcow2 8G
      '';

  # $out/iso/<name>.iso
  image-iso = nixosConfigurations.node-iso.config.system.build.images.iso;
}
