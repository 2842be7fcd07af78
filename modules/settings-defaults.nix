# The host.toml keys that services.beemesh sets by default (with lib.mkDefault, so each one can
# be overridden). modules/beemesh.nix passes its option values; everything here is pure (no
# nixpkgs), so runtime/cli/tests/nix_settings.rs evaluates this file with a bare
# nix-instantiate and checks every key it can produce with `beemesh config check`.
{
  # services.beemesh.dataDir
  dataDir ? "/var/lib/beemesh",
  # The node user's uid: its rootless Podman API socket is /run/user/<uid>/podman/podman.sock.
  uid ? 7420,
  # services.beemesh.podman.enable: the podman driver through that socket.
  podman ? true,
  # services.beemesh.ticketFile is set: the ticket arrives as a systemd credential.
  ticket ? false,
  # services.beemesh.ticketKeyFile is set: a fleet ticket's secret key, likewise.
  ticketKey ? false,
  # services.beemesh.apiTokenFile is set: the bearer token of [api] listen, likewise.
  apiToken ? false,
}:
let
  pure = import ./lib.nix;
in
{
  node.data_dir = dataDir;

  runtime =
    {
      driver = if podman then "podman" else "process";
    }
    // (
      if podman then
        {
          network = "slirp4netns";
          podman_socket = "/run/user/${toString uid}/podman/podman.sock";
        }
      else
        { }
    );

  api =
    {
      socket = "/run/beemesh/api.sock";
    }
    // (if apiToken then { token_file = "${pure.credentialsDir}/api-token"; } else { });

  sandbox.landlock = "required";
}
// (
  if ticket || ticketKey then
    {
      trust =
        (if ticket then { ticket = "${pure.credentialsDir}/ticket"; } else { })
        // (if ticketKey then { ticket_key = "${pure.credentialsDir}/ticket.key"; } else { });
    }
  else
    { }
)
