//! Broker configuration: [`ConfigFile`] is what the TOML file says (unknown keys rejected), [`Config`] is the
//! checked result. Every problem is reported at once, and environment variables (`BROKER_*`, see
//! [`ENVIRONMENT_OVERRIDES`]) override file settings for containers. Parsing binds no ports and opens no files
//! other than the configuration itself.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{auth::token::TokensFile, delivery::DeliveryConfig};

/// Default largest message accepted: 4 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The longest acknowledgement wait `delivery.ack_wait_seconds` may set.
const MAX_ACK_WAIT: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// The most delivery attempts `delivery.max_attempts` may set.
const MAX_ATTEMPTS: u32 = 1000;
/// The shortest and longest default retry delay (`delivery.default_retry_delay_millis`): zero redelivered a refused
/// copy at once, using up its attempts in milliseconds.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(24 * 60 * 60);
/// The largest in-flight window per agency (`delivery.max_in_flight`).
const MAX_IN_FLIGHT: usize = 65_536;
/// The largest message size limit (`limits.max_message_bytes`).
const MAX_MESSAGE_BYTES_LIMIT: usize = 64 * 1024 * 1024;
/// The largest journal segment (`storage.journal_segment_bytes`).
const MAX_SEGMENT_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// The largest index cache (`storage.index_cache_bytes`).
const MAX_INDEX_CACHE_BYTES: u64 = 16 * 1024 * 1024 * 1024;

/// The raw configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Address of the gRPC listener, e.g. `0.0.0.0:50051`.
    pub listen: Option<String>,
    /// Folder holding the journal, the index, the audit log and the broker's keys.
    pub data_dir: Option<PathBuf>,
    /// Folder of the information-sharing policy files.
    pub policy_dir: Option<PathBuf>,
    /// Address of the Prometheus metrics endpoint (`/metrics`, plain HTTP); none when absent.
    pub metrics_listen: Option<String>,
    #[serde(default)]
    pub tls: TlsFile,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub delivery: DeliveryFile,
    #[serde(default)]
    pub storage: StorageFile,
    #[serde(default)]
    pub audit: AuditFile,
    /// Practitioner tokens: the audience, the leeway, and per agency the trusted issuers and their keys.
    #[serde(default)]
    pub tokens: TokensFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// The area CA that issues agency certificates (PEM).
    pub ca_cert: Option<PathBuf>,
    /// The broker's server certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// The broker's server private key (PEM).
    pub key: Option<PathBuf>,
    /// The area CA's certificate revocation lists (PEM or DER): a client certificate they name is refused.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_message_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryFile {
    pub ack_wait_seconds: Option<u64>,
    pub max_attempts: Option<u32>,
    pub default_retry_delay_millis: Option<u64>,
    pub max_in_flight: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageFile {
    /// Memory sled may use as cache (default 8 MiB: the index holds small records; copies stay in the journal).
    pub index_cache_bytes: Option<u64>,
    /// Size of each journal segment file (default 64 MiB, at least 64 KiB): segments are written full of zeros ahead
    /// of use, so that a commit's `fdatasync` does not also write the file's size (ARCHITECTURE.md "Durability").
    pub journal_segment_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFile {
    /// The origin line of the audit log's signed checkpoints, which also names their signing key: text that
    /// identifies this log among others (C2SP `tlog-checkpoint` recommends a schema-less URL such as
    /// `safeguarding.luton.example/audit`). Fixed when the log is created.
    pub checkpoint_origin: Option<String>,
    /// The agencies whose practitioners may use the audit service (with the `auditor` role from their own identity
    /// provider): the area's information-governance function, e.g. the local authority's. A token's roles come from
    /// its own agency, so without this any agency could grant itself area-wide audit access. Default: none.
    #[serde(default)]
    pub auditor_agencies: Vec<String>,
}

/// Environment variables that override the file, with the setting each overrides.
pub const ENVIRONMENT_OVERRIDES: &[(&str, &str)] = &[
    ("BROKER_LISTEN", "listen"),
    ("BROKER_DATA_DIR", "data_dir"),
    ("BROKER_POLICY_DIR", "policy_dir"),
    ("BROKER_METRICS_LISTEN", "metrics_listen"),
    ("BROKER_TLS_CA_CERT", "tls.ca_cert"),
    ("BROKER_TLS_CERT", "tls.cert"),
    ("BROKER_TLS_KEY", "tls.key"),
    ("BROKER_MAX_MESSAGE_BYTES", "limits.max_message_bytes"),
    ("BROKER_ACK_WAIT_SECONDS", "delivery.ack_wait_seconds"),
    ("BROKER_MAX_ATTEMPTS", "delivery.max_attempts"),
    ("BROKER_CHECKPOINT_ORIGIN", "audit.checkpoint_origin"),
];

/// The checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub policy_dir: PathBuf,
    pub tls: TlsPaths,
    pub max_message_bytes: usize,
    pub delivery: DeliveryConfig,
    /// sled's cache and the journal's segment size.
    pub storage: crate::store::StoreOptions,
    /// The origin line of the audit log's checkpoints (see [`AuditFile::checkpoint_origin`]).
    pub checkpoint_origin: String,
    /// Agencies trusted to audit (see [`AuditFile::auditor_agencies`]).
    pub auditor_agencies: Vec<String>,
    pub tokens: TokensFile,
    /// Folder that relative paths in `tokens` are resolved against (the configuration file's).
    pub base_dir: PathBuf,
}

