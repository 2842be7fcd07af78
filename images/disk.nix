# The node disk image for bare metal (raw, EFI) and VMs (qcow2, converted from the raw image by
# images/default.nix), built with upstream image.repart (nixos/modules/image/repart.nix) in
# the layout of images/layout.nix, the Debian builder's:
#   esp           systemd-boot and a unified kernel image (UKI)
#   beemesh-root  erofs, read-only: the Nix store (and /usr/bin/env), mounted at /usr (GPT
#                 type usr); / is a tmpfs and /nix/store is bound from /usr/nix/store, as in
#                 nixpkgs' appliance-repart-image-verity-store test
#   BEEMESH       FAT, empty: host.toml, ticket, ticket.key, network/*.network
#                 (`beemesh image configure`)
#   beemesh-data  ext4, created by systemd-repart at first boot and grown with the disk;
#                 mounted at the node's data directory (node state and Podman storage)
# Unlike the Debian image, /var itself is not the data partition: NixOS mounts /var in the
# initrd, before a partition created at first boot can exist; it is part of the tmpfs root.
{
  config,
  lib,
  pkgs,
  modulesPath,
  ...
}:
let
  layout = import ./layout.nix;
  p = layout.partitions;
  efiArch = pkgs.stdenv.hostPlatform.efiArch;
  inherit (config.system.boot.loader) ukiFile;
in
{
  imports = [
    ./common.nix
    (modulesPath + "/image/repart.nix")
    # Storage and network drivers for bare metal, and virtio for VMs, in the initrd.
    (modulesPath + "/profiles/all-hardware.nix")
  ];

  # systemd-boot is put on the ESP by image.repart below; nothing installs a boot loader.
  boot.loader.grub.enable = false;
  boot.initrd.systemd.enable = true;

  fileSystems = {
    "/" = {
      fsType = "tmpfs";
      options = [ "mode=0755" ];
    };
    "/usr" = {
      device = "/dev/disk/by-partlabel/${p.root.label}";
      fsType = p.root.format;
      options = [ "ro" ];
    };
    "/nix/store" = {
      device = "/usr/nix/store";
      fsType = "none";
      options = [ "bind" ];
    };
    ${config.services.beemesh.dataDir} = {
      device = "/dev/disk/by-partlabel/${p.data.label}";
      fsType = p.data.format;
      options = [
        "nodev"
        "nosuid"
        "x-systemd.growfs"
        "x-systemd.after=systemd-repart.service"
        "x-systemd.device-timeout=120s"
      ];
    };
  };

  # /usr is read-only: no /usr/bin/env to create at activation (the image has its own).
  system.activationScripts.usrbinenv = lib.mkForce "";

  # The data partition, at every boot: created behind the image's partitions the first time,
  # grown when the disk has grown. systemd-repart finds the disk through /usr (/ is a tmpfs).
  systemd.repart = {
    enable = true;
    partitions."50-data" = {
      Type = p.data.type;
      Label = p.data.label;
      Format = p.data.format;
    };
  };
  # mkfs.ext4 for Format= above.
  systemd.services.systemd-repart.path = [ pkgs.e2fsprogs ];

  image.repart = {
    name = config.system.image.id;
    inherit (layout) seed;
    partitions = {
      "10-esp" = {
        contents = {
          "/EFI/BOOT/BOOT${lib.toUpper efiArch}.EFI".source =
            "${pkgs.systemd}/lib/systemd/boot/efi/systemd-boot${efiArch}.efi";
          # A Boot Loader Specification type #2 entry: systemd-boot finds it by itself.
          "/EFI/Linux/${ukiFile}".source = "${config.system.build.uki}/${ukiFile}";
        };
        repartConfig = {
          Type = p.esp.type;
          Format = p.esp.format;
          Label = p.esp.label;
          SizeMinBytes = p.esp.size;
          SizeMaxBytes = p.esp.size;
        };
      };
      "20-root" = {
        storePaths = [ config.system.build.toplevel ];
        contents."/bin/env".source = "${pkgs.coreutils}/bin/env";
        repartConfig = {
          Type = p.root.type;
          Format = p.root.format;
          Label = p.root.label;
          Minimize = "best";
          ReadOnly = "yes";
        };
      };
      "30-config" = {
        repartConfig = {
          Type = p.config.type;
          Format = p.config.format;
          Label = p.config.label;
          SizeMinBytes = p.config.size;
          SizeMaxBytes = p.config.size;
        };
      };
    };
  };
}
