//! Where the S3 keys come from (spec 8.1, 8.2, 8.5), in this order: `--accessId`/`--accessKey`,
//! `--accessKeyEnv`, the accessFile, the standard `AWS_*` variables, then EC2 instance metadata.
//! Secrets never reach logs, errors or `Debug` output.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::RwLock;
use serde::Deserialize;

use crate::error::{Error, Result};

/// The EC2 instance metadata service (IMDS).
pub const DEFAULT_IMDS_BASE_URL: &str = "http://169.254.169.254/";
/// IAM credentials are re-fetched this often (spec 8.5).
pub const IAM_REFRESH: Duration = Duration::from_secs(300);

/// One set of keys.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    pub access_id: String,
    pub secret: String,
    /// Session token of temporary (IAM) credentials, sent as `x-amz-security-token`.
    pub token: Option<String>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("access_id", &self.access_id)
            .field("secret", &"<redacted>")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The raw credential flags, as given by the user.
#[derive(Clone)]
pub struct CredentialFlags {
    /// `Some("")` forces anonymous access.
    pub access_id: Option<String>,
    pub access_key: Option<String>,
    pub access_key_env: Option<String>,
    pub access_file: Option<PathBuf>,
    pub ec2_iam_role: Option<String>,
    pub imds_v2: bool,
    /// Base URL of the instance metadata service (a loopback fake in tests).
    pub imds_base_url: String,
}

impl Default for CredentialFlags {
    fn default() -> Self {
        CredentialFlags {
            access_id: None,
            access_key: None,
            access_key_env: None,
            access_file: None,
            ec2_iam_role: None,
            imds_v2: false,
            imds_base_url: DEFAULT_IMDS_BASE_URL.into(),
        }
    }
}

impl fmt::Debug for CredentialFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialFlags")
            .field("access_id", &self.access_id)
            .field(
                "access_key",
                &self.access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("access_key_env", &self.access_key_env)
            .field("access_file", &self.access_file)
            .field("ec2_iam_role", &self.ec2_iam_role)
            .field("imds_v2", &self.imds_v2)
            .field("imds_base_url", &self.imds_base_url)
            .finish()
    }
}

/// Current keys, shared with the IAM refresh thread. `None` = anonymous.
#[derive(Clone, Debug)]
pub struct CredentialStore(Option<Arc<RwLock<Keys>>>);

impl CredentialStore {
    pub fn anonymous() -> Self {
        CredentialStore(None)
    }

    pub fn fixed(keys: Keys) -> Self {
        CredentialStore(Some(Arc::new(RwLock::new(keys))))
    }

    pub fn current(&self) -> Option<Keys> {
        self.0.as_ref().map(|k| k.read().clone())
    }

    pub fn is_anonymous(&self) -> bool {
        self.0.is_none()
    }
}

/// Resolves the flags into keys; with `--accessEC2IAM` also starts the refresh thread.
pub fn resolve(flags: &CredentialFlags) -> Result<CredentialStore> {
    if flags.access_id.as_deref() == Some("") {
        return Ok(CredentialStore::anonymous());
    }
    if let Some(role) = &flags.ec2_iam_role {
        if flags.access_id.is_some() {
            return Err(Error::Invalid(
                "\"--accessEC2IAM\" is incompatible with \"--accessId\"".into(),
            ));
        }
        let imds = Imds::new(&flags.imds_base_url, role, flags.imds_v2);
        let keys = imds.fetch().map_err(|e| {
            Error::Other(format!(
                "can't fetch EC2 IAM credentials for role {role}: {e}"
            ))
        })?;
        let shared = Arc::new(RwLock::new(keys));
        imds.spawn_refresh(Arc::downgrade(&shared));
        return Ok(CredentialStore(Some(shared)));
    }
    if let (Some(id), Some(secret)) = (&flags.access_id, &flags.access_key) {
        return Ok(fixed(id, secret));
    }
    if let Some(var) = &flags.access_key_env {
        let secret = std::env::var(var).map_err(|_| {
            Error::Invalid(format!(
                "environment variable \"{var}\" (--accessKeyEnv) is not set"
            ))
        })?;
        let id = match &flags.access_id {
            Some(id) => id.clone(),
            None => std::env::var("AWS_ACCESS_KEY_ID")
                .map_err(|_| Error::Invalid("\"--accessKeyEnv\" needs \"--accessId\"".into()))?,
        };
        return Ok(fixed(&id, &secret));
    }
    if let Some(file) = access_file(flags) {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| Error::io(format!("can't read {}", file.display()), e))?;
        match parse_access_file(&text, flags.access_id.as_deref()) {
            Some((id, secret)) => return Ok(fixed(&id, &secret)),
            None if flags.access_id.is_some() => {
                return Err(Error::Invalid(format!(
                    "no secret key for access ID \"{}\" found in {}",
                    flags.access_id.as_deref().unwrap_or_default(),
                    file.display()
                )));
            }
            None => {}
        }
    }
    if let (Ok(id), Ok(secret)) = (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) && flags.access_id.as_ref().is_none_or(|given| *given == id)
    {
        let token = std::env::var("AWS_SESSION_TOKEN")
            .ok()
            .filter(|t| !t.is_empty());
        return Ok(CredentialStore::fixed(Keys {
            access_id: id,
            secret,
            token,
        }));
    }
    if let Some(id) = &flags.access_id {
        return Err(Error::Invalid(format!(
            "no secret key found for access ID \"{id}\" (use \"--accessKey\", \"--accessKeyEnv\" or \"--accessFile\")"
        )));
    }
    Ok(CredentialStore::anonymous())
}

