# The `beemesh` binary, built from the Cargo workspace with nixpkgs' rustPlatform.
{
  lib,
  rustPlatform,
  rustc,
  doCheck ? false,
}:
let
  workspace = (lib.importTOML ./Cargo.toml).workspace.package;
in
assert lib.assertMsg (lib.versionAtLeast rustc.version workspace.rust-version) ''
  beemesh needs Rust ${workspace.rust-version} or newer (Cargo.toml rust-version); this nixpkgs
  has ${rustc.version}. Use a newer nixpkgs (the flake pins a NixOS release that has it).
'';
rustPlatform.buildRustPackage {
  pname = "beemesh";
  inherit (workspace) version;

  src = lib.fileset.toSource {
    root = ./.;
    fileset = lib.fileset.unions [
      ./Cargo.toml
      ./Cargo.lock
      ./runtime
      # Test inputs: the examples, and the files runtime/cli/tests/nix_settings.rs checks.
      ./examples
      ./images/host-defaults.toml
      ./modules/settings-defaults.nix
      ./modules/lib.nix
    ];
  };

  cargoLock.lockFile = ./Cargo.lock;

  # One binary; the other workspace members are its libraries.
  cargoBuildFlags = [
    "--package"
    "beemesh-cli"
  ];
  cargoTestFlags = [ "--workspace" ];

  # The test suite runs in the flake's checks (checks.<system>.beemesh). Suites that need root,
  # rootless Podman or network namespaces skip themselves in the build sandbox.
  inherit doCheck;

  meta = {
    description = "Peer-to-peer mesh that places, runs and heals signed workloads on hosts that belong to no cluster";
    homepage = workspace.repository;
    license = lib.licenses.asl20;
    mainProgram = "beemesh";
    platforms = lib.platforms.linux;
  };
}
