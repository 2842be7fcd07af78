# Every VM test, by scenario name: the flake's checks.<system>.vm-<name> and `nix run .#vm-test`.
{ pkgs, self }:
let
  helper = import ./lib.nix { inherit pkgs self; };
in
pkgs.lib.genAttrs (import ./scenarios.nix) (name: import (./. + "/${name}.nix") helper)