fn fixed(id: &str, secret: &str) -> CredentialStore {
    CredentialStore::fixed(Keys {
        access_id: id.to_string(),
        secret: secret.to_string(),
        token: None,
    })
}

/// The explicit accessFile, or `$HOME/.s3backer_passwd` when it exists.
fn access_file(flags: &CredentialFlags) -> Option<PathBuf> {
    if let Some(file) = &flags.access_file {
        return Some(file.clone());
    }
    let default = Path::new(&std::env::var_os("HOME")?).join(".s3backer_passwd");
    default.exists().then_some(default)
}

/// Finds `ID:SECRET` in an accessFile (spec 8.1): the line for `id`, or the first valid line.
pub fn parse_access_file(text: &str, id: Option<&str>) -> Option<(String, String)> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter(|line| !line.starts_with(char::is_whitespace))
        .filter_map(|line| line.trim_end().split_once(':'))
        .find(|(line_id, _)| id.is_none_or(|want| want == *line_id))
        .map(|(line_id, secret)| (line_id.to_string(), secret.to_string()))
}

/// Client of the EC2 instance metadata service.
struct Imds {
    agent: ureq::Agent,
    base_url: String,
    role: String,
    v2: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ImdsCredentials {
    access_key_id: String,
    secret_access_key: String,
    token: Option<String>,
}

impl Imds {
    fn new(base_url: &str, role: &str, v2: bool) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .new_agent();
        let base_url = if base_url.is_empty() {
            DEFAULT_IMDS_BASE_URL
        } else {
            base_url
        };
        Imds {
            agent,
            base_url: base_url.trim_end_matches('/').to_string(),
            role: role.to_string(),
            v2,
        }
    }

    fn fetch(&self) -> std::result::Result<Keys, String> {
        let url = format!(
            "{}/latest/meta-data/iam/security-credentials/{}",
            self.base_url, self.role
        );
        let mut request = self.agent.get(&url);
        if self.v2 {
            let token = self
                .agent
                .put(format!("{}/latest/api/token", self.base_url))
                .header("X-aws-ec2-metadata-token-ttl-seconds", "21600")
                .send_empty()
                .and_then(|mut r| r.body_mut().read_to_string())
                .map_err(|e| format!("IMDSv2 token: {e}"))?;
            request = request.header("X-aws-ec2-metadata-token", token.trim());
        }
        let body = request
            .call()
            .and_then(|mut r| r.body_mut().read_to_string())
            .map_err(|e| e.to_string())?;
        // The error text never includes the body: it holds the secret.
        let parsed: ImdsCredentials =
            serde_json::from_str(&body).map_err(|_| "malformed credentials JSON".to_string())?;
        Ok(Keys {
            access_id: parsed.access_key_id,
            secret: parsed.secret_access_key,
            token: parsed.token.filter(|t| !t.is_empty()),
        })
    }

