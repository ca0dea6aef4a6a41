# NixOS module for agex: decrypts the host's secrets into /run/agex at every system
# activation (switch and boot), like agenix and sops-nix, and installs the backup, check
# and drill timers generated from the policies.
#
#   imports = [ ./path/to/agex/nix/module.nix ];
#   services.agex = {
#     enable = true;
#     package = pkgs.callPackage ./path/to/agex { };   # or any derivation with bin/agex
#     configDir = ./secrets-repo;                      # agex.toml, secrets/, policies/
#   };
#
# NixOS keeps /etc/systemd/system in its store, so agex writes its units to the runtime
# unit directory /run/systemd/system (AGEX_UNIT_DIR) and links its timers into
# timers.target.wants there; /run is empty after a reboot, and the boot-time activation
# writes them again before systemd starts.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.agex;
  agex = "${cfg.package}/bin/agex";
  identityArgs = lib.concatMapStringsSep " " (p: "-i ${lib.escapeShellArg p}") cfg.identityPaths;
  args = lib.concatStringsSep " " [
    "-C ${lib.escapeShellArg "${cfg.configDir}"}"
    "--host ${lib.escapeShellArg cfg.host}"
    identityArgs
  ];
  unitDir = "/run/systemd/system";
in
{
  options.services.agex = {
    enable = lib.mkEnableOption "agex: age-encrypted secrets in /run/agex, dual backups and their timers";

    package = lib.mkOption {
      type = lib.types.package;
      description = "The agex package (its bin/agex is used).";
    };

    configDir = lib.mkOption {
      type = lib.types.path;
      description = ''
        The agex configuration directory: agex.toml, secrets/ (encrypted) and
        policies/. It is copied into the Nix store, which is fine: secrets stay
        encrypted there and are decrypted only into /run/agex.
      '';
    };

    host = lib.mkOption {
      type = lib.types.str;
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      description = "The host name in agex.toml whose secrets and schedule this machine gets.";
    };

    identityPaths = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ "/etc/ssh/ssh_host_ed25519_key" ];
      description = "Private keys that decrypt this host's secrets (usually its ssh host key).";
    };
  };

  config = lib.mkIf cfg.enable {
    environment.systemPackages = [ cfg.package ];

    # Runs on every `nixos-rebuild switch` and at boot (stage 2, before systemd): build
    # the generation from configDir, decrypt it into /run/agex, write its timers. No
    # systemctl here: at boot there is none yet, and on switch the service below
    # reloads and starts what changed.
    system.activationScripts.agex = {
      deps = [ "specialfs" "users" "groups" ];
      text = ''
        echo "agex: activating secrets and timers for ${cfg.host}"
        AGEX_UNIT_DIR=${unitDir} ${agex} ${args} activate --no-restart \
          || echo "agex: activation failed; the previous generation stays active" >&2
      '';
    };

    # After a switch (restartTriggers) and at boot: load the timers agex wrote and start
    # them; timers.target pulls in every timer linked into its wants.
    systemd.services.agex-timers = {
      description = "agex: load and start the backup, check and drill timers";
      wantedBy = [ "multi-user.target" ];
      after = [ "local-fs.target" ];
      restartTriggers = [ cfg.configDir cfg.package ];
      environment.AGEX_UNIT_DIR = unitDir;
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = [
          "${config.systemd.package}/bin/systemctl daemon-reload"
          "${config.systemd.package}/bin/systemctl start timers.target"
        ];
      };
    };
  };
}
