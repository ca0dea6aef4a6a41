//! Repository URLs as users already write them: restic's own forms for Restic
//! repositories, borg's for Borg repositories. Parsed once, at config time, so a URL
//! that does not parse is an error naming `agex.toml:LINE` instead of a failed night.

use std::fmt;

/// The URL forms a Restic repository accepts (shown in errors).
pub const RESTIC_FORMS: &str = "/path, local:/path, sftp:user@host:/path, sftp:host:path, \
     sftp://user@host:port//abs/path, rest:http(s)://host:port/path, \
     s3:https://host[:port]/bucket[/prefix], s3:host/bucket[/prefix], rclone:remote:path, \
     opendal:SERVICE (with `options`)";

/// The URL forms a Borg repository accepts (shown in errors).
pub const BORG_FORMS: &str = "/path, file:///path, ssh://user@host[:port]/path, user@host:path";

/// An ssh server a repository is reached through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshEndpoint {
    /// Login user, when the URL names one.
    pub user: Option<String>,
    /// Host name or address.
    pub host: String,
    /// Port, when not 22.
    pub port: Option<u16>,
}

impl SshEndpoint {
    /// The name this server has in a known_hosts file: `host`, or `[host]:port`.
    pub fn known_hosts_name(&self) -> String {
        match self.port {
            Some(p) if p != 22 => format!("[{}]:{p}", self.host),
            _ => self.host.clone(),
        }
    }

    /// `user@host` (or `host`), what ssh takes as its destination.
    pub fn destination(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        }
    }
}

/// Where a repository lives and which backend reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoUrl {
    /// A path on this machine, as given (not under `--root`).
    Local(String),
    /// sftp over ssh; `path` is relative to the login directory unless it starts with `/`.
    Sftp {
        /// The server.
        ssh: SshEndpoint,
        /// The repository's path on the server.
        path: String,
    },
    /// A restic REST server (`rest:` without its prefix).
    Rest(String),
    /// S3 or an S3-compatible store.
    S3 {
        /// `https://host[:port]` or `http://host[:port]`.
        endpoint: String,
        /// The bucket.
        bucket: String,
        /// The prefix inside the bucket (no leading or trailing `/`; may be empty).
        prefix: String,
    },
    /// Anything `rclone serve restic` reaches: `remote:path`.
    Rclone(String),
    /// Another opendal service, configured by the repository's `options` (untested).
    OpenDal(String),
    /// Borg over ssh: the URL is passed to borg verbatim.
    BorgSsh(SshEndpoint),
}

impl RepoUrl {
    /// The ssh server this repository is reached through, if any.
    pub fn ssh(&self) -> Option<&SshEndpoint> {
        match self {
            RepoUrl::Sftp { ssh, .. } | RepoUrl::BorgSsh(ssh) => Some(ssh),
            _ => None,
        }
    }

    /// Whether the repository is reached over the network (for network-online units).
    pub fn is_remote(&self) -> bool {
        !matches!(self, RepoUrl::Local(_))
    }

    /// The scheme's name as shown to users.
    pub fn scheme(&self) -> &'static str {
        match self {
            RepoUrl::Local(_) => "local",
            RepoUrl::Sftp { .. } => "sftp",
            RepoUrl::Rest(_) => "rest",
            RepoUrl::S3 { .. } => "s3",
            RepoUrl::Rclone(_) => "rclone",
            RepoUrl::OpenDal(_) => "opendal",
            RepoUrl::BorgSsh(_) => "ssh",
        }
    }
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.scheme())
    }
}

