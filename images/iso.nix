# The node ISO (a live system, e.g. for hosts without a disk to flash), built by upstream
# system.build.images.iso (nixos/modules/image/images.nix, the iso-image.nix module). It runs
# from memory and the node's state lives in memory. Its config comes, as on the disk image,
# only from the boot disk: a FAT partition labelled BEEMESH on the medium the ISO booted from
# (the disk holding /iso, e.g. a partition added behind the image on the USB stick it was
# written to). A BEEMESH partition on any other disk or stick is ignored (modules/beemesh.nix),
# so a host booted from a CD has no config partition and needs a baked host config.
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
