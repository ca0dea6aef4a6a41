//! Secrets commands: init, edit, decrypt, encrypt, rekey, check, generate, secrets list.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use agex_core::{Project, RecipientKey, SecretRule};
use agex_secrets::check::Status;
use agex_secrets::{edit, generate, rekey, secret_file, SecretsError};

use crate::context::Context;
use crate::error::{Failure, CONFIG, FAILURE, OK};
use crate::output;

pub fn cmd_init(ctx: &Context, dir: Option<PathBuf>, key: Option<String>) -> Result<i32, Failure> {
    let dir = dir
        .or_else(|| ctx.global.config.clone())
        .unwrap_or_else(|| PathBuf::from("."));
    let admin = match key {
        Some(spec) => {
            let (name, value) = spec.split_once('=').ok_or_else(|| {
                Failure::new(CONFIG, format!("--key {spec}: expected NAME=RECIPIENT"))
            })?;
            let key = RecipientKey::from_str(value)
                .map_err(|e| Failure::new(CONFIG, format!("--key {name}: {e}")))?;
            Some((name.to_string(), key))
        }
        None => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".ssh/id_ed25519.pub"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| RecipientKey::from_str(s.trim()).ok())
            .map(|k| ("me".to_string(), k)),
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::new(FAILURE, format!("{}: {e}", dir.display())))?;
    let outcome = agex_secrets::init::init(&dir, admin)?;
    for f in &outcome.created {
        println!("created {}", dir.join(f).display());
    }
    match &outcome.admin_key {
        Some((name, key)) => println!("admin key `{name}`: {}", key.fingerprint()),
        None => println!(
            "no admin key found: add yours under [keys] in agex.toml and to the `admins` group"
        ),
    }
    let cfg = dir.display();
    println!(
        "\nnext steps:\n\
         \x20 1. add this machine under [hosts.NAME] in {cfg}/agex.toml (its key: ssh-keyscan -t ed25519 localhost)\n\
         \x20 2. describe secrets in {cfg}/secrets/secrets.toml, then `agex generate` or `agex edit NAME`\n\
         \x20 3. add two [repositories.*] (commented in agex.toml) and a policy ({cfg}/policies/example.toml.disabled),\n\
         \x20    then `agex repo init NAME` for each repository\n\
         \x20 4. agex check && agex activate && agex backup && agex drill"
    );
    Ok(OK)
}

pub fn cmd_edit(ctx: &Context, file: &Path, unsafe_tmpdir: bool) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let rule = secret_file::rule_for(&project, file)?;
    let ids = if project.path(&rule.file).exists() {
        Some(ctx.identities(&project)?)
    } else {
        None
    };
    let opts = edit::EditOptions {
        editor: None,
        unsafe_tmpdir,
    };
    let outcome = edit::edit(&project, rule, ids.as_ref(), &opts)?;
    let shown = project.display(&rule.file);
    match outcome {
        edit::EditOutcome::Unchanged => tracing::info!("{}: unchanged", shown.display()),
        edit::EditOutcome::Updated(entry) | edit::EditOutcome::Created(entry) => {
            save_lock_entries(&project, vec![(rule.name.clone(), entry)])?;
            tracing::info!(
                "{}: encrypted to {}",
                shown.display(),
                rule.recipient_names.join(", ")
            );
        }
    }
    Ok(OK)
}

pub fn cmd_decrypt(ctx: &Context, file: &Path, force: bool) -> Result<i32, Failure> {
    if std::io::stdout().is_terminal() && !force {
        return Err(SecretsError::Terminal.into());
    }
    let project = ctx.project()?;
    let rule = secret_file::rule_for(&project, file)?;
    let ids = ctx.identities(&project)?;
    let plaintext = secret_file::open(&project, rule, &ids)?;
    let mut out = std::io::stdout().lock();
    out.write_all(&plaintext)
        .and_then(|_| out.flush())
        .map_err(|e| Failure::new(FAILURE, format!("writing to stdout: {e}")))?;
    Ok(OK)
}