#[derive(Clone, Debug)]
pub struct TlsPaths {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Revocation lists of the CA, reloaded when they change (`auth::revocation`).
    pub crls: Vec<PathBuf>,
}

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigErrors {
    pub problems: Vec<String>,
}

impl Config {
    /// Reads, overrides from `environment` and checks a configuration file. Relative paths are taken from the
    /// file's folder.
    pub fn load(path: &Path, environment: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigErrors { problems: vec![format!("`{}`: {error}", path.display())] })?;
        let file: ConfigFile = toml::from_str(&text).map_err(|error| ConfigErrors {
            problems: vec![format!("`{}`: {}", path.display(), error.to_string().trim_end())],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_file(file, base, environment)
    }

    /// Checks a parsed file after applying environment overrides.
    pub fn from_file(
        mut file: ConfigFile,
        base: &Path,
        environment: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigErrors> {
        let mut problems = Vec::new();
        let mut number = |name: &str, value: String| -> Option<u64> {
            match value.parse() {
                Ok(number) => Some(number),
                Err(_) => {
                    problems.push(format!("`{name}`: `{value}` is not a whole number"));
                    None
                }
            }
        };
        if let Some(value) = environment("BROKER_LISTEN") {
            file.listen = Some(value);
        }
        if let Some(value) = environment("BROKER_METRICS_LISTEN") {
            file.metrics_listen = Some(value);
        }
        if let Some(value) = environment("BROKER_DATA_DIR") {
            file.data_dir = Some(value.into());
        }
        if let Some(value) = environment("BROKER_POLICY_DIR") {
            file.policy_dir = Some(value.into());
        }
        if let Some(value) = environment("BROKER_TLS_CA_CERT") {
            file.tls.ca_cert = Some(value.into());
        }
        if let Some(value) = environment("BROKER_TLS_CERT") {
            file.tls.cert = Some(value.into());
        }
        if let Some(value) = environment("BROKER_TLS_KEY") {
            file.tls.key = Some(value.into());
        }
        if let Some(value) = environment("BROKER_MAX_MESSAGE_BYTES") {
            file.limits.max_message_bytes =
                number("BROKER_MAX_MESSAGE_BYTES", value).map(|n| n.min(usize::MAX as u64) as usize);
        }
        if let Some(value) = environment("BROKER_ACK_WAIT_SECONDS") {
            file.delivery.ack_wait_seconds = number("BROKER_ACK_WAIT_SECONDS", value);
        }
        if let Some(value) = environment("BROKER_MAX_ATTEMPTS") {
            file.delivery.max_attempts =
                number("BROKER_MAX_ATTEMPTS", value).map(|n| u32::try_from(n).unwrap_or(u32::MAX));
        }
        if let Some(value) = environment("BROKER_CHECKPOINT_ORIGIN") {
            file.audit.checkpoint_origin = Some(value);
        }

        let listen_text = file.listen.unwrap_or_else(|| "127.0.0.1:50051".to_owned());
        let listen = match listen_text.parse() {
            Ok(address) => Some(address),
            Err(_) => {
                problems.push(format!("`listen`: `{listen_text}` is not an address and port such as `0.0.0.0:50051`"));
                None
            }
        };
        let metrics_listen = match &file.metrics_listen {
            None => None,
            Some(text) => match text.parse() {
                Ok(address) => Some(address),
                Err(_) => {
                    problems
                        .push(format!("`metrics_listen`: `{text}` is not an address and port such as `0.0.0.0:9464`"));
                    None
                }
            },
        };
        let mut required = |name: &str, value: Option<PathBuf>| -> PathBuf {
            match value {
                Some(path) => base.join(path),
                None => {
                    problems.push(format!("`{name}` is required"));
                    PathBuf::new()
                }
            }
        };
        let data_dir = required("data_dir", file.data_dir);
        let policy_dir = required("policy_dir", file.policy_dir);
        let tls = TlsPaths {
            ca_cert: required("tls.ca_cert", file.tls.ca_cert),
            cert: required("tls.cert", file.tls.cert),
            key: required("tls.key", file.tls.key),
            crls: file.tls.crls.iter().map(|path| base.join(path)).collect(),
        };
        let defaults = DeliveryConfig::default();
        let delivery = DeliveryConfig {
            ack_wait: file.delivery.ack_wait_seconds.map_or(defaults.ack_wait, Duration::from_secs),
            max_attempts: file.delivery.max_attempts.unwrap_or(defaults.max_attempts),
            default_retry_delay: file
                .delivery
                .default_retry_delay_millis
                .map_or(defaults.default_retry_delay, Duration::from_millis),
            max_in_flight: file.delivery.max_in_flight.unwrap_or(defaults.max_in_flight),
        };
        if delivery.max_attempts == 0 {
            problems.push("`delivery.max_attempts` must be at least 1".to_owned());
        }
        if delivery.max_in_flight == 0 {
            problems.push("`delivery.max_in_flight` must be at least 1".to_owned());
        }
        if delivery.ack_wait.is_zero() {
            problems.push("`delivery.ack_wait_seconds` must be at least 1".to_owned());
        }
        // Upper bounds: a value in the wrong unit (milliseconds for seconds) or a typo makes no sense for these, and
        // the delivery engine's timers cannot reach far beyond them.
        if delivery.ack_wait > MAX_ACK_WAIT {
            problems
                .push(format!("`delivery.ack_wait_seconds` must be at most {} (seven days)", MAX_ACK_WAIT.as_secs()));
        }
        if delivery.max_attempts > MAX_ATTEMPTS {
            problems.push(format!("`delivery.max_attempts` must be at most {MAX_ATTEMPTS}"));
        }
        if delivery.default_retry_delay < MIN_RETRY_DELAY || delivery.default_retry_delay > MAX_RETRY_DELAY {
            problems.push(format!(
                "`delivery.default_retry_delay_millis` must be from {} to {} (a day)",
                MIN_RETRY_DELAY.as_millis(),
                MAX_RETRY_DELAY.as_millis()
            ));
        }
        if delivery.max_in_flight > MAX_IN_FLIGHT {
            problems.push(format!("`delivery.max_in_flight` must be at most {MAX_IN_FLIGHT}"));
        }
        let max_message_bytes = file.limits.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
        if file.tokens.issuers.is_empty() {
            problems.push(
                "`tokens.issuers` is empty: list, per agency, the identity providers whose tokens the broker trusts"
                    .to_owned(),
            );
        }
        if max_message_bytes < 1024 {
            problems.push("`limits.max_message_bytes` must be at least 1024".to_owned());
        }
        if max_message_bytes > MAX_MESSAGE_BYTES_LIMIT {
            problems.push(format!("`limits.max_message_bytes` must be at most {MAX_MESSAGE_BYTES_LIMIT} (64 MiB)"));
        }
        let journal_segment_bytes =
            file.storage.journal_segment_bytes.unwrap_or(crate::store::journal::DEFAULT_SEGMENT_BYTES);
        if journal_segment_bytes < crate::store::journal::MIN_SEGMENT_BYTES {
            problems.push(format!(
                "`storage.journal_segment_bytes` must be at least {}",
                crate::store::journal::MIN_SEGMENT_BYTES
            ));
        }
        if journal_segment_bytes > MAX_SEGMENT_BYTES {
            problems.push(format!("`storage.journal_segment_bytes` must be at most {MAX_SEGMENT_BYTES} (4 GiB)"));
        }
        if file.storage.index_cache_bytes.is_some_and(|bytes| bytes > MAX_INDEX_CACHE_BYTES) {
            problems.push(format!("`storage.index_cache_bytes` must be at most {MAX_INDEX_CACHE_BYTES} (16 GiB)"));
        }
        let checkpoint_origin =
            file.audit.checkpoint_origin.unwrap_or_else(|| crate::audit::checkpoints::DEFAULT_ORIGIN.to_owned());
        if !crate::audit::checkpoint::is_valid_key_name(&checkpoint_origin) {
            problems.push(format!(
                "`audit.checkpoint_origin`: `{checkpoint_origin}` must be non-empty text without spaces, control \
                 characters or `+`, such as `safeguarding.luton.example/audit`"
            ));
        }
        for agency in &file.audit.auditor_agencies {
            if !crate::pki::is_valid_agency_id(agency) {
                problems.push(format!("`audit.auditor_agencies`: `{agency}` is not an agency id"));
            }
        }
        match listen {
            Some(listen) if problems.is_empty() => Ok(Self {
                listen,
                metrics_listen,
                data_dir,
                policy_dir,
                tls,
                max_message_bytes,
                delivery,
                storage: crate::store::StoreOptions {
                    index_cache_bytes: file.storage.index_cache_bytes.unwrap_or(8 * 1024 * 1024),
                    journal_segment_bytes,
                },
                checkpoint_origin,
                auditor_agencies: file.audit.auditor_agencies,
                tokens: file.tokens,
                base_dir: base.to_owned(),
            }),
            _ => Err(ConfigErrors { problems }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, environment: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let file: ConfigFile =
            toml::from_str(text).map_err(|error| ConfigErrors { problems: vec![error.to_string()] })?;
        Config::from_file(file, Path::new("/etc/broker"), |name| {
            environment.iter().find(|(key, _)| *key == name).map(|(_, value)| (*value).to_owned())
        })
    }

    const MINIMAL: &str = r#"
        data_dir = "data"
        policy_dir = "/srv/policies"
        [tls]
        ca_cert = "ca.pem"
        cert = "server.pem"
        key = "server.key"
        [[tokens.issuers]]
        agency = "beds-police"
        issuer = "https://login.beds-police.example"
        algorithms = ["ES256"]
        public_keys = [{ kid = "2026-1", pem = "keys/beds-police.pem" }]
    "#;

    #[test]
    fn a_minimal_file_gets_defaults_and_paths_relative_to_the_file() {
        let config = parse(MINIMAL, &[]).unwrap();
        assert_eq!(config.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(config.data_dir, PathBuf::from("/etc/broker/data"));
        assert_eq!(config.policy_dir, PathBuf::from("/srv/policies"));
        assert_eq!(config.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let error = parse(&format!("{MINIMAL}\nsurprise = 1"), &[]).unwrap_err();
        assert!(error.to_string().contains("surprise"), "{error}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let error = parse("listen = \"nowhere\"\n[delivery]\nmax_attempts = 0", &[]).unwrap_err();
        let text = error.to_string();
        for expected in ["`listen`", "`data_dir` is required", "`tls.key` is required", "max_attempts"] {
            assert!(text.contains(expected), "missing {expected} in {text}");
        }
    }

    /// Values in the wrong unit, or far past anything sensible, are refused at start with the setting named: before,
    /// an acknowledgement wait of centuries started and then made the delivery engine's timers panic, a retry delay
    /// of zero used up a refused copy's attempts in milliseconds, and `BROKER_MAX_ATTEMPTS=4294967297` meant 1.
    #[test]
    fn values_past_their_bounds_are_refused() {
        let cases = [
            ("[delivery]\nack_wait_seconds = 18446744073709551615", "`delivery.ack_wait_seconds` must be at most"),
            ("[delivery]\ndefault_retry_delay_millis = 0", "`delivery.default_retry_delay_millis` must be from"),
            ("[delivery]\ndefault_retry_delay_millis = 86400001", "`delivery.default_retry_delay_millis` must be from"),
            ("[delivery]\nmax_in_flight = 1000000", "`delivery.max_in_flight` must be at most"),
            ("[limits]\nmax_message_bytes = 1073741824", "`limits.max_message_bytes` must be at most"),
            ("[storage]\njournal_segment_bytes = 8589934592", "`storage.journal_segment_bytes` must be at most"),
            ("[storage]\nindex_cache_bytes = 34359738368", "`storage.index_cache_bytes` must be at most"),
        ];
        for (extra, expected) in cases {
            let error = parse(&format!("{MINIMAL}\n{extra}"), &[]).unwrap_err();
            assert!(error.to_string().contains(expected), "{extra}: {error}");
        }
        let error = parse(MINIMAL, &[("BROKER_MAX_ATTEMPTS", "4294967297")]).unwrap_err();
        assert!(error.to_string().contains("`delivery.max_attempts` must be at most"), "{error}");
        let within = "[delivery]\nack_wait_seconds = 604800\ndefault_retry_delay_millis = 100\nmax_attempts = 1000";
        parse(&format!("{MINIMAL}\n{within}"), &[]).unwrap();
    }

    #[test]
    fn the_checkpoint_origin_has_a_default_may_be_set_and_is_checked() {
        assert_eq!(parse(MINIMAL, &[]).unwrap().checkpoint_origin, crate::audit::checkpoints::DEFAULT_ORIGIN);
        let set = format!("{MINIMAL}\n[audit]\ncheckpoint_origin = \"safeguarding.luton.example/audit\"");
        assert_eq!(parse(&set, &[]).unwrap().checkpoint_origin, "safeguarding.luton.example/audit");
        let overridden = parse(&set, &[("BROKER_CHECKPOINT_ORIGIN", "safeguarding.beds.example/audit")]).unwrap();
        assert_eq!(overridden.checkpoint_origin, "safeguarding.beds.example/audit");
        let auditors = parse(&format!("{MINIMAL}\n[audit]\nauditor_agencies = [\"luton-csc\"]"), &[]).unwrap();
        assert_eq!(auditors.auditor_agencies, vec!["luton-csc"]);
        assert!(parse(MINIMAL, &[]).unwrap().auditor_agencies.is_empty(), "no agency is trusted to audit by default");
        let error = parse(&format!("{MINIMAL}\n[audit]\nauditor_agencies = [\"Luton CSC\"]"), &[]).unwrap_err();
        assert!(error.to_string().contains("`audit.auditor_agencies`"), "{error}");
        for bad in ["", "luton audit", "luton+audit"] {
            let error = parse(MINIMAL, &[("BROKER_CHECKPOINT_ORIGIN", bad)]).unwrap_err();
            assert!(error.to_string().contains("`audit.checkpoint_origin`"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn environment_overrides_the_file() {
        let config = parse(MINIMAL, &[("BROKER_LISTEN", "0.0.0.0:6000"), ("BROKER_MAX_ATTEMPTS", "9")]).unwrap();
        assert_eq!(config.listen, "0.0.0.0:6000".parse().unwrap());
        assert_eq!(config.delivery.max_attempts, 9);
        let error = parse(MINIMAL, &[("BROKER_MAX_ATTEMPTS", "many")]).unwrap_err();
        assert!(error.to_string().contains("BROKER_MAX_ATTEMPTS"));
    }
}
