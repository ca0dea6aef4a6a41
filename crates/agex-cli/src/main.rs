//! The `agex` binary: parses arguments, calls the library crates, prints results.

mod cli;
mod commands;
mod context;
mod error;
mod interrupt;
mod log;
mod output;
mod plaintext;
mod progress;

use clap::Parser;

use cli::{
    Cli, Command, DrillCommand, HostCommand, RecoveryCommand, RepoCommand, SecretsCommand,
    SystemdCommand,
};
use commands::activate;
use commands::backup;
use commands::docs;
use commands::recovery;
use commands::report;
use commands::schedule;
use commands::secrets;
use context::Context;
use error::Failure;

fn main() {
    // Die quietly when stdout is a closed pipe (`agex secrets list | head`), as Unix tools do.
    // libc because nothing safe sets a disposition: std ignores SIGPIPE before main and
    // only an unstable flag (`-Zon-broken-pipe`) changes that; rustix's sigaction is in
    // its unsafe `runtime` module, meant for programs without std.
    // SAFETY: setting a signal disposition to SIG_DFL before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    return_large_buffers_to_the_system();
    let cli = Cli::parse();
    if let Err(f) = log::init(cli.global.verbose, cli.global.quiet) {
        log::always(tracing::Level::ERROR, &f.message);
        std::process::exit(f.code);
    }
    agex_secrets::ramdir::set_notice(|line| tracing::info!("note: {line}"));
    if holds_plaintext(&cli.command) {
        plaintext::protect(own_signal_handling(&cli.command));
    }
    let code = match run(cli) {
        Ok(code) => code,
        Err(f) => {
            log::always(tracing::Level::ERROR, &f.message);
            f.code
        }
    };
    std::process::exit(code);
}

/// Commands that decrypt secrets or handle repository passwords in this process.
fn holds_plaintext(command: &Command) -> bool {
    !matches!(
        command,
        Command::Init { .. }
            | Command::Check
            | Command::Secrets { .. }
            | Command::Build
            | Command::Generations
            | Command::Diff { .. }
            | Command::Status { .. }
            | Command::Schedule
            | Command::Systemd { .. }
            | Command::Daemon
            | Command::Notify { .. }
            | Command::Completions { .. }
            | Command::Man { .. }
            | Command::Report { .. }
    )
}

/// `edit` handles SIGTERM itself: it stops the editor first, then wipes the file.
fn own_signal_handling(command: &Command) -> bool {
    matches!(command, Command::Edit { .. })
}

fn run(cli: Cli) -> Result<i32, Failure> {
    // Jobs whose results the HTML report shows bring it up to date, whatever their outcome.
    let refreshes_report = matches!(
        cli.command,
        Command::Backup { dry_run: false, .. }
            | Command::Drill(_)
            | Command::Repo {
                command: RepoCommand::Check { .. }
            }
    );
    let ctx = Context { global: cli.global };
    let result = dispatch(&ctx, cli.command);
    if refreshes_report {
        report::refresh(&ctx);
    }
    result
}

