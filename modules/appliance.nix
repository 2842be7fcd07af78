# The appliance profile of BeeMesh node images (images/*.nix): a host that boots into the
# mesh and offers no way in but the node's API. No SSH and no password logins, the journal
# kept in memory, systemd-networkd with DHCP on every Ethernet port, and the host's own config
# read from the BEEMESH partition at boot (the same behaviour as the Debian image's).
# The settings are mkDefaults (or additions), so a fleet's image can change them, for example
# add a way in (SSH with keys).
{ lib, ... }:
{
  imports = [ ./default.nix ];

  services.beemesh = {
    enable = lib.mkDefault true;
    openFirewall = lib.mkDefault true;
    configPartition.enable = lib.mkDefault true;
  };

  # No way to log in: no SSH server, no passwords, no root password.
  services.openssh.enable = lib.mkDefault false;
  users.mutableUsers = lib.mkDefault false;
  users.users.root.hashedPassword = lib.mkDefault "!";
  # Needed because of the above: nobody, not even root, can log in.
  users.allowNoPasswordLogin = lib.mkDefault true;
  security.sudo.enable = lib.mkDefault false;

  # The daemon logs to journald; the root file system is a tmpfs, so the journal stays in
  # memory, bounded.
  services.journald.storage = lib.mkDefault "volatile";
  services.journald.extraConfig = lib.mkDefault ''
    RuntimeMaxUse=64M
  '';

  # Every Ethernet port asks DHCP unless a file from the config partition
  # (/run/systemd/network, which wins) configures it; one configured port is enough.
  networking.useNetworkd = lib.mkDefault true;
  networking.useDHCP = lib.mkDefault false;
  systemd.network.networks."80-dhcp" = {
    matchConfig.Type = "ether";
    networkConfig = {
      DHCP = "yes";
      LinkLocalAddressing = "no";
    };
  };
  systemd.network.wait-online.anyInterface = lib.mkDefault true;

  # An appliance is replaced, not rebuilt in place.
  nix.enable = lib.mkDefault false;
  system.disableInstallerTools = lib.mkDefault true;
  documentation.enable = lib.mkDefault false;
  environment.defaultPackages = lib.mkDefault [ ];
}
