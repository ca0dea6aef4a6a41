//! `agex completions` and `agex man`: shell completions and man pages, both generated from
//! the clap definitions so they never drift from the real flags.

use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;
use crate::error::{Failure, FAILURE, OK};

/// Prints the completion script for `shell` to stdout.
pub fn cmd_completions(shell: Shell) -> Result<i32, Failure> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "agex", &mut std::io::stdout());
    Ok(OK)
}

/// Writes one man page per command and subcommand into `out`: agex.1, agex-backup.1,
/// agex-repo-init.1, …
pub fn cmd_man(out: &Path) -> Result<i32, Failure> {
    std::fs::create_dir_all(out)
        .map_err(|e| Failure::new(FAILURE, format!("{}: {e}", out.display())))?;
    let cmd = Cli::command();
    // Every page lists the global flags (--root, -C, …) its command takes.
    let globals: Vec<clap::Arg> = cmd
        .get_arguments()
        .filter(|a| a.is_global_set())
        .cloned()
        .collect();
    let mut written = 0usize;
    write_pages(&cmd, "agex", &globals, out, &mut written)?;
    println!(
        "wrote {written} man pages into {} (read one with `man -l {}/agex.1`)",
        out.display(),
        out.display()
    );
    Ok(OK)
}

/// Renders `cmd` as `name.1`, then each visible subcommand as `name-sub.1`.
fn write_pages(
    cmd: &clap::Command,
    name: &str,
    globals: &[clap::Arg],
    out: &Path,
    written: &mut usize,
) -> Result<(), Failure> {
    // The page's title and NAME section use the full dashed name, as git and cargo do.
    let mut page_cmd = cmd
        .clone()
        .name(name.to_owned())
        .bin_name(name.replace('-', " "));
    for g in globals {
        if !cmd.get_arguments().any(|a| a.get_id() == g.get_id()) {
            page_cmd = page_cmd.arg(g.clone());
        }
    }
    let mut buf = Vec::new();
    clap_mangen::Man::new(page_cmd)
        .render(&mut buf)
        .map_err(|e| Failure::new(FAILURE, format!("rendering {name}(1): {e}")))?;
    let path = out.join(format!("{name}.1"));
    std::fs::write(&path, buf)
        .map_err(|e| Failure::new(FAILURE, format!("{}: {e}", path.display())))?;
    *written += 1;
    let pages = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help");
    for sub in pages {
        write_pages(
            sub,
            &format!("{name}-{}", sub.get_name()),
            globals,
            out,
            written,
        )?;
    }
    Ok(())
}
