# Rootless Podman for the BeeMesh node's user (docs/drivers.md): subordinate uid and gid
# ranges, lingering (so the user's systemd instance, and with it the Podman API socket, runs
# without a login), slirp4netns and runc, and the user's Podman API socket at
# /run/user/<uid>/podman/podman.sock, which the daemon reaches through `[runtime] podman_socket`.
#
# The socket is the upstream podman.socket user unit, which virtualisation.podman enables for
# every user (nixos/modules/virtualisation/podman); the ordering on user@<uid>.service follows
# the rootless containers of virtualisation.oci-containers.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.beemesh;
  uid = toString config.users.users.${cfg.user}.uid;
  runtimeDir = "/run/user/${uid}";
  home = config.users.users.${cfg.user}.home;

  # The user's own containers.conf, beside the system one: the runtime and rootless network
  # the podman driver is tested with (the same settings as the Debian image's).
  containersConf = (pkgs.formats.toml { }).generate "containers.conf" {
    engine.runtime = "runc";
    network.default_rootless_network_cmd = "slirp4netns";
  };
in
{
  options.services.beemesh.podman.enable = lib.mkOption {
    type = lib.types.bool;
    default = true;
    description = ''
      Rootless Podman for {option}`services.beemesh.user`, for the podman driver (the default
      `[runtime] driver`). Without it the module's defaults select the process driver.
    '';
  };

  config = lib.mkIf (cfg.enable && cfg.podman.enable) {
    virtualisation.podman = {
      enable = true;
      # Replicas get their network namespace from slirp4netns (runtime/driver/src/podman);
      # runc is one of the wrapper's runtimes already.
      extraPackages = [ pkgs.slirp4netns ];
    };

    users.users.${cfg.user} = {
      autoSubUidGidRange = lib.mkDefault true;
      linger = true;
    };

    systemd.tmpfiles.settings."10-beemesh-podman" = {
      "${home}/.config".d = {
        inherit (cfg) user group;
        mode = "0700";
      };
      "${home}/.config/containers".d = {
        inherit (cfg) user group;
        mode = "0700";
      };
      "${home}/.config/containers/containers.conf"."L+".argument = toString containersConf;
    };

    systemd.services.beemesh = {
      # Start the user's systemd instance (and its podman.socket) first, lingering or not.
      requires = [ "user@${uid}.service" ];
      after = [
        "user@${uid}.service"
        "linger-users.service"
      ];
      # For a config without `[runtime] podman_socket` (a config partition's, say): the
      # daemon's default is $XDG_RUNTIME_DIR/podman/podman.sock.
      environment.XDG_RUNTIME_DIR = runtimeDir;
      # ProtectHome= (./hardening.nix) hides /run/user; show the daemon its Podman socket only.
      serviceConfig.BindReadOnlyPaths = lib.mkIf cfg.hardening.enable [ "${runtimeDir}/podman" ];
    };
  };
}
