//! The agex configuration model: `agex.toml`, `secrets/secrets.toml`, `secrets.lock` and
//! backup policies, parsed and validated with errors that name file:line:col.

pub mod atomic;
pub mod beneath;
pub mod config;
pub mod diagnostic;
pub mod error;
pub mod human;
pub mod lock;
pub mod names;
pub mod policy;
pub mod project;
pub mod recipient;
pub mod repo_url;
pub mod rules;
pub mod schedule;
pub mod systemctl;
pub mod template;
pub mod users;

pub use config::{BackupSettings, Config, Host, Repository, RepositoryKind};
pub use config::{Notify, NotifyTargets, ScheduleSettings};
pub use diagnostic::{Diagnostic, Diagnostics, SourceFile};
pub use error::ConfigError;
pub use lock::{Lock, LockEntry};
pub use policy::{Database, Policy, Retention, SslMode};
pub use project::Project;
pub use recipient::{RecipientKey, RecipientKind};
pub use repo_url::{RepoUrl, SshEndpoint};
pub use rules::{Generator, Rules, SecretRule, TemplateRule};
pub use schedule::{Schedule, ScheduleError};
