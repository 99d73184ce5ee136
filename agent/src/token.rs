//! Bearer tokens: where the agent gets the practitioner's JWT, and the tonic interceptor that puts it on every call
//! as `authorization: Bearer <jwt>`.
//!
//! A token file is read again on every call, because the agency's own system refreshes it. A token command is run
//! when no cached token is fresh: its standard output is the token, cached until the token's `exp` claim minus 30
//! seconds (the claim is read without verifying the signature; verifying is the broker's job). The interceptor runs
//! the command synchronously, so the command should answer quickly.
//!
//! When no token can be obtained the call fails locally with `UNAVAILABLE` (not `UNAUTHENTICATED`), so that the outbox
//! keeps the file and tries again later rather than treating a momentarily missing token file as a refusal.

use std::{
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use tonic::{Request, Status, metadata::MetadataValue, service::Interceptor};

use crate::config::TokenSetting;

/// How long before its expiry a cached command token is considered stale.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// Why no token could be obtained.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The I/O errors here are said in the message and not returned as the source, so a report of the chain
    /// (`{:#}`) says them once.
    #[error("cannot read token file `{path}`: {error}")]
    ReadFile { path: PathBuf, error: std::io::Error },
    #[error("token file `{path}` is empty")]
    EmptyFile { path: PathBuf },
    #[error("cannot run token command `{program}`: {error}")]
    StartCommand { program: String, error: std::io::Error },
    #[error("token command `{program}` failed with {status}")]
    CommandFailed { program: String, status: std::process::ExitStatus },
    #[error("token command `{program}` printed no token")]
    EmptyCommandOutput { program: String },
    #[error("the token is not valid as a header value (it must be printable ASCII)")]
    NotAHeaderValue,
}

/// A token from a command, with the instant it stops being fresh (`None`: never cache).
#[derive(Debug, Clone)]
struct CachedToken {
    token: String,
    fresh_until: SystemTime,
}

/// Produces the current token according to the configuration. Cheap to clone: clones share the command cache.
#[derive(Debug, Clone)]
pub struct TokenSource {
    setting: TokenSetting,
    cache: Arc<Mutex<Option<CachedToken>>>,
}

impl TokenSource {
    pub fn new(setting: TokenSetting) -> TokenSource {
        TokenSource { setting, cache: Arc::new(Mutex::new(None)) }
    }

    /// The token to send now, or `None` when the agent is configured without tokens.
    ///
    /// # Errors
    /// Fails when the file cannot be read or the command fails or prints nothing.
    pub fn current_token(&self) -> Result<Option<String>, TokenError> {
        match &self.setting {
            TokenSetting::None => Ok(None),
            TokenSetting::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|error| TokenError::ReadFile { path: path.clone(), error })?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(TokenError::EmptyFile { path: path.clone() });
                }
                Ok(Some(token.to_owned()))
            }
            TokenSetting::Command(argv) => self.token_from_command(argv).map(Some),
        }
    }

    fn token_from_command(&self, argv: &[String]) -> Result<String, TokenError> {
        let now = SystemTime::now();
        // A poisoned lock only means another thread panicked while holding it; the cache inside is still usable.
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(cached) = cache.as_ref().filter(|cached| now < cached.fresh_until) {
            return Ok(cached.token.clone());
        }
        let program = argv.first().cloned().unwrap_or_default();
        let output = Command::new(&program)
            .args(argv.iter().skip(1))
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|error| TokenError::StartCommand { program: program.clone(), error })?;
        if !output.status.success() {
            return Err(TokenError::CommandFailed { program, status: output.status });
        }
        let token = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if token.is_empty() {
            return Err(TokenError::EmptyCommandOutput { program });
        }
        *cache = unverified_expiry(&token)
            .and_then(|expiry| expiry.checked_sub(EXPIRY_MARGIN))
            .map(|fresh_until| CachedToken { token: token.clone(), fresh_until });
        Ok(token)
    }
}

/// Reads the `exp` claim of a JWT without verifying it: only to decide how long to cache the token.
pub fn unverified_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let expiry = claims.get("exp")?.as_f64()?;
    if !expiry.is_finite() || expiry < 0.0 {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::from_secs_f64(expiry))
}

/// Adds `authorization: Bearer <token>` to every request when a token is configured.
#[derive(Debug, Clone)]
pub struct BearerInterceptor {
    source: TokenSource,
}

impl BearerInterceptor {
    pub fn new(source: TokenSource) -> BearerInterceptor {
        BearerInterceptor { source }
    }
}

