# agex for Nix users: the package, the NixOS module and `nix run`.
#
#   inputs.agex.url = "git+https://example.invalid/agex";
#   outputs = { nixpkgs, agex, ... }: {
#     nixosConfigurations.bunk = nixpkgs.lib.nixosSystem {
#       modules = [ agex.nixosModules.default { services.agex.enable = true; services.agex.configDir = ./agex; } ];
#     };
#   };
{
  description = "agex: age-encrypted secrets, activation and dual Restic+Borg backups for a host kept in git";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAll (pkgs: {
        default = pkgs.rustPlatform.buildRustPackage {
          pname = "agex";
          version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).workspace.package.version;
          # The whole tree: the patched crates under vendor/ are path dependencies.
          src = pkgs.lib.cleanSource ./.;
          cargoLock.lockFile = ./Cargo.lock;
          cargoBuildFlags = [ "--package" "agex-cli" ];
          # aws-lc-sys (rustls' crypto) builds C with cmake; rusqlite bundles SQLite.
          nativeBuildInputs = [ pkgs.cmake pkgs.perl pkgs.makeWrapper ];
          # The end-to-end tests need root, sshd, PostgreSQL and network on 127.0.0.1;
          # they run in the project's CI, not in the sandbox.
          doCheck = false;
          # borg and ssh are run as programs; the system's own come first.
          postInstall = ''
            wrapProgram $out/bin/agex --suffix PATH : ${pkgs.lib.makeBinPath [ pkgs.borgbackup pkgs.openssh ]}
          '';
          meta = {
            description = "age-encrypted secrets, activation and dual Restic+Borg backups";
            license = with pkgs.lib.licenses; [ mit asl20 ];
            mainProgram = "agex";
            platforms = pkgs.lib.platforms.linux;
          };
        };
      });

      # The module of nix/module.nix, with this flake's package as its default.
      nixosModules.default = { pkgs, lib, ... }: {
        imports = [ ./nix/module.nix ];
        services.agex.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };

      apps = forAll (pkgs: {
        default = {
          type = "app";
          program = "${self.packages.${pkgs.stdenv.hostPlatform.system}.default}/bin/agex";
        };
      });
    };
}