    /// Refreshes `keys` every [`IAM_REFRESH`] until the client drops them.
    fn spawn_refresh(self, keys: Weak<RwLock<Keys>>) {
        let spawned = std::thread::Builder::new()
            .name("s3-iam-refresh".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(IAM_REFRESH);
                    let Some(shared) = keys.upgrade() else { return };
                    match self.fetch() {
                        Ok(fresh) => {
                            *shared.write() = fresh;
                            tracing::debug!("refreshed EC2 IAM credentials for {}", self.role);
                        }
                        Err(e) => tracing::warn!("can't refresh EC2 IAM credentials: {e}"),
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("can't start the IAM refresh thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    #[test]
    fn access_file_picks_the_matching_or_first_valid_line() {
        let text = "# comment\n\n  indented:skip\nnocolon\nID1:secret1  \nID2:sec:ret2\n";
        assert_eq!(
            parse_access_file(text, None),
            Some(("ID1".into(), "secret1".into()))
        );
        assert_eq!(
            parse_access_file(text, Some("ID2")),
            Some(("ID2".into(), "sec:ret2".into()))
        );
        assert_eq!(parse_access_file(text, Some("indented")), None);
        assert_eq!(parse_access_file("# only\n", None), None);
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let keys = Keys {
            access_id: "AKID".into(),
            secret: "TOPSECRET".into(),
            token: Some("SESSIONTOKEN".into()),
        };
        let flags = CredentialFlags {
            access_id: Some("AKID".into()),
            access_key: Some("TOPSECRET".into()),
            ..Default::default()
        };
        let store = CredentialStore::fixed(keys.clone());
        for text in [
            format!("{keys:?}"),
            format!("{flags:?}"),
            format!("{store:?}"),
        ] {
            assert!(text.contains("AKID"), "{text}");
            assert!(!text.contains("TOPSECRET"), "{text}");
            assert!(!text.contains("SESSIONTOKEN"), "{text}");
        }
    }

    #[test]
    fn flags_win_and_empty_id_is_anonymous() {
        let flags = CredentialFlags {
            access_id: Some("id".into()),
            access_key: Some("key".into()),
            access_file: Some("/nonexistent/file".into()),
            ..Default::default()
        };
        let keys = resolve(&flags).unwrap().current().unwrap();
        assert_eq!(
            (keys.access_id.as_str(), keys.secret.as_str()),
            ("id", "key")
        );
        let anon = CredentialFlags {
            access_id: Some(String::new()),
            ..Default::default()
        };
        assert!(resolve(&anon).unwrap().is_anonymous());
    }

    #[test]
    fn access_file_lookup_by_id_and_missing_id_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("passwd");
        std::fs::write(&file, "a:1\nb:2\n").unwrap();
        let mut flags = CredentialFlags {
            access_id: Some("b".into()),
            access_file: Some(file),
            ..Default::default()
        };
        assert_eq!(resolve(&flags).unwrap().current().unwrap().secret, "2");
        flags.access_id = Some("c".into());
        let err = resolve(&flags).unwrap_err().to_string();
        assert!(err.contains("\"c\""), "{err}");
    }

    /// A one-thread fake IMDS on loopback answering `requests` requests.
    fn fake_imds(requests: usize) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..requests {
                let (stream, _) = listener.accept().unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                for _ in 0..50 {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let body = if head.starts_with("PUT /latest/api/token") {
                    "TOKEN123".to_string()
                } else if head.contains("x-aws-ec2-metadata-token: TOKEN123") {
                    r#"{"Code":"Success","AccessKeyId":"ASIA1","SecretAccessKey":"s3cr3t","Token":"tok"}"#
                        .to_string()
                } else {
                    "{}".to_string()
                };
                let mut out = stream;
                write!(
                    out,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                seen.push(head.lines().next().unwrap_or_default().to_string());
            }
            seen
        });
        (url, handle)
    }

    #[test]
    fn imds_v2_fetches_token_then_role_credentials() {
        let (url, server) = fake_imds(2);
        let flags = CredentialFlags {
            ec2_iam_role: Some("myrole".into()),
            imds_v2: true,
            imds_base_url: url,
            ..Default::default()
        };
        let keys = resolve(&flags).unwrap().current().unwrap();
        assert_eq!(keys.access_id, "ASIA1");
        assert_eq!(keys.secret, "s3cr3t");
        assert_eq!(keys.token.as_deref(), Some("tok"));
        let seen = server.join().unwrap();
        assert!(seen[0].starts_with("PUT /latest/api/token"), "{seen:?}");
        assert!(
            seen[1].starts_with("GET /latest/meta-data/iam/security-credentials/myrole"),
            "{seen:?}"
        );
    }
}
