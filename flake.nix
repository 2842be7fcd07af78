{
  description = "BeeMesh: a peer-to-peer mesh that places, runs and heals signed workloads on hosts that belong to no cluster";

  # NixOS 25.11 "Xantusia": its rustc is new enough for Cargo.toml's rust-version (1.90).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  # Only wiring here; the logic is in package.nix, modules/, images/ and vm-tests/.
  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      # The images are built for this platform.
      imageSystem = "x86_64-linux";

      nodeSystem =
        module:
        lib.nixosSystem {
          modules = [
            { nixpkgs.hostPlatform = imageSystem; }
            self.nixosModules.beemesh
            module
          ];
        };

      vmTests = pkgs: import ./vm-tests { inherit pkgs self; };
    in
    {
      packages = forAllSystems (
        pkgs:
        let
          beemesh = pkgs.callPackage ./package.nix { };
        in
        {
          inherit beemesh;
          default = beemesh;
        }
        // lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == imageSystem) (
          import ./images {
            inherit pkgs;
            inherit (self) nixosConfigurations;
          }
        )
      );

      nixosModules = {
        # services.beemesh, with the package from this flake.
        beemesh =
          { lib, pkgs, ... }:
          {
            imports = [ ./modules ];
            services.beemesh.package = lib.mkDefault (
              self.packages.${pkgs.stdenv.hostPlatform.system}.beemesh or (pkgs.callPackage ./package.nix { })
            );
          };
        # The appliance profile the images import (no logins, config partition, journald).
        appliance = {
          imports = [
            self.nixosModules.beemesh
            ./modules/appliance.nix
          ];
        };
        default = self.nixosModules.beemesh;
      };

      nixosConfigurations = {
        # packages.x86_64-linux.image-raw and image-qcow2
        node = nodeSystem ./images/disk.nix;
        # packages.x86_64-linux.image-iso
        node-iso = nodeSystem ./images/iso.nix;
      };

      checks = forAllSystems (
        pkgs:
        let
          beemesh = self.packages.${pkgs.stdenv.hostPlatform.system}.beemesh;
        in
        {
          # The package with its test suite.
          beemesh = beemesh.override { doCheck = true; };

          clippy = beemesh.overrideAttrs (old: {
            pname = "beemesh-clippy";
            nativeBuildInputs = old.nativeBuildInputs ++ [ pkgs.clippy ];
            buildPhase = ''
              runHook preBuild
              cargo clippy --workspace --all-targets --locked --offline -- -D warnings
              runHook postBuild
            '';
            installPhase = ''
              runHook preInstall
              touch $out
              runHook postInstall
            '';
            doCheck = false;
          });
        }
        # vm-mesh-join, vm-schedule, vm-node-loss, vm-unsigned-rejected, vm-state
        // lib.mapAttrs' (name: test: lib.nameValuePair "vm-${name}" test) (vmTests pkgs)
      );

      apps = forAllSystems (pkgs: {
        vm-test = {
          type = "app";
          program = lib.getExe (pkgs.callPackage ./vm-tests/run.nix { tests = vmTests pkgs; });
          meta.description = "Run every NixOS VM test driver in turn (optionally only those named)";
        };
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.beemesh ];
          packages = with pkgs; [
            # the toolchain (rustc and cargo come from the package)
            clippy
            rustfmt
            rust-analyzer
            # the driver and multi-host tests (.ci/setup-podman prepares a host without Nix)
            podman
            runc
            slirp4netns
            iproute2
            # the image builders and the local VM harness
            systemd
            erofs-utils
            dosfstools
            mtools
            qemu
            # scripts
            jq
          ];
        };
      });
    };
}
