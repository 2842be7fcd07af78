# `nix run .#vm-test [NAME...]`: runs the driver of every VM test (or of those whose name
# contains one of the NAMEs) in turn, each in a fresh temporary directory, and reports which
# failed. The drivers run QEMU directly, so this works where `nix build .#checks...` cannot
# (that needs the builder's "kvm" feature); without /dev/kvm, QEMU emulates the CPU (TCG).
{
  lib,
  writeShellApplication,
  coreutils,
  tests,
}:
let
  names = lib.attrNames tests;
in
writeShellApplication {
  name = "beemesh-vm-test";
  runtimeInputs = [ coreutils ];
  text = ''
    declare -A drivers=(
      ${lib.concatMapStringsSep "\n  " (
        n: "[${lib.escapeShellArg n}]=${lib.escapeShellArg "${tests.${n}.driver}/bin/nixos-test-driver"}"
      ) names}
    )
    all=(${lib.escapeShellArgs names})

    case "''${1:-}" in
      -h | --help)
        echo "usage: nix run .#vm-test [-- NAME...]"
        echo "Runs every BeeMesh VM test, or those whose name contains a NAME: ''${all[*]}"
        exit 0
        ;;
    esac

    selected=()
    for name in "''${all[@]}"; do
      if (($# == 0)); then
        selected+=("$name")
        continue
      fi
      for want in "$@"; do
        if [[ $name == *"$want"* ]]; then
          selected+=("$name")
          break
        fi
      done
    done
    if ((''${#selected[@]} == 0)); then
      echo "vm-test: no test matches: $*; the tests are: ''${all[*]}" >&2
      exit 2
    fi

    if [[ ! -e /dev/kvm ]]; then
      echo "vm-test: /dev/kvm is missing: the VMs run under software emulation (TCG)," >&2
      echo "vm-test: many times slower than with KVM; expect each test to take a long while." >&2
    elif [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
      echo "vm-test: /dev/kvm exists but $(id -un) cannot use it (add yourself to its group):" >&2
      echo "vm-test: the VMs run under software emulation (TCG), many times slower." >&2
    fi

    failed=()
    for name in "''${selected[@]}"; do
      dir=$(mktemp -d -t "beemesh-vm-$name.XXXXXX")
      echo "==> $name (state and logs in $dir)"
      if (cd "$dir" && "''${drivers[$name]}"); then
        echo "==> $name: passed"
        rm -rf "$dir"
      else
        echo "==> $name: FAILED (kept $dir)"
        failed+=("$name")
      fi
    done

    if ((''${#failed[@]})); then
      echo "vm-test: failed: ''${failed[*]}" >&2
      exit 1
    fi
    echo "vm-test: passed: ''${selected[*]}"
  '';
}
