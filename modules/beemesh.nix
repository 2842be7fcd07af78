# services.beemesh: the BeeMesh node daemon (`beemesh node`, runtime/cli/src/daemon.rs).
#
# `settings` is the host config (DESIGN.md section 2, docs/reference.md) as Nix: it is rendered
# to host.toml and checked at build time with `beemesh config check`, so a wrong option fails
# `nix build`, not the host at boot. Secrets never enter the Nix store: a fleet ticket's key,
# the API token and a pre-made node identity reach the daemon as systemd credentials
# (LoadCredential=), and so does the admission ticket itself. Rootless Podman for the node's
# user is ./podman.nix, the unit's sandboxing ./hardening.nix, the appliance profile of the
# images ./appliance.nix.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  cfg = config.services.beemesh;
  pure = import ./lib.nix;
  tomlFormat = pkgs.formats.toml { };

  uid = config.users.users.${cfg.user}.uid;

  # Every key services.beemesh sets on its own (each with mkDefault).
  defaultSettings = import ./settings-defaults.nix {
    inherit (cfg) dataDir;
    inherit uid;
    podman = cfg.podman.enable;
    ticket = cfg.ticketFile != null;
    ticketKey = cfg.ticketKeyFile != null;
    apiToken = cfg.apiTokenFile != null;
  };

  # The checker runs at build time, so it must run on the build platform.
  canCheck = cfg.checkConfig && pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;

  hostToml = pkgs.runCommand "beemesh-host.toml" { preferLocalBuild = true; } ''
    ${lib.optionalString canCheck ''
      # Unknown keys, malformed keys and addresses, impossible thresholds: fail the build.
      ${lib.getExe cfg.package} config check ${cfg.configFile}
    ''}
    cp ${cfg.configFile} $out
  '';

  credentials =
    lib.optional (cfg.ticketFile != null) "ticket:${cfg.ticketFile}"
    ++ lib.optional (cfg.ticketKeyFile != null) "ticket.key:${cfg.ticketKeyFile}"
    ++ lib.optional (cfg.apiTokenFile != null) "api-token:${cfg.apiTokenFile}"
    ++ lib.optional (cfg.nodeKeyFile != null) "node.key:${cfg.nodeKeyFile}";

  # The node identity lives in data_dir (0600, owned by the node user); a pre-made one (so that
  # the PeerId is known before the first boot, for per-node tickets and bootstrap addresses)
  # is copied there from its credential before every start. Atomically, as the daemon writes
  # its own (runtime/manifest/src/input.rs): a temporary file, fsynced, renamed over the old
  # one, the directory fsynced; a power cut leaves the old key or the new one, never a part.
  installNodeKey = pkgs.writeShellScript "beemesh-install-node-key" ''
    set -eu
    dir=${lib.escapeShellArg cfg.dataDir}
    tmp="$dir/.node.key.install"
    rm -f "$tmp"
    install -m 0600 "$CREDENTIALS_DIRECTORY/node.key" "$tmp"
    sync "$tmp"
    mv -f "$tmp" "$dir/node.key"
    sync "$dir"
  '';

  partition = cfg.configPartition;

  # The config partition is taken from the boot disk only (DESIGN.md section 2), never from
  # whatever disk carries a partition of that label: a USB stick labelled BEEMESH must not
  # supply the trust roots. The same script as the Debian image's (one implementation, tested
  # by runtime/image/tests/config_partition.rs): the boot disk holds the file system mounted
  # at /usr (the disk image's erofs store), / or /iso (the ISO's boot medium), as the kernel's
  # mount table says; on it, the partition whose GPT name or FAT label is the label.
  findConfigPartition = pkgs.writeShellScript "beemesh-find-config-partition" (
    builtins.readFile ../runtime/image/rootfs/usr/lib/beemesh/find-config-partition
  );

  # The same behaviour as the Debian image's beemesh-config.service (runtime/image/rootfs):
  # the files of the boot disk's BEEMESH FAT partition are read with mtools (nothing is
  # mounted) and copied to /run/beemesh-config, root's and readable by the node's group only
  # (the node cannot change its own configuration); *.network, *.netdev and *.link files under
  # network/ go to /run/systemd/network, where systemd-networkd picks them up.
  copyConfigPartition = ''
    dest=${pure.configPartitionCopy}
    if ! dev=$(${findConfigPartition} ${lib.escapeShellArg partition.label} / /usr /iso); then
      echo "beemesh-config: not reading any config partition (see above); the node uses /etc/beemesh/host.toml" >&2
      exit 1
    fi
    if [ -z "$dev" ]; then
      echo "beemesh-config: no ${partition.label} partition on the boot disk; the node uses /etc/beemesh/host.toml"
      exit 0
    fi
    tmp=$(mktemp -d /run/.beemesh-config.XXXXXX)
    # An empty partition has nothing to match: not an error.
    MTOOLS_SKIP_CHECK=1 mcopy -s -n -i "$dev" '::*' "$tmp/" 2>/dev/null || true
    rm -f "$tmp/README.txt"
    chown -R root:${cfg.group} "$tmp"
    find "$tmp" -type d -exec chmod 0750 {} +
    find "$tmp" -type f -exec chmod 0640 {} +
    rm -rf "$dest"
    mv "$tmp" "$dest"
    if [ -d "$dest/network" ]; then
      install -d -m 0755 /run/systemd/network
      for f in "$dest"/network/*.network "$dest"/network/*.netdev "$dest"/network/*.link; do
        if [ -f "$f" ]; then install -m 0644 "$f" /run/systemd/network/; fi
      done
    fi
    echo "beemesh-config: copied $(cd "$dest" && find . -type f | sort | tr '\n' ' ') from $dev"
  '';

  listen = cfg.settings.mesh.listen or pure.defaultListen;
  ports = pure.listenPorts listen;
  mdns = cfg.settings.mesh.mdns or true;
in
{
  options.services.beemesh = {
    enable = lib.mkEnableOption "the BeeMesh node daemon, which joins this host to a BeeMesh mesh";

    package = lib.mkOption {
      type = lib.types.package;
      defaultText = lib.literalExpression "beemesh.packages.\${system}.beemesh";
      description = ''
        The `beemesh` package. The flake's `nixosModules.beemesh` sets it to the flake's
        package.
      '';
    };

    user = lib.mkOption {
      type = lib.types.str;
      default = "beemesh";
      description = ''
        The unprivileged user the daemon runs as, and whose rootless Podman runs the
        workloads. It needs a static uid (its unit names `user@<uid>.service`); the default
        user gets {option}`users.users.beemesh.uid` 7420 (override it if that uid is taken).
      '';
    };

    group = lib.mkOption {
      type = lib.types.str;
      default = "beemesh";
      description = ''
        The daemon's group. Members may use the node's API socket
        (`/run/beemesh/api.sock`, mode 0660), i.e. `beemesh status`, `get`, `apply`.
      '';
    };

    dataDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/beemesh";
      description = ''
        The node's state (`[node] data_dir`: identity, desired state, Raft logs) and the home
        of {option}`services.beemesh.user` (its Podman storage).
      '';
    };

    logLevel = lib.mkOption {
      type = lib.types.str;
      default = "info";
      example = "info,beemesh_mesh=debug";
      description = "The daemon's log filter (`BEEMESH_LOG`), in `tracing` `EnvFilter` syntax.";
    };

    settings = lib.mkOption {
      type = lib.types.submodule { freeformType = tomlFormat.type; };
      default = { };
      example = lib.literalExpression ''
        {
          node.labels = { zone = "eu-1"; power = "solar"; };
          mesh.bootstrap = [ "/ip4/192.0.2.10/tcp/4001/p2p/12D3KooW..." ];
          trust = {
            domain = "example.org";
            signers = [ "ed25519:Wl7TJmUNtlOsCpkmT0DMSB2e41W/NmcBK7c1uRjE+BU=" ];
            admission = "ed25519:+RJ3ZEuLLUcUpJYvR2+hWM2dUww2bdgsQKR5JQcny6o=";
          };
        }
      '';
      description = ''
        The host config, `host.toml` (see docs/reference.md for every key). Rendered to TOML
        and checked with `beemesh config check` at build time. The module sets `node.data_dir`,
        `runtime`, `api.socket`, `sandbox.landlock` and, with
        {option}`services.beemesh.ticketFile` and {option}`services.beemesh.ticketKeyFile`,
        `trust.ticket` and `trust.ticket_key` (all with `mkDefault`); a
        `[trust]` section with at least `domain` and `signers` must come from you (or from
        the config partition, see {option}`services.beemesh.configPartition.enable`).
      '';
    };

    configFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = if cfg.settings ? trust then tomlFormat.generate "host.toml" cfg.settings else null;
      defaultText = lib.literalMD ''
        {option}`services.beemesh.settings` rendered to TOML when they have a `[trust]`
        section, otherwise `null`
      '';
      description = ''
        The host config installed as `/etc/beemesh/host.toml` (and checked at build time).
        `null` installs none: the host's config must then come from the config partition.
      '';
    };

    checkConfig = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Run `beemesh config check` on the host config at build time. Skipped when the build
        platform cannot run the host platform's binary.
      '';
    };

    ticketFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = "/run/keys/beemesh-ticket";
      description = ''
        This node's admission ticket (`beemesh ticket issue`), passed to the daemon as a
        systemd credential; `trust.ticket` then points at it. The ticket itself admits nobody
        (a fleet ticket needs its key, {option}`services.beemesh.ticketKeyFile`; a peer ticket
        names its node's PeerId), but keep it out of the Nix store anyway.
      '';
    };

    ticketKeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = "/run/keys/beemesh-ticket.key";
      description = ''
        The secret key of a fleet ticket (the `FILE.key` that `beemesh ticket issue --out
        FILE` writes beside it), passed to the daemon as a systemd credential;
        `trust.ticket_key` then points at it. Required with a fleet ticket, not used with a
        peer ticket (`--peer`). A path outside the Nix store (which is world-readable): the
        key is what makes a fleet ticket admit its holder.
      '';
    };

    apiTokenFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = ''
        The bearer token of the TCP API listener (`[api] listen`), passed as a systemd
        credential; `api.token_file` then points at it. A path outside the Nix store.
      '';
    };

    nodeKeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = ''
        A node identity made in advance (`beemesh key gen`), so that the PeerId is known
        before the node first starts (per-node tickets, `/p2p/` bootstrap addresses). Passed as
        a systemd credential and copied to `''${dataDir}/node.key` before every start. Without
        it the node creates its identity at first start. A path outside the Nix store.
      '';
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Open the TCP and UDP ports of `[mesh] listen` (4001 by default; QUIC is UDP) and, with
        `[mesh] mdns`, UDP 5353. The API (`[api] listen`) is never opened.
      '';
    };

    configPartition = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = ''
          Read the host's config from the FAT partition labelled (or GPT-named)
          {option}`services.beemesh.configPartition.label` on the boot disk at boot, as
          flashed images do; the same label on any other disk (a USB stick) is ignored
          (DESIGN.md section 8): its files are copied to `/run/beemesh-config` (root's,
          readable by the node's group), whose
          `host.toml` (with the `ticket` beside it) the daemon prefers to
          `/etc/beemesh/host.toml` (a fleet ticket's `ticket.key` is beside the ticket too),
          and its `network/*.network` files configure
          systemd-networkd. The partition's `host.toml` must keep `node.data_dir` at
          {option}`services.beemesh.dataDir`, the only directory the unit may write.
        '';
      };

      label = lib.mkOption {
        type = lib.types.str;
        default = pure.configPartitionLabel;
        description = "The label of the config partition.";
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.configFile != null || partition.enable;
        message = ''
          services.beemesh: the host config needs a [trust] section: set
          services.beemesh.settings.trust (domain, signers, admission), or
          services.beemesh.configFile, or enable services.beemesh.configPartition.
        '';
      }
      {
        assertion = cfg.ticketKeyFile == null || cfg.ticketFile != null;
        message = ''
          services.beemesh: ticketKeyFile is set without ticketFile; the key belongs to a
          fleet ticket: set services.beemesh.ticketFile too.
        '';
      }
      {
        assertion = (cfg.settings.node.data_dir or cfg.dataDir) == cfg.dataDir;
        message = ''
          services.beemesh: settings.node.data_dir differs from services.beemesh.dataDir;
          set services.beemesh.dataDir instead (the unit's sandbox and the user's home follow it).
        '';
      }
      {
        assertion = uid != null;
        message = ''
          services.beemesh: users.users.${cfg.user}.uid must be set: the unit names
          user@<uid>.service and /run/user/<uid>.
        '';
      }
    ];

    services.beemesh.settings = lib.mapAttrsRecursive (_: lib.mkDefault) defaultSettings;

    environment.systemPackages = [ cfg.package ];

    environment.etc."beemesh/host.toml" = lib.mkIf (cfg.configFile != null) { source = hostToml; };

    users.users = lib.mkIf (cfg.user == "beemesh") {
      beemesh = {
        isSystemUser = true;
        uid = lib.mkDefault 7420;
        group = cfg.group;
        description = "BeeMesh node";
        home = cfg.dataDir;
        createHome = true;
        homeMode = "700";
      };
    };

    users.groups = lib.mkIf (cfg.group == "beemesh") { beemesh.gid = lib.mkDefault 7420; };

    systemd.tmpfiles.settings."10-beemesh" = {
      # Also fixes owner and mode when dataDir is the (new) data partition's mount point.
      ${cfg.dataDir}.d = {
        inherit (cfg) user group;
        mode = "0700";
      };
      # The API socket's directory, the only place under /run the node writes. The config
      # partition's copy is root's, beside it (/run/beemesh-config), never beneath it.
      "/run/beemesh".d = {
        inherit (cfg) user group;
        mode = "0755";
      };
    };

    networking.firewall = lib.mkIf cfg.openFirewall {
      allowedTCPPorts = ports.tcp;
      allowedUDPPorts = ports.udp ++ lib.optional mdns pure.mdnsPort;
    };

    systemd.services.beemesh = {
      description = "BeeMesh node";
      documentation = [ "https://github.com/beemesh/beemesh/blob/main/docs/reference.md" ];
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ] ++ lib.optional partition.enable "beemesh-config.service";
      after = [ "network-online.target" ] ++ lib.optional partition.enable "beemesh-config.service";
      restartTriggers = lib.optional (cfg.configFile != null) hostToml;
      environment.BEEMESH_LOG = cfg.logLevel;

      # With the config partition the daemon chooses by itself (runtime/cli/src/daemon.rs):
      # the partition's copy, else /etc/beemesh/host.toml. Without a usable file it does not
      # start rather than fail.
      unitConfig = lib.mkIf partition.enable {
        ConditionPathExists = [
          "|${pure.configPartitionCopy}/host.toml"
          "|/etc/beemesh/host.toml"
        ];
      };

      serviceConfig = {
        # READY=1 once the API is served and the mesh listeners are up (runtime/node/src/notify.rs).
        Type = "notify";
        NotifyAccess = "main";
        WatchdogSec = "60s";
        ExecStartPre = lib.optional (cfg.nodeKeyFile != null) installNodeKey;
        ExecStart = utils.escapeSystemdExecArgs (
          [
            (lib.getExe cfg.package)
            "node"
          ]
          ++ lib.optionals (!partition.enable) [
            "--config"
            "/etc/beemesh/host.toml"
          ]
        );
        User = cfg.user;
        Group = cfg.group;
        LoadCredential = credentials;
        Restart = "on-failure";
        RestartSec = "5s";
        LimitNOFILE = 65536;
      };
    };

    systemd.services.beemesh-config = lib.mkIf partition.enable {
      description = "BeeMesh config partition";
      wantedBy = [ "sysinit.target" ];
      # No device to wait for: the boot disk's partitions are known to the kernel before
      # /usr (or /iso) is mounted in the initrd.
      after = [ "systemd-tmpfiles-setup-dev.service" ];
      before = [
        "systemd-networkd.service"
        "network-pre.target"
        "beemesh.service"
        "shutdown.target"
      ];
      conflicts = [ "shutdown.target" ];
      unitConfig.DefaultDependencies = false;
      path = [
        pkgs.coreutils
        pkgs.findutils
        pkgs.mtools
        pkgs.util-linux # blkid, for find-config-partition
      ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      script = copyConfigPartition;
    };
  };
}