pub fn cmd_encrypt(ctx: &Context, file: &Path) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let rule = secret_file::rule_for(&project, file)?;
    if std::io::stdin().is_terminal() {
        eprintln!("reading the secret from stdin; end with Ctrl-D");
    }
    // Read into a zeroizing buffer that never leaves an unwiped copy when it grows.
    let plaintext = agex_secrets::plainbuf::read_all(&mut std::io::stdin().lock(), 4096)
        .map_err(|e| Failure::new(FAILURE, format!("reading stdin: {e}")))?;
    let entry = secret_file::write(&project, rule, &plaintext)?;
    save_lock_entries(&project, vec![(rule.name.clone(), entry)])?;
    tracing::info!(
        "{}: encrypted to {}",
        project.display(&rule.file).display(),
        rule.recipient_names.join(", ")
    );
    Ok(OK)
}

pub fn cmd_rekey(
    ctx: &Context,
    files: &[PathBuf],
    force: bool,
    dry_run: bool,
) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let only = selected_rules(&project, files)?
        .into_iter()
        .map(|r| r.name.clone())
        .collect::<BTreeSet<_>>();
    let opts = rekey::RekeyOptions {
        force,
        host: ctx.global.host.clone(),
        only,
    };
    let plan = rekey::plan(&project, &opts)?;
    if ctx.global.json && dry_run {
        output::json(&plan)?;
        return Ok(OK);
    }
    if dry_run {
        for item in &plan.items {
            println!("would rekey {}: {}", item.name, item.reason);
        }
    }
    for name in &plan.missing {
        tracing::warn!("{name}: file missing, skipped (agex generate / agex edit)");
    }
    if dry_run {
        println!(
            "dry run: {} to re-encrypt, {} up to date, nothing changed",
            plan.items.len(),
            plan.up_to_date
        );
        return Ok(OK);
    }
    if plan.items.is_empty() {
        println!(
            "all {} up to date",
            output::count(plan.up_to_date, "secret")
        );
        return Ok(OK);
    }
    let ids = ctx.identities(&project)?;
    let started = std::time::Instant::now();
    let outcome = rekey::execute(&project, &plan, &ids)?;
    // Printed only once done: a rekey that fails part-way must not claim files it kept.
    let report: String = plan
        .items
        .iter()
        .map(|item| format!("rekeyed {}: {}\n", item.name, item.reason))
        .collect();
    print!("{report}");
    for name in &outcome.unverified {
        tracing::info!("note: {name}: none of your identities is a recipient any more; verified the header only");
    }
    println!(
        "re-encrypted {} in {:.3}s",
        output::count(outcome.rekeyed.len(), "secret"),
        started.elapsed().as_secs_f64()
    );
    Ok(OK)
}

pub fn cmd_check(ctx: &Context) -> Result<i32, Failure> {
    let project = ctx.project()?;
    // A SIGKILLed `agex edit` left its plaintext on the RAM filesystem: check removes
    // it as the next edit would, with the same notice.
    agex_secrets::ramdir::sweep_leftovers(&agex_secrets::ramdir::runtime_base());
    let report = agex_secrets::check::check(&project);
    let host_keys = unverifiable_servers(&project);
    // The env secrets are read only with an identity that opens them; without one
    // they are reported unchecked, not failed.
    let ids = ctx.identities(&project).ok();
    let env = agex_backup::backend::check_env_secrets(&project, ids.as_ref());
    let env_errors = env.iter().filter(|f| f.error).count();
    if ctx.global.json {
        output::json(&report)?;
    } else {
        let rows: Vec<Vec<String>> = report
            .secrets
            .iter()
            .filter(|s| s.status != Status::Ok)
            .map(|s| {
                vec![
                    s.status.as_str().to_string(),
                    s.file.display().to_string(),
                    s.detail.clone().unwrap_or_default(),
                ]
            })
            .collect();
        if !rows.is_empty() {
            output::table(&["STATUS", "FILE", "DETAIL"], &rows);
        }
        for name in &report.stale_lock_entries {
            println!("secrets.lock has an entry for `{name}`, which has no rule any more (agex rekey removes it)");
        }
        for d in &host_keys {
            println!("error: {d}");
        }
        for f in &env {
            let level = if f.error { "error" } else { "warning" };
            println!("{level}: {}", f.diagnostic);
        }
        let ok = report
            .secrets
            .iter()
            .filter(|s| s.status == Status::Ok)
            .count();
        println!(
            "{}: {}, {} ok, {} need attention; {}, {}, {}, {}, {}",
            if report.has_findings() || !host_keys.is_empty() || env_errors > 0 {
                "check failed"
            } else {
                "check passed"
            },
            output::count(report.secrets.len(), "secret"),
            ok,
            report.secrets.len() - ok,
            output::count(project.config.keys.len(), "key"),
            output::count(project.config.groups.len(), "group"),
            output::count(project.config.hosts.len(), "host"),
            output::count(project.config.repositories.len(), "repository"),
            output::count(project.policies.len(), "backup policy"),
        );
    }
    Ok(
        if report.has_findings() || !host_keys.is_empty() || env_errors > 0 {
            FAILURE
        } else {
            OK
        },
    )
}