/// Why a repository URL, a pinned host key or a rate limit was refused; the message
/// follows `repository `NAME`: ` in the configuration's diagnostic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Neither a path nor `scheme:`.
    #[error("`{0}` is not an absolute path and names no backend")]
    NoBackend(String),
    /// `local:` with a relative path.
    #[error("a local: repository needs an absolute path")]
    LocalRelative,
    /// A `rest:` URL without http(s)://host.
    #[error("`{0}`: rest: needs http://host:port/path or https://…")]
    Rest(String),
    /// An `rclone:` URL without `remote:`.
    #[error("`{0}`: rclone: needs remote:path")]
    Rclone(String),
    /// An opendal service this build does not have.
    #[error("`{url}`: this agex is built with the opendal services {} only (not `{service}`)", OPENDAL_SERVICES.join(", "))]
    OpenDalService {
        /// The URL.
        url: String,
        /// The service asked for.
        service: String,
    },
    /// `opendal:` without a service.
    #[error("`{0}`: opendal: needs a service name (opendal:s3, opendal:b2, …)")]
    OpenDalNone(String),
    /// A scheme restic does not have.
    #[error("unknown backend `{0}:`")]
    UnknownBackend(String),
    /// `file://` with a relative path.
    #[error("`{0}`: file:// needs an absolute path")]
    FileRelative(String),
    /// `ssh://host` with no path.
    #[error("`{0}`: ssh:// needs a path after the host")]
    SshNoPath(String),
    /// `user@:path`.
    #[error("`{0}`: no host")]
    NoHost(String),
    /// Not a Borg location in any form.
    #[error("`{0}` is not an absolute path or an ssh location")]
    NotBorg(String),
    /// A malformed `sftp:` URL (the whole URL).
    #[error("`{0}`: sftp needs user@host:/path or sftp://user@host:port//path")]
    Sftp(String),
    /// A malformed `s3:` URL (the whole URL).
    #[error("`{0}`: s3 needs s3:https://host[:port]/bucket[/prefix]")]
    S3(String),
    /// An S3 bucket name S3 refuses.
    #[error(
        "`{url}`: bucket `{bucket}` may hold only lowercase letters, digits, `-`, `.` and `_`"
    )]
    S3Bucket {
        /// The URL.
        url: String,
        /// The bucket.
        bucket: String,
    },
    /// `[host` without `]`.
    #[error("unclosed `[`")]
    Unclosed,
    /// An authority without a host.
    #[error("`{0}` names no host")]
    HostMissing(String),
    /// A port that is not 1-65535.
    #[error("`{0}` is not a port")]
    Port(String),
    /// A known_hosts line with fewer than three fields.
    #[error("`{0}` is not a known_hosts line (`[host]:port ssh-ed25519 AAAA…`)")]
    KnownHostLine(String),
    /// A known_hosts marker line.
    #[error("markers (@cert-authority, @revoked) are not supported in known_hosts")]
    KnownHostMarker,
    /// A key type that is not an ssh host key's.
    #[error("`{0}` is not an ssh host key type")]
    KeyType(String),
    /// A key that is not base64.
    #[error("the key of `{0}` is not base64")]
    KeyBase64(String),
    /// A rate that is no number.
    #[error("`{0}` is not a rate like \"4 MiB/s\"")]
    Rate(String),
    /// A rate's unit agex does not know.
    #[error("`{0}` is not a unit: use B, KB, MB, GB, KiB, MiB or GiB per second")]
    RateUnit(String),
    /// A rate below 1 KiB/s.
    #[error("`{0}`: a limit must be at least 1 KiB/s")]
    RateTooLow(String),
}

/// Parses a Restic repository URL in one of restic's forms.
pub fn parse_restic(url: &str) -> Result<RepoUrl, UrlError> {
    let url = url.trim();
    if url.starts_with('/') {
        return Ok(RepoUrl::Local(url.to_string()));
    }
    let Some((scheme, rest)) = url.split_once(':') else {
        return Err(UrlError::NoBackend(url.to_string()));
    };
    match scheme {
        "local" if rest.starts_with('/') => Ok(RepoUrl::Local(rest.to_string())),
        "local" => Err(UrlError::LocalRelative),
        "sftp" => parse_sftp(rest),
        "rest" => {
            let ok = (rest.starts_with("http://") || rest.starts_with("https://"))
                && host_port(after_scheme(rest)).is_ok();
            if ok {
                Ok(RepoUrl::Rest(rest.to_string()))
            } else {
                Err(UrlError::Rest(url.to_string()))
            }
        }
        "s3" => parse_s3(rest),
        "rclone" => match rest.split_once(':') {
            Some((remote, _)) if !remote.is_empty() && !remote.contains('/') => {
                Ok(RepoUrl::Rclone(rest.to_string()))
            }
            _ => Err(UrlError::Rclone(url.to_string())),
        },
        "opendal" if OPENDAL_SERVICES.contains(&rest) => Ok(RepoUrl::OpenDal(rest.to_string())),
        "opendal" if !rest.is_empty() => Err(UrlError::OpenDalService {
            url: url.to_string(),
            service: rest.to_string(),
        }),
        "opendal" => Err(UrlError::OpenDalNone(url.to_string())),
        other => Err(UrlError::UnknownBackend(other.to_string())),
    }
}

/// The opendal services compiled in (the features of vendor/rustic_backend's opendal
/// dependency; keep the two in step).
pub const OPENDAL_SERVICES: &[&str] = &["s3", "b2", "azblob"];