fn dispatch(ctx: &Context, command: Command) -> Result<i32, Failure> {
    match command {
        Command::Init { dir, key } => secrets::cmd_init(ctx, dir, key),
        Command::Edit {
            file,
            unsafe_tmpdir,
        } => secrets::cmd_edit(ctx, &file, unsafe_tmpdir),
        Command::Decrypt { file, force } => secrets::cmd_decrypt(ctx, &file, force),
        Command::Encrypt { file } => secrets::cmd_encrypt(ctx, &file),
        Command::Rekey {
            files,
            force,
            dry_run,
        } => secrets::cmd_rekey(ctx, &files, force, dry_run),
        Command::Check => secrets::cmd_check(ctx),
        Command::Generate { files } => secrets::cmd_generate(ctx, &files),
        Command::Secrets {
            command: SecretsCommand::List,
        } => secrets::cmd_secrets_list(ctx),
        Command::Build => activate::cmd_build(ctx),
        Command::Activate {
            generation,
            switch,
            dry_run,
        } => activate::cmd_activate(ctx, generation.as_deref(), &switch, dry_run),
        Command::Rollback { to, switch } => activate::cmd_rollback(ctx, to, &switch),
        Command::Generations => activate::cmd_generations(ctx),
        Command::Diff { a, b } => activate::cmd_diff(ctx, a.as_deref(), b.as_deref()),
        Command::Backup {
            service,
            repo,
            dry_run,
            systemctl,
        } => backup::cmd_backup(
            ctx,
            backup::BackupArgs {
                service: service.as_deref(),
                repo: repo.as_deref(),
                dry_run,
                systemctl: systemctl.as_deref(),
            },
        ),
        Command::Snapshots { service, repo } => {
            backup::cmd_snapshots(ctx, service.as_deref(), repo.as_deref())
        }
        Command::Forget {
            service,
            repo,
            prune,
            dry_run,
        } => backup::cmd_forget(ctx, service.as_deref(), repo.as_deref(), prune, dry_run),
        Command::Status { max_age: None } => backup::cmd_status(ctx),
        Command::Status { max_age: Some(m) } => schedule::cmd_overdue(ctx, &m),
        Command::Repo { command } => match command {
            RepoCommand::Init { repo } => backup::cmd_repo_init(ctx, &repo),
            RepoCommand::Check {
                repo,
                read_data_subset,
            } => backup::cmd_repo_check(ctx, repo.as_deref(), read_data_subset.as_deref()),
            RepoCommand::Unlock { repo } => backup::cmd_repo_unlock(ctx, &repo),
            RepoCommand::Trust { repo, yes } => backup::cmd_repo_trust(ctx, &repo, yes),
            RepoCommand::RotatePassword { repo } => recovery::cmd_rotate_password(ctx, &repo),
        },
        Command::Schedule => schedule::cmd_schedule(ctx),
        Command::Systemd { command } => match command {
            SystemdCommand::Generate { out, agex } => {
                schedule::cmd_systemd_generate(ctx, &out, agex)
            }
            SystemdCommand::Install {
                agex,
                dry_run,
                systemctl,
            } => schedule::cmd_systemd_install(ctx, agex, dry_run, systemctl.as_deref()),
        },
        Command::Daemon => schedule::cmd_daemon(ctx),
        Command::Notify { failed_unit } => schedule::cmd_notify_failed_unit(ctx, &failed_unit),
        Command::Restore(args) => recovery::cmd_restore(ctx, &args),
        Command::Drill(args) => match &args.command {
            Some(DrillCommand::Rebuild {
                allow_secrets_on_disk,
            }) => recovery::cmd_drill_rebuild(ctx, *allow_secrets_on_disk),
            None => recovery::cmd_drill(ctx, &args),
        },
        Command::Host {
            command:
                HostCommand::Rekey {
                    host,
                    key,
                    key_file,
                    keyscan,
                },
        } => recovery::cmd_host_rekey(
            ctx,
            &host,
            key.as_deref(),
            key_file.as_deref(),
            keyscan.as_deref(),
        ),
        Command::Recovery {
            command: RecoveryCommand::Kit { out },
        } => recovery::cmd_recovery_kit(ctx, out.as_deref()),
        Command::Completions { shell } => docs::cmd_completions(shell),
        Command::Man { out } => docs::cmd_man(&out),
        Command::Report { html } => report::cmd_report(ctx, html.as_deref()),
    }
}

/// Large buffers (pack ranges, decompressed blobs, chunks: 256 KiB to tens of MiB) get
/// their own mappings, given back to the system when freed. glibc's default raises its
/// mmap threshold each time such a buffer is freed (up to 32 MiB), after which they come
/// from the per-thread arenas of the restorer's and archiver's many threads, and each
/// arena keeps its high-water mark: a restore's resident memory then grew with the number
/// of threads that had ever held a big buffer, not with what is held at once.
fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // libc because mallopt is glibc's own call: no crate wraps it safely.
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}
