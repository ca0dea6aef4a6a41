//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

// Examples shown by both `-h` and the longer `--help` of the commands whose flags interact.
macro_rules! restore_examples {
    () => {
        "Examples:\n  agex restore --service vikunja --to /tmp/vikunja\n  agex restore --service paperless --in-place --repo offsite-borg\n  agex restore --service immich --snapshot 4f2a9c1e --in-place --as immich_check"
    };
}

macro_rules! drill_examples {
    () => {
        "Examples:\n  agex drill\n  agex drill --service actual --repo offsite-restic\n  agex drill rebuild"
    };
}

macro_rules! rekey_examples {
    () => {
        "Examples:\n  agex rekey --dry-run                # what a changed rule or key would re-encrypt\n  agex rekey\n  agex rekey --force secrets/b2-credentials.age"
    };
}

/// agex: secrets, activation and dual backups for a host whose config lives in git.
#[derive(Debug, Parser)]
#[command(
    name = "agex",
    version,
    about,
    propagate_version = true,
    max_term_width = 100,
    after_help = "Examples:\n  agex check                          # the configuration and every secret file\n  agex activate                       # build, decrypt into RAM, switch, restart what changed\n  agex backup && agex drill           # back up, then prove the backups restore\n  agex status\n\n`agex help COMMAND` shows a command's flags and examples."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// Configuration directory (default: nearest directory upward holding agex.toml)
    #[arg(short = 'C', long = "config", global = true, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// Root for every host path read or written
    #[arg(long, global = true, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Host to act for (default: this machine's hostname)
    #[arg(long, global = true, value_name = "NAME")]
    pub host: Option<String>,
    /// Identity file to decrypt with (repeatable; replaces the default search)
    #[arg(short = 'i', long = "identity", global = true, value_name = "PATH")]
    pub identity: Vec<PathBuf>,
    /// Machine-readable output on read commands
    #[arg(long, global = true)]
    pub json: bool,
    /// More log lines: -v debug, -vv trace (overrides AGEX_LOG)
    #[arg(short = 'v', long = "verbose", global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Fewer log lines: -q warnings and errors, -qq errors only (overrides AGEX_LOG)
    #[arg(short = 'q', long = "quiet", global = true, action = clap::ArgAction::Count)]
    pub quiet: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create agex.toml, secrets/secrets.toml and policies/ in a directory
    #[command(
        after_help = "Examples:\n  agex init ~/nixos-config --key alice=\"age1qyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqs3290gq\"\n  agex init                      # here, with ~/.ssh/id_ed25519.pub as `me`"
    )]
    Init {
        /// Where to create it (default: the current directory)
        #[arg(value_name = "DIR")]
        dir: Option<PathBuf>,
        /// First admin key as NAME=RECIPIENT (default: ~/.ssh/id_ed25519.pub as `me`)
        #[arg(long, value_name = "NAME=RECIPIENT")]
        key: Option<String>,
    },
    /// Edit a secret in $VISUAL/$EDITOR via a RAM-backed temp file
    #[command(
        after_help = "Examples:\n  agex edit secrets/vikunja-jwt-secret.age\n  EDITOR=nano agex edit smtp-password"
    )]
    Edit {
        /// The secret's .age file (or its name)
        file: PathBuf,
        /// Allow the temp file on a persistent filesystem
        #[arg(long)]
        unsafe_tmpdir: bool,
    },
    /// Print a secret's plaintext to stdout
    #[command(
        after_help = "Examples:\n  agex decrypt smtp-password | wc -c\n  agex decrypt --force paperless-admin-password"
    )]
    Decrypt {
        /// The secret's .age file (or its name)
        file: PathBuf,
        /// Print even when stdout is a terminal
        #[arg(long)]
        force: bool,
    },
    /// Encrypt stdin to a secret's recipients
    #[command(
        after_help = "Examples:\n  openssl rand -hex 32 | agex encrypt mealie-secret\n  agex encrypt cloudflare-api-token < token.txt"
    )]
    Encrypt {
        /// The secret's .age file (or its name)
        file: PathBuf,
    },
    /// Re-encrypt secrets to the recipients their rules name now
    #[command(
        after_help = rekey_examples!(),
        after_long_help = concat!("Re-encrypts each secret whose recipients differ from what its rule names now (a key\nadded to a group, a host key replaced). Unchanged secrets are left alone unless --force.\nsecrets.lock records who each file is encrypted to, so --dry-run needs no identity.\nAfter a host got a new SSH host key, run `agex host rekey HOST --keyscan HOST` instead:\nit updates agex.toml and re-encrypts in one step.\n\n", rekey_examples!())
    )]
    Rekey {
        /// Only these secrets (default: every stale one)
        files: Vec<PathBuf>,
        /// Re-encrypt even secrets that are up to date
        #[arg(long)]
        force: bool,
        /// Show what would be re-encrypted, change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate the configuration and every secret file without decrypting
    #[command(after_help = "Examples:\n  agex check\n  agex -C ~/nixos-config check")]
    Check,
    /// Create missing secrets whose rule has a generator
    #[command(
        after_help = "Examples:\n  agex generate\n  agex generate secrets/mealie-secret.age"
    )]
    Generate {
        /// Only these secrets (default: all missing ones)
        files: Vec<PathBuf>,
    },
    /// Inspect secrets
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
    /// Build this host's generation: an immutable, content-addressed store entry
    #[command(
        after_help = "Examples:\n  agex build\n  agex --host bunk --root /tmp/scratch build"
    )]
    Build,
    /// Decrypt a generation into /run/agex.d, switch /run/agex, restart what changed
    #[command(
        after_help = "Examples:\n  agex activate --dry-run\n  agex activate\n  agex activate 41                    # generation 41 again"
    )]
    Activate {
        /// A generation number, hash prefix or `last` (default: build the configuration first)
        #[arg(value_name = "GENERATION")]
        generation: Option<String>,
        #[command(flatten)]
        switch: SwitchArgs,
        /// Print the plan (files, owners, modes, links) and change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Switch back to the previous generation (or generation N)
    #[command(after_help = "Examples:\n  agex rollback\n  agex rollback --to 40")]
    Rollback {
        /// The generation to switch to
        #[arg(long, value_name = "N")]
        to: Option<u64>,
        #[command(flatten)]
        switch: SwitchArgs,
    },
    /// List generations: number, date, hash, active, kept on the tmpfs
    #[command(
        after_help = "Examples:\n  agex generations\n  agex generations --json | jq \".[0]\""
    )]
    Generations,
    /// Which secrets, templates and services differ (never plaintext)
    #[command(
        after_help = "Examples:\n  agex diff                           # active generation vs the configuration\n  agex diff 40 41"
    )]
    Diff {
        /// From this generation (default: the active one)
        #[arg(value_name = "A")]
        a: Option<String>,
        /// To this generation (default: what the configuration builds now)
        #[arg(value_name = "B")]
        b: Option<String>,
    },
    /// Back up each service's paths and databases to its repositories
    #[command(
        after_help = "Examples:\n  agex backup\n  agex backup --service paperless --repo offsite-borg\n  agex backup --dry-run"
    )]
    Backup {
        /// Only this service
        #[arg(long, value_name = "SERVICE")]
        service: Option<String>,
        /// Only this repository
        #[arg(long, value_name = "REPO")]
        repo: Option<String>,
        /// Show what would be backed up, touch nothing
        #[arg(long)]
        dry_run: bool,
        /// Command that runs systemctl for `stop_units` (default: `systemctl` when --root is /)
        #[arg(long, value_name = "CMD", env = "AGEX_SYSTEMCTL")]
        systemctl: Option<String>,
    },
    /// List the snapshots (Restic) and archives (Borg) agex wrote
    #[command(
        after_help = "Examples:\n  agex snapshots --service immich\n  agex snapshots --repo offsite-restic --json"
    )]
    Snapshots {
        /// Only this service
        #[arg(long, value_name = "SERVICE")]
        service: Option<String>,
        /// Only this repository
        #[arg(long, value_name = "REPO")]
        repo: Option<String>,
    },
    /// Remove snapshots the policies' retention no longer keeps
    #[command(
        after_help = "Examples:\n  agex forget --dry-run\n  agex forget --service jellyfin --prune"
    )]
    Forget {
        /// Only this service
        #[arg(long, value_name = "SERVICE")]
        service: Option<String>,
        /// Only this repository
        #[arg(long, value_name = "REPO")]
        repo: Option<String>,
        /// Free the space at once (restic prune, borg compact) even if the policy says not to
        #[arg(long)]
        prune: bool,
        /// Show what would be removed, remove nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Last backup per service and repository: when, result, size, duration
    #[command(
        after_help = "Examples:\n  agex status\n  agex status --max-age 26h          # exit 1 when a backup is late"
    )]
    Status {
        /// Exit 1 and notify when a service's last success in a repository is older than
        /// this (`26h`, `2d`); without a value, 1.5 × the period of its schedule
        #[arg(long, value_name = "DURATION", num_args = 0..=1, default_missing_value = "auto")]
        max_age: Option<String>,
    },
    /// Repository maintenance
    Repo {
        #[command(subcommand)]
        command: RepoCommand,
    },
    /// Every scheduled job: its schedule, next three runs, last result
    #[command(after_help = "Examples:\n  agex schedule")]
    Schedule,
    /// systemd units and timers for this host's jobs
    Systemd {
        #[command(subcommand)]
        command: SystemdCommand,
    },
    /// Run the schedule in-process (where systemd is absent); SIGHUP reloads, SIGTERM stops
    #[command(
        after_help = "Examples:\n  agex daemon                         # where systemd is absent (containers)"
    )]
    Daemon,
    /// Send a notification (used by agex-notify@.service when an agex unit fails)
    #[command(after_help = "Examples:\n  agex notify --failed-unit agex-backup.service")]
    Notify {
        /// The systemd unit that failed
        #[arg(long, value_name = "UNIT")]
        failed_unit: String,
    },
    /// Restore a service from a snapshot, into a directory or in place
    #[command(
        after_help = restore_examples!(),
        after_long_help = concat!("How the flags combine:\n  --to DIR       files and database dumps land below DIR (empty or absent); nothing running\n                 is touched; database dumps land there as files\n  --in-place     files go back to the policy's paths under --root and databases are loaded\n                 into the live server; the policy's stop_units are stopped first and started\n                 again afterwards, even when agex is interrupted; asks first unless --yes\n  --delete       with --in-place only: also remove what the snapshot lacks below the\n                 policy's paths (excluded paths are never touched)\n  --as NAME      with --in-place: load the PostgreSQL dump into a new database NAME and\n                 leave the live database as it is\n  --repo R       which repository to read (default: the newest snapshot among all of them)\n  --snapshot ID  a Restic snapshot id or prefix, a Borg archive name, or `latest`\nEvery restored file is checked against the snapshot's manifest before agex reports success.\n\n", restore_examples!())
    )]
    Restore(RestoreArgs),
    /// Restore the newest snapshots into scratch space and verify them (RPO, RTO)
    #[command(
        after_help = drill_examples!(),
        after_long_help = concat!("A drill restores the newest snapshot of each service from each repository into scratch\nspace, checks every file and database against the manifest written at backup time, and\nreports RPO (how old the snapshot is) and RTO (how long the restore took). A FAILED drill\nmeans that repository could not give that service's data back.\n  --service / --repo   narrow the drill; --all (the default) drills every pair\n  drill rebuild        proves a whole-host rebuild: a throwaway host key, rekey, activate\n                       and restore of every service into a scratch root (needs root, or\n                       --allow-secrets-on-disk)\n\n", drill_examples!())
    )]
    Drill(DrillArgs),
    /// Host key management
    Host {
        #[command(subcommand)]
        command: HostCommand,
    },
    /// Documents for recovering without agex
    Recovery {
        #[command(subcommand)]
        command: RecoveryCommand,
    },
    /// Write the HTML report: per service and repository the last 30 days, charts, drills
    #[command(
        after_help = "Examples:\n  agex report --html /tmp/report.html && xdg-open /tmp/report.html\n  agex report                         # to [report] html of agex.toml"
    )]
    Report {
        /// Where to write it (default: `[report] html` of agex.toml, under --root)
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
    },
    /// Print the shell completion script for bash, zsh, fish, elvish or powershell
    #[command(
        after_help = "Examples:\n  agex completions bash > /etc/bash_completion.d/agex\n  agex completions zsh > \"${fpath[1]}/_agex\"\n  agex completions fish > ~/.config/fish/completions/agex.fish"
    )]
    Completions {
        /// The shell to complete in
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (agex(1), agex-backup(1), ...) into a directory
    #[command(
        after_help = "Examples:\n  agex man --out /usr/local/share/man/man1 && mandb -q\n  agex man --out /tmp/man && man -l /tmp/man/agex-restore.1"
    )]
    Man {
        /// Where to write them (created if absent)
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Create a repository with the password from its secret
    #[command(after_help = "Examples:\n  agex repo init offsite-restic")]
    Init {
        /// The repository's name in agex.toml
        repo: String,
    },
    /// Verify a repository's integrity (all repositories by default)
    #[command(
        after_help = "Examples:\n  agex repo check\n  agex repo check offsite-borg --read-data-subset 5%"
    )]
    Check {
        /// The repository's name in agex.toml
        repo: Option<String>,
        /// Also read this share of the data: `all`, `5%`, `1/7` (borg: any value reads all)
        #[arg(long, value_name = "SUBSET")]
        read_data_subset: Option<String>,
    },
    /// Remove stale locks left by dead processes
    #[command(after_help = "Examples:\n  agex repo unlock offsite-restic")]
    Unlock {
        /// The repository's name in agex.toml
        repo: String,
    },
    /// Pin the host keys of a repository's ssh server in agex.toml (`known_hosts`)
    #[command(
        after_help = "Examples:\n  agex repo trust offsite-borg\n  agex repo trust offsite-borg --yes   # in scripts, after checking the fingerprints"
    )]
    Trust {
        /// The repository's name in agex.toml
        repo: String,
        /// Write without asking (for scripts); check the fingerprints another way first
        #[arg(long)]
        yes: bool,
    },
    /// Give a repository a new password and store it in its password secret
    #[command(after_help = "Examples:\n  agex repo rotate-password offsite-restic")]
    RotatePassword {
        /// The repository's name in agex.toml
        repo: String,
    },
}

