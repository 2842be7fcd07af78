# The node ISO (a live system, e.g. for hosts without a disk to flash), built by upstream
# system.build.images.iso (nixos/modules/image/images.nix, the iso-image.nix module). It runs
# from memory; its config comes from a FAT file system labelled BEEMESH on any disk or USB
# stick, exactly as on the disk image, and the node's state lives in memory.
{ lib, ... }:
{
  imports = [ ./common.nix ];

  image.modules.iso = {
    isoImage = {
      volumeID = "BEEMESH_NODE";
      makeEfiBootable = true;
      makeUsbBootable = true;
    };
  };

  # This configuration is only ever booted as the ISO, which brings its own boot loader and
  # file systems (they override these).
  boot.loader.grub.enable = false;
  fileSystems."/" = lib.mkDefault {
    fsType = "tmpfs";
    options = [ "mode=0755" ];
  };
}