/// Parses a Borg repository URL: a path, `file://`, `ssh://` or scp-style `user@host:path`.
pub fn parse_borg(url: &str) -> Result<RepoUrl, UrlError> {
    let url = url.trim();
    if url.starts_with('/') {
        return Ok(RepoUrl::Local(url.to_string()));
    }
    if let Some(p) = url.strip_prefix("file://") {
        return if p.starts_with('/') {
            Ok(RepoUrl::Local(p.to_string()))
        } else {
            Err(UrlError::FileRelative(url.to_string()))
        };
    }
    if let Some(rest) = url.strip_prefix("ssh://") {
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| UrlError::SshNoPath(url.to_string()))?;
        if path.is_empty() {
            return Err(UrlError::SshNoPath(url.to_string()));
        }
        return Ok(RepoUrl::BorgSsh(endpoint(authority)?));
    }
    if let Some((authority, path)) = url.split_once(':') {
        if !authority.contains('/') && !path.is_empty() && !authority.is_empty() {
            let (user, host) = split_user(authority);
            if host.is_empty() {
                return Err(UrlError::NoHost(url.to_string()));
            }
            return Ok(RepoUrl::BorgSsh(SshEndpoint {
                user,
                host: host.to_string(),
                port: None,
            }));
        }
    }
    Err(UrlError::NotBorg(url.to_string()))
}

fn parse_sftp(rest: &str) -> Result<RepoUrl, UrlError> {
    let bad = || UrlError::Sftp(format!("sftp:{rest}"));
    if let Some(r) = rest.strip_prefix("//") {
        // sftp://user@host:port/path — restic keeps what follows the first `/` as the
        // path, so `//abs` is absolute and `/rel` relative to the login directory.
        let (authority, path) = r.split_once('/').ok_or_else(bad)?;
        if path.is_empty() {
            return Err(bad());
        }
        return Ok(RepoUrl::Sftp {
            ssh: endpoint(authority)?,
            path: path.to_string(),
        });
    }
    let (authority, path) = rest.split_once(':').ok_or_else(bad)?;
    let (user, host) = split_user(authority);
    if host.is_empty() || path.is_empty() || host.contains('/') {
        return Err(bad());
    }
    Ok(RepoUrl::Sftp {
        ssh: SshEndpoint {
            user,
            host: host.to_string(),
            port: None,
        },
        path: path.to_string(),
    })
}

fn parse_s3(rest: &str) -> Result<RepoUrl, UrlError> {
    let (scheme, hostpath) = if let Some(r) = rest.strip_prefix("https://") {
        ("https", r)
    } else if let Some(r) = rest.strip_prefix("http://") {
        ("http", r)
    } else {
        ("https", rest)
    };
    let mut parts = hostpath.splitn(3, '/');
    let host = parts.next().unwrap_or_default();
    let bucket = parts.next().unwrap_or_default();
    let prefix = parts.next().unwrap_or_default().trim_matches('/');
    let bad = || UrlError::S3(format!("s3:{rest}"));
    if host.is_empty() || bucket.is_empty() {
        return Err(bad());
    }
    host_port(host).map_err(|_| bad())?;
    let bucket_ok = bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_'));
    if !bucket_ok {
        return Err(UrlError::S3Bucket {
            url: format!("s3:{rest}"),
            bucket: bucket.to_string(),
        });
    }
    Ok(RepoUrl::S3 {
        endpoint: format!("{scheme}://{host}"),
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
    })
}

fn after_scheme(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    authority.rsplit('@').next().unwrap_or(authority)
}

/// `host` or `host:port` (IPv6 in brackets), with a valid port.
fn host_port(authority: &str) -> Result<(String, Option<u16>), UrlError> {
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let (h, after) = r.split_once(']').ok_or(UrlError::Unclosed)?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(UrlError::HostMissing(authority.to_string()));
    }
    let port = match port {
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| UrlError::Port(p.to_string()))?,
        ),
        None => None,
    };
    Ok((host.to_string(), port))
}

fn split_user(authority: &str) -> (Option<String>, &str) {
    match authority.rsplit_once('@') {
        Some((u, h)) if !u.is_empty() => (Some(u.to_string()), h),
        _ => (None, authority),
    }
}

fn endpoint(authority: &str) -> Result<SshEndpoint, UrlError> {
    let (user, hostport) = split_user(authority);
    let (host, port) = host_port(hostport)?;
    Ok(SshEndpoint { user, host, port })
}

