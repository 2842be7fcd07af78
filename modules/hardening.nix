# Sandboxing of beemesh.service, on top of what the daemon does to itself (DESIGN.md
# section 6: no capabilities, no_new_privs, Landlock confinement to its own files and
# sockets, runtime/sandbox). Every single-valued setting is a mkDefault, so one can be relaxed
# alone; the lists are ordinary definitions, so a configuration adds to them (mkForce replaces).
#
# What the daemon needs, and so what stays allowed:
#   - writes to its data directory and to /run/beemesh (the API socket) only; never to its
#     configuration (/etc/beemesh, /run/beemesh-config, its credentials), which stays
#     read-only under ProtectSystem=strict as under its own Landlock rules;
#   - its rootless Podman's API socket (./podman.nix binds it into the hidden /run/user);
#   - the Landlock system calls, prctl and capset (it drops what it holds itself), setrlimit
#     and prlimit (memory limits of containers on cgroup v1, docs/drivers.md);
#   - /proc of the containers' processes, which belong to the user and its subordinate ids
#     (resource usage), hence no ProtectProc=invisible;
#   - unix, IPv4, IPv6 and netlink sockets (libp2p watches interfaces over netlink).
# With the podman driver it creates no namespaces: rootless Podman runs in the user's own
# systemd instance, outside this unit, so RestrictNamespaces= costs it nothing.
# With the process driver, workloads are children of the daemon and inherit all of this
# (docs/drivers.md): MemoryDenyWriteExecute= in particular would break JIT runtimes, so it is
# only set for the podman driver. The process driver also runs its workloads in a user and
# mount namespace of their own, where the API socket's directory, the data directory and the
# config are covered (so a workload cannot use the node's API): the daemon makes it at start
# (unshare, mount) and every workload joins it (setns), so for that driver the unit allows
# user and mount namespaces and the @mount system calls; the daemon fails to start rather
# than run workloads without it.
{ config, lib, ... }:
let
  cfg = config.services.beemesh;
  podmanDriver = (cfg.settings.runtime.driver or "podman") == "podman";
  landlock = (cfg.settings.sandbox.landlock or "required") != "off";
in
{
  options.services.beemesh.hardening.enable = lib.mkOption {
    type = lib.types.bool;
    default = true;
    description = ''
      Sandbox beemesh.service with systemd (read-only system, no capabilities, a system call
      filter, no new namespaces) and make sure Landlock is among the kernel's LSMs.
    '';
  };

  config = lib.mkIf (cfg.enable && cfg.hardening.enable) {
    # `[sandbox] landlock = "required"` (the default) refuses to start without Landlock.
    # NixOS lists it by default; this states the dependency (security.lsm becomes the kernel's
    # lsm= parameter, and the kernel ignores a repeated entry).
    security.lsm = lib.mkIf landlock [ "landlock" ];

    systemd.services.beemesh.serviceConfig = lib.mapAttrs (_: lib.mkDefault) {
      ProtectSystem = "strict";
      ProtectHome = "tmpfs";
      PrivateTmp = true;
      PrivateDevices = true;
      DevicePolicy = "closed";
      PrivateMounts = true;
      ProtectKernelTunables = true;
      ProtectKernelModules = true;
      ProtectKernelLogs = true;
      ProtectControlGroups = true;
      ProtectClock = true;
      ProtectHostname = true;

      NoNewPrivileges = true;
      CapabilityBoundingSet = "";
      AmbientCapabilities = "";
      RestrictSUIDSGID = true;
      RestrictNamespaces = if podmanDriver then true else "user mnt";
      RestrictRealtime = true;
      LockPersonality = true;
      MemoryDenyWriteExecute = podmanDriver;
      UMask = "0077";
      SystemCallArchitectures = "native";
      SystemCallErrorNumber = "EPERM";
    } // {
      ReadWritePaths = [
        cfg.dataDir
        "/run/beemesh"
      ];
      RestrictAddressFamilies = [
        "AF_UNIX"
        "AF_INET"
        "AF_INET6"
        "AF_NETLINK"
      ];
      SystemCallFilter = [
        "@system-service"
        "landlock_create_ruleset"
        "landlock_add_rule"
        "landlock_restrict_self"
      ]
      # The process driver's workload namespace (runtime/driver/src/process/isolation.rs).
      ++ lib.optional (!podmanDriver) "@mount";
    };
  };
}
