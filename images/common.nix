# What every BeeMesh node image has: the appliance profile, the image host defaults (the same
# file the Debian builder reads) and an image identity. The flake adds nixosModules.beemesh.
{ config, lib, ... }:
let
  # Every section but [trust]: a fleet's keys come from the config partition or from the
  # fleet's own image (services.beemesh.settings.trust).
  hostDefaults = builtins.fromTOML (builtins.readFile ./host-defaults.toml);
in
{
  imports = [ ../modules/appliance.nix ];

  services.beemesh.settings = lib.mapAttrsRecursive (_: lib.mkDefault) hostDefaults;

  system.image = {
    id = "beemesh-node";
    version = config.services.beemesh.package.version;
  };

  # One generic image is flashed to many hosts: the name comes from DHCP, and the node's name
  # from the config partition's host.toml ([node] name), else from the host name.
  networking.hostName = lib.mkDefault "";

  # Kernel messages and the boot on the serial console too (servers, VMs).
  boot.kernelParams = [
    "console=tty0"
    "console=ttyS0,115200n8"
  ];

  system.stateVersion = "25.11";
}