/// Repositories reached over ssh whose server's host key agex could not check: none
/// pinned in agex.toml and none in the user's `~/.ssh/known_hosts`.
fn unverifiable_servers(project: &agex_core::Project) -> Vec<agex_core::Diagnostic> {
    project
        .config
        .repositories
        .values()
        .filter(|r| r.known_hosts.is_empty())
        .filter_map(|r| r.location.ssh().map(|e| (r, e)))
        .filter(|(_, e)| !agex_backup::ssh::user_knows(e))
        .map(|(r, e)| {
            project
                .config
                .source
                .error(
                    Some(r.url_span.clone()),
                    format!(
                        "repository `{}`: nothing to check the host key of {} against (no known_hosts in agex.toml, none in ~/.ssh/known_hosts); ssh would refuse it",
                        r.name,
                        e.known_hosts_name()
                    ),
                )
                .with_help(format!("`agex repo trust {}` shows its fingerprints and pins them", r.name))
        })
        .collect()
}

pub fn cmd_generate(ctx: &Context, files: &[PathBuf]) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let only = selected_rules(&project, files)?;
    let generate::GenerateOutcome { created, entries } =
        generate::generate_missing(&project, &only)?;
    save_lock_entries(&project, entries)?;
    if ctx.global.json {
        output::json(&created)?;
    } else {
        for g in &created {
            match &g.public_file {
                Some(p) => println!(
                    "generated {} (public key in {})",
                    g.file.display(),
                    p.display()
                ),
                None => println!("generated {}", g.file.display()),
            }
        }
        if created.is_empty() {
            println!("nothing to generate: every secret with a generator has a file");
        }
    }
    Ok(OK)
}

pub fn cmd_secrets_list(ctx: &Context) -> Result<i32, Failure> {
    let project = ctx.project()?;
    let report = agex_secrets::check::check(&project);
    if ctx.global.json {
        output::json(&report.secrets)?;
        return Ok(OK);
    }
    let rows: Vec<Vec<String>> = report
        .secrets
        .iter()
        .map(|s| {
            vec![
                s.name.clone().unwrap_or_else(|| "-".into()),
                s.recipients.join(","),
                s.services.join(","),
                s.status.as_str().to_string(),
            ]
        })
        .collect();
    output::table(&["SECRET", "RECIPIENTS", "SERVICES", "STATUS"], &rows);
    Ok(OK)
}

/// Rules named on the command line (files or secret names).
fn selected_rules<'a>(
    project: &'a Project,
    files: &[PathBuf],
) -> Result<Vec<&'a SecretRule>, Failure> {
    files
        .iter()
        .map(|f| secret_file::rule_for(project, f).map_err(Failure::from))
        .collect()
}

/// Records new lock entries, re-reading the lock so concurrent entries are kept.
pub fn save_lock_entries(
    project: &Project,
    entries: Vec<(String, agex_core::LockEntry)>,
) -> Result<(), Failure> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut lock = project.lock.clone();
    for (name, entry) in entries {
        lock.secrets.insert(name, entry);
    }
    let path = project.path(agex_core::project::LOCK_FILE);
    lock.save(&path)
        .map_err(|e| Failure::new(FAILURE, format!("{}: {e}", path.display())))
}