/// Flags of the commands that switch generations.
#[derive(Debug, Args)]
pub struct SwitchArgs {
    /// Use /run/agex.d even if it is not a ramfs/tmpfs and none can be mounted
    #[arg(long)]
    pub allow_unmounted: bool,
    /// Do not restart or reload the units whose secrets changed
    #[arg(long)]
    pub no_restart: bool,
    /// Command that runs systemctl (default: `systemctl` when --root is /, none otherwise)
    #[arg(long, value_name = "CMD", env = "AGEX_SYSTEMCTL")]
    pub systemctl: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Every secret: recipients, services, status (ok / stale / missing / orphan)
    #[command(after_help = "Examples:\n  agex secrets list\n  agex secrets list --json")]
    List,
}

#[derive(Debug, Subcommand)]
pub enum SystemdCommand {
    /// Write the units and timers into a directory
    #[command(
        after_help = "Examples:\n  agex systemd generate --out /tmp/units\n  systemd-analyze verify /tmp/units/*.service"
    )]
    Generate {
        /// Where to write them
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// The agex binary the units run (default: this one)
        #[arg(long, value_name = "PATH")]
        agex: Option<std::path::PathBuf>,
    },
    /// Install them into <root>/etc/systemd/system, remove stale ones, reload, enable timers
    #[command(after_help = "Examples:\n  agex systemd install --dry-run\n  agex systemd install")]
    Install {
        /// The agex binary the units run (default: this one)
        #[arg(long, value_name = "PATH")]
        agex: Option<std::path::PathBuf>,
        /// Show what would change, change nothing
        #[arg(long)]
        dry_run: bool,
        /// Command that runs systemctl (default: `systemctl` when --root is /, none otherwise)
        #[arg(long, value_name = "CMD", env = "AGEX_SYSTEMCTL")]
        systemctl: Option<String>,
    },
}