/// Checks one pinned known_hosts line (`[host]:port ssh-ed25519 AAAA…`); returns the
/// host patterns it names.
pub fn parse_known_host(line: &str) -> Result<Vec<String>, UrlError> {
    let mut fields = line.split_whitespace();
    let (Some(hosts), Some(kind), Some(key)) = (fields.next(), fields.next(), fields.next()) else {
        return Err(UrlError::KnownHostLine(line.to_string()));
    };
    if hosts.starts_with('@') {
        return Err(UrlError::KnownHostMarker);
    }
    let known = kind.starts_with("ssh-")
        || kind.starts_with("ecdsa-sha2-")
        || kind.starts_with("sk-ssh-")
        || kind.starts_with("sk-ecdsa-");
    if !known {
        return Err(UrlError::KeyType(kind.to_string()));
    }
    if key.len() < 16
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
    {
        return Err(UrlError::KeyBase64(hosts.to_string()));
    }
    Ok(hosts.split(',').map(str::to_string).collect())
}

/// A bandwidth limit such as `"4 MiB/s"`, `"500 KiB/s"`, `"2MB/s"`; bytes per second.
pub fn parse_rate(text: &str) -> Result<u64, UrlError> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| UrlError::Rate(text.to_string()))?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "k" | "K" | "kB" | "KB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "KiB" | "Ki" => 1024.0,
        "MiB" | "Mi" => 1024.0 * 1024.0,
        "GiB" | "Gi" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(UrlError::RateUnit(other.to_string())),
    };
    let rate = value * mult;
    if rate.is_nan() || rate.is_infinite() || rate < 1024.0 {
        return Err(UrlError::RateTooLow(text.to_string()));
    }
    Ok(rate as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restic_forms() {
        assert_eq!(parse_restic("/srv/r"), Ok(RepoUrl::Local("/srv/r".into())));
        assert_eq!(
            parse_restic("local:/srv/r"),
            Ok(RepoUrl::Local("/srv/r".into()))
        );
        let RepoUrl::Sftp { ssh, path } = parse_restic("sftp:u123@box.example:/restic").unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (
                ssh.user.as_deref(),
                ssh.host.as_str(),
                ssh.port,
                path.as_str()
            ),
            (Some("u123"), "box.example", None, "/restic")
        );
        let RepoUrl::Sftp { ssh, path } = parse_restic("sftp://u@127.0.0.1:2222//abs/p").unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (ssh.port, path.as_str(), ssh.known_hosts_name()),
            (Some(2222), "/abs/p", "[127.0.0.1]:2222".to_string())
        );
        let RepoUrl::Sftp { path, .. } = parse_restic("sftp:host:rel/repo").unwrap() else {
            panic!()
        };
        assert_eq!(path, "rel/repo");
        assert_eq!(
            parse_restic("s3:s3.eu-central-003.backblazeb2.com/bunk-restic/sub/"),
            Ok(RepoUrl::S3 {
                endpoint: "https://s3.eu-central-003.backblazeb2.com".into(),
                bucket: "bunk-restic".into(),
                prefix: "sub".into()
            })
        );
        assert_eq!(
            parse_restic("s3:http://127.0.0.1:8333/b"),
            Ok(RepoUrl::S3 {
                endpoint: "http://127.0.0.1:8333".into(),
                bucket: "b".into(),
                prefix: String::new()
            })
        );
        assert!(parse_restic("rest:http://127.0.0.1:8000/r").is_ok());
        assert!(parse_restic("rclone:remote:path/x").is_ok());
        for bad in [
            "relative/path",
            "ftp:x",
            "s3:https://host",
            "rest:127.0.0.1",
            "sftp:nohostpath",
            "rclone:nocolon",
            "local:rel",
            "s3:http://h:99999/b",
            "s3:h/Bad_Bucket",
        ] {
            assert!(parse_restic(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn borg_forms() {
        let RepoUrl::BorgSsh(e) = parse_borg("ssh://u456@box.de:23/./borg").unwrap() else {
            panic!()
        };
        assert_eq!(e.known_hosts_name(), "[box.de]:23");
        let RepoUrl::BorgSsh(e) = parse_borg("u@host:repo").unwrap() else {
            panic!()
        };
        assert_eq!(e.destination(), "u@host");
        assert_eq!(parse_borg("/b"), Ok(RepoUrl::Local("/b".into())));
        for bad in ["rel", "ssh://host", "ssh://h:x/p", "file://rel"] {
            assert!(parse_borg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates_and_known_hosts() {
        assert_eq!(parse_rate("4 MiB/s"), Ok(4 << 20));
        assert_eq!(parse_rate("500KB/s"), Ok(500_000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("4 parsecs/s").is_err());
        assert!(parse_rate("0").is_err());
        assert_eq!(
            parse_known_host("[h]:23,h2 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE26ZTvA3X").unwrap(),
            vec!["[h]:23".to_string(), "h2".into()]
        );
        assert!(parse_known_host("h ssh-ed25519").is_err());
        assert!(parse_known_host("h foo AAAAC3NzaC1lZDI1NTE5AAAA").is_err());
    }
}
