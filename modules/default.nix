# The BeeMesh NixOS modules: services.beemesh, rootless Podman for its user, the unit's
# hardening. The flake exports this as nixosModules.beemesh (with the package set); the
# appliance profile of the images is ./appliance.nix (nixosModules.appliance).
{
  imports = [
    ./beemesh.nix
    ./podman.nix
    ./hardening.nix
  ];
}