/// Flags of `agex restore`. Where to restore is required, one way only (exit 2 like
/// every usage error); --delete and --as need --in-place, said as conflicting with
/// --to: a `requires` on a bool flag is always met by its default `false`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to", "in_place"])))]
pub struct RestoreArgs {
    /// The service to restore
    #[arg(long, value_name = "SERVICE")]
    pub service: String,
    /// Only this repository (default: the newest snapshot among all)
    #[arg(long, value_name = "REPO")]
    pub repo: Option<String>,
    /// A Restic snapshot id (or prefix), a Borg archive name, or `latest`
    #[arg(long, value_name = "ID")]
    pub snapshot: Option<String>,
    /// Restore files and dumps below this directory (must be empty or absent)
    #[arg(long, value_name = "DIR")]
    pub to: Option<std::path::PathBuf>,
    /// Put files and databases back where the policy says, under --root
    #[arg(long)]
    pub in_place: bool,
    /// Do not ask for confirmation of an in-place restore
    #[arg(long)]
    pub yes: bool,
    /// With --in-place: also remove files, links and directories below the policy's
    /// paths that the snapshot lacks (excluded paths are never touched)
    #[arg(long, conflicts_with = "to")]
    pub delete: bool,
    /// With --in-place: restore the PostgreSQL database into this new database instead
    #[arg(long = "as", value_name = "NAME", conflicts_with = "to")]
    pub as_database: Option<String>,
    /// Command that runs systemctl for `stop_units` (default: `systemctl` when --root is /)
    #[arg(long, value_name = "CMD", env = "AGEX_SYSTEMCTL")]
    pub systemctl: Option<String>,
}

