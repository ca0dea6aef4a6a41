//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// agex: secrets, activation and dual backups for a host whose config lives in git.
#[derive(Debug, Parser)]
#[command(
    name = "agex",
    version,
    about,
    propagate_version = true,
    max_term_width = 100
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
    Init {
        /// Where to create it (default: the current directory)
        #[arg(value_name = "DIR")]
        dir: Option<PathBuf>,
        /// First admin key as NAME=RECIPIENT (default: ~/.ssh/id_ed25519.pub as `me`)
        #[arg(long, value_name = "NAME=RECIPIENT")]
        key: Option<String>,
    },
    /// Edit a secret in $VISUAL/$EDITOR via a RAM-backed temp file
    Edit {
        /// The secret's .age file (or its name)
        file: PathBuf,
        /// Allow the temp file on a persistent filesystem
        #[arg(long)]
        unsafe_tmpdir: bool,
    },
    /// Print a secret's plaintext to stdout
    Decrypt {
        /// The secret's .age file (or its name)
        file: PathBuf,
        /// Print even when stdout is a terminal
        #[arg(long)]
        force: bool,
    },
    /// Encrypt stdin to a secret's recipients
    Encrypt {
        /// The secret's .age file (or its name)
        file: PathBuf,
    },
    /// Re-encrypt secrets to the recipients their rules name now
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
    Check,
    /// Create missing secrets whose rule has a generator
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
    Build,
    /// Decrypt a generation into /run/agex.d, switch /run/agex, restart what changed
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
    Rollback {
        /// The generation to switch to
        #[arg(long, value_name = "N")]
        to: Option<u64>,
        #[command(flatten)]
        switch: SwitchArgs,
    },
    /// List generations: number, date, hash, active, kept on the tmpfs
    Generations,
    /// Which secrets, templates and services differ (never plaintext)
    Diff {
        /// From this generation (default: the active one)
        #[arg(value_name = "A")]
        a: Option<String>,
        /// To this generation (default: what the configuration builds now)
        #[arg(value_name = "B")]
        b: Option<String>,
    },
    /// Back up each service's paths and databases to its repositories
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
    Snapshots {
        /// Only this service
        #[arg(long, value_name = "SERVICE")]
        service: Option<String>,
        /// Only this repository
        #[arg(long, value_name = "REPO")]
        repo: Option<String>,
    },
    /// Remove snapshots the policies' retention no longer keeps
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
    Schedule,
    /// systemd units and timers for this host's jobs
    Systemd {
        #[command(subcommand)]
        command: SystemdCommand,
    },
    /// Run the schedule in-process (where systemd is absent); SIGHUP reloads, SIGTERM stops
    Daemon,
    /// Send a notification (used by agex-notify@.service when an agex unit fails)
    Notify {
        /// The systemd unit that failed
        #[arg(long, value_name = "UNIT")]
        failed_unit: String,
    },
    /// Restore a service from a snapshot, into a directory or in place
    Restore(RestoreArgs),
    /// Restore the newest snapshots into scratch space and verify them (RPO, RTO)
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
}

#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Create a repository with the password from its secret
    Init {
        /// The repository's name in agex.toml
        repo: String,
    },
    /// Verify a repository's integrity (all repositories by default)
    Check {
        /// The repository's name in agex.toml
        repo: Option<String>,
        /// Also read this share of the data: `all`, `5%`, `1/7` (borg: any value reads all)
        #[arg(long, value_name = "SUBSET")]
        read_data_subset: Option<String>,
    },
    /// Remove stale locks left by dead processes
    Unlock {
        /// The repository's name in agex.toml
        repo: String,
    },
    /// Pin the host keys of a repository's ssh server in agex.toml (`known_hosts`)
    Trust {
        /// The repository's name in agex.toml
        repo: String,
        /// Write without asking (for scripts); check the fingerprints another way first
        #[arg(long)]
        yes: bool,
    },
    /// Give a repository a new password and store it in its password secret
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
    List,
}

#[derive(Debug, Subcommand)]
pub enum SystemdCommand {
    /// Write the units and timers into a directory
    Generate {
        /// Where to write them
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// The agex binary the units run (default: this one)
        #[arg(long, value_name = "PATH")]
        agex: Option<std::path::PathBuf>,
    },
    /// Install them into <root>/etc/systemd/system, remove stale ones, reload, enable timers
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

/// Flags of `agex restore`.
#[derive(Debug, Args)]
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
    #[arg(long, value_name = "DIR", conflicts_with = "in_place")]
    pub to: Option<std::path::PathBuf>,
    /// Put files and databases back where the policy says, under --root
    #[arg(long)]
    pub in_place: bool,
    /// Do not ask for confirmation of an in-place restore
    #[arg(long)]
    pub yes: bool,
    /// With --in-place: also remove files, links and directories below the policy's
    /// paths that the snapshot lacks (excluded paths are never touched)
    #[arg(long)]
    pub delete: bool,
    /// Restore the PostgreSQL database into this new database instead
    #[arg(long = "as", value_name = "NAME")]
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
    Kit {
        /// Write it to this file (default: stdout)
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
    },
}