impl Interceptor for BearerInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let token = self.source.current_token().map_err(|error| {
            tracing::warn!(error = %error, "no bearer token for the call");
            Status::unavailable(format!("the agent has no bearer token: {error}"))
        })?;
        if let Some(token) = token {
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| Status::unavailable(TokenError::NotAHeaderValue.to_string()))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_with_claims(claims: &str) -> String {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}.c2lnbmF0dXJl", engine.encode(r#"{"alg":"ES256"}"#), engine.encode(claims))
    }

    /// The agent's last error line (`{:#}` of the chain) says an I/O cause once, not once more after itself.
    #[test]
    fn an_unreadable_token_file_is_reported_once() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("missing.jwt");
        let error = TokenSource::new(TokenSetting::File(path.clone())).current_token().unwrap_err();
        let said = std::io::Error::from_raw_os_error(2).to_string();
        let report = format!("{:#}", anyhow::Error::from(error));
        assert!(report.starts_with(&format!("cannot read token file `{}`: ", path.display())), "{report}");
        assert_eq!(report.matches(&said).count(), 1, "{report}");
    }

    #[test]
    fn expiry_is_read_from_the_payload() {
        let token = token_with_claims(r#"{"sub":"a","exp":2000000000}"#);
        assert_eq!(unverified_expiry(&token), Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000)));
        assert_eq!(unverified_expiry("not-a-jwt"), None);
        assert_eq!(unverified_expiry(&token_with_claims(r#"{"sub":"a"}"#)), None);
    }

    #[test]
    fn token_file_is_read_on_every_call() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("token.jwt");
        std::fs::write(&path, "first\n").unwrap();
        let source = TokenSource::new(TokenSetting::File(path.clone()));
        assert_eq!(source.current_token().unwrap().as_deref(), Some("first"));
        std::fs::write(&path, "second").unwrap();
        assert_eq!(source.current_token().unwrap().as_deref(), Some("second"));
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(source.current_token(), Err(TokenError::EmptyFile { .. })));
    }

    #[test]
    fn command_token_is_cached_until_shortly_before_expiry() {
        let folder = tempfile::tempdir().unwrap();
        let counter = folder.path().join("runs");
        let fresh = token_with_claims(r#"{"exp":4000000000}"#);
        let script = format!("echo run >> '{}'; echo '{fresh}'", counter.display());
        let source = TokenSource::new(TokenSetting::Command(vec!["sh".into(), "-c".into(), script]));
        assert_eq!(source.current_token().unwrap(), Some(fresh.clone()));
        assert_eq!(source.current_token().unwrap(), Some(fresh));
        assert_eq!(std::fs::read_to_string(&counter).unwrap().lines().count(), 1);

        // A token that expires within the margin is fetched again on every call.
        let counter = folder.path().join("runs-expiring");
        let expiring = token_with_claims(&format!(
            r#"{{"exp":{}}}"#,
            SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 10
        ));
        let script = format!("echo run >> '{}'; echo '{expiring}'", counter.display());
        let source = TokenSource::new(TokenSetting::Command(vec!["sh".into(), "-c".into(), script]));
        source.current_token().unwrap();
        source.current_token().unwrap();
        assert_eq!(std::fs::read_to_string(&counter).unwrap().lines().count(), 2);
    }

    #[test]
    fn failing_command_is_an_error() {
        let source = TokenSource::new(TokenSetting::Command(vec!["sh".into(), "-c".into(), "exit 3".into()]));
        assert!(matches!(source.current_token(), Err(TokenError::CommandFailed { .. })));
    }

    #[test]
    fn interceptor_adds_the_bearer_header() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("token.jwt");
        std::fs::write(&path, "abc.def.ghi\n").unwrap();
        let mut interceptor = BearerInterceptor::new(TokenSource::new(TokenSetting::File(path)));
        let request = interceptor.call(Request::new(())).unwrap();
        assert_eq!(request.metadata().get("authorization").unwrap(), "Bearer abc.def.ghi");

        let mut without = BearerInterceptor::new(TokenSource::new(TokenSetting::None));
        assert!(without.call(Request::new(())).unwrap().metadata().get("authorization").is_none());

        let mut missing = BearerInterceptor::new(TokenSource::new(TokenSetting::File(folder.path().join("absent"))));
        assert_eq!(missing.call(Request::new(())).unwrap_err().code(), tonic::Code::Unavailable);
    }
}