/// Flags of `agex drill`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DrillArgs {
    #[command(subcommand)]
    pub command: Option<DrillCommand>,
    /// Only this service
    #[arg(long, value_name = "SERVICE", conflicts_with = "all")]
    pub service: Option<String>,
    /// Only this repository
    #[arg(long, value_name = "REPO", conflicts_with = "all")]
    pub repo: Option<String>,
    /// Every service in every repository (the default)
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum DrillCommand {
    /// Prove a host rebuild in a scratch root: new host key, rekey, activate, restore all
    /// (the host is the global --host, else this machine's hostname)
    #[command(after_help = "Examples:\n  agex drill rebuild\n  agex --host bunk drill rebuild")]
    Rebuild {
        /// Without root: decrypt the host's secrets under /var/lib/agex/rebuild on disk
        /// (removed afterwards) instead of refusing; as root they always stay in RAM
        #[arg(long)]
        allow_secrets_on_disk: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Replace a host's key in agex.toml and re-encrypt the secrets it receives
    #[command(
        after_help = "Examples:\n  agex host rekey bunk --key-file /etc/ssh/ssh_host_ed25519_key.pub\n  agex host rekey bunk --keyscan bunk.lan:22"
    )]
    #[command(group(clap::ArgGroup::new("source").required(true)))]
    Rekey {
        /// The host's name in agex.toml
        host: String,
        /// The new public key (e.g. "ssh-ed25519 AAAA...")
        #[arg(long, value_name = "KEY", group = "source")]
        key: Option<String>,
        /// Read the new public key from this file (e.g. ssh_host_ed25519_key.pub)
        #[arg(long, value_name = "PATH", group = "source")]
        key_file: Option<std::path::PathBuf>,
        /// Fetch the host's ed25519 key with ssh-keyscan
        #[arg(long, value_name = "HOST[:PORT]", group = "source")]
        keyscan: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RecoveryCommand {
    /// Write the recovery kit: how to restore every service with age, restic and borg alone
    #[command(after_help = "Examples:\n  agex recovery kit --out /media/usb/agex-recovery-kit.md")]
    Kit {
        /// Write it to this file (default: stdout)
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
    },
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::Cli;

    /// Every leaf command (one that takes no further subcommand) with its full path.
    fn leaves(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Command)>) {
        let subs: Vec<_> = cmd
            .get_subcommands()
            .filter(|s| s.get_name() != "help")
            .collect();
        if subs.is_empty() || cmd.is_args_conflicts_with_subcommands_set() {
            out.push((path.to_owned(), cmd.clone()));
        }
        for sub in subs {
            leaves(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    /// A shell line cut at its first pipe, redirection, `&&` or comment, split into words.
    fn words(line: &str) -> Vec<String> {
        let cut = line.find(['|', '>', '<', '#']).unwrap_or(line.len());
        let line = line[..cut].split("&&").next().unwrap_or("");
        line.split_whitespace()
            .map(|w| w.replace('"', ""))
            .skip_while(|w| w.contains('=') && !w.starts_with('-'))
            .collect()
    }

    #[test]
    fn every_command_shows_examples_and_every_example_parses() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut all = Vec::new();
        leaves(&cmd, "agex", &mut all);
        assert!(all.len() > 30, "{} leaf commands", all.len());
        for (path, leaf) in all {
            let help = leaf
                .get_after_help()
                .map(ToString::to_string)
                .unwrap_or_default();
            let examples: Vec<&str> = help
                .lines()
                .skip_while(|l| *l != "Examples:")
                .skip(1)
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            assert!(!examples.is_empty(), "`{path} --help` shows no example");
            for line in examples {
                let argv = words(line);
                if argv.first().map(String::as_str) != Some("agex") {
                    continue;
                }
                if let Err(e) = Cli::try_parse_from(&argv) {
                    panic!("`{path}` example `{line}` does not parse: {e}");
                }
            }
        }
    }
}
