//! The agent's configuration: a TOML file beside the agency's deployment, overridden by `AGENT_*` environment
//! variables, checked as a whole so that every problem is reported at once.
//!
//! Paths in the file are relative to the folder holding the file; paths given in environment variables are relative
//! to the current working directory (that is how a shell reads them). The file is parsed into [`ConfigFile`] (raw,
//! serde, `deny_unknown_fields`) and then validated into [`AgentConfig`].
//!
//! Environment variables (each overrides the file setting of the same name):
//!
//! | variable                          | setting                             |
//! |-----------------------------------|-------------------------------------|
//! | `AGENT_AGENCY`                    | `agency`                            |
//! | `AGENT_BROKER_URL`                | `broker_url`                        |
//! | `AGENT_SERVER_NAME`               | `server_name`                       |
//! | `AGENT_CA_CERT`                   | `ca_cert`                           |
//! | `AGENT_CERT`                      | `cert`                              |
//! | `AGENT_KEY`                       | `key`                               |
//! | `AGENT_INBOX`                     | `inbox`                             |
//! | `AGENT_OUTBOX`                    | `outbox`                            |
//! | `AGENT_TOKEN_FILE`                | `token_file` (clears `token_command`) |
//! | `AGENT_TOKEN_COMMAND`             | `token_command`, run as `sh -c "$AGENT_TOKEN_COMMAND"` (clears `token_file`) |
//! | `AGENT_RECONNECT_INITIAL_MILLIS`  | `delivery.reconnect_initial_millis` |
//! | `AGENT_RECONNECT_MAX_MILLIS`      | `delivery.reconnect_max_millis`     |
//! | `AGENT_RETRY_AFTER_MILLIS`        | `delivery.retry_after_millis`       |

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// The configuration file as written, before validation. Every field is optional here so that validation can report
/// each missing one rather than stopping at the first.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub agency: Option<String>,
    pub broker_url: Option<String>,
    pub server_name: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub inbox: Option<PathBuf>,
    pub outbox: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub token_command: Option<Vec<String>>,
    #[serde(default)]
    pub delivery: DeliveryFile,
}

/// The `[delivery]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryFile {
    pub reconnect_initial_millis: Option<u64>,
    pub reconnect_max_millis: Option<u64>,
    pub retry_after_millis: Option<u64>,
}

const TOP_LEVEL_KEYS: &[&str] = &[
    "agency",
    "broker_url",
    "server_name",
    "ca_cert",
    "cert",
    "key",
    "inbox",
    "outbox",
    "token_file",
    "token_command",
    "delivery",
];
const DELIVERY_KEYS: &[&str] = &["reconnect_initial_millis", "reconnect_max_millis", "retry_after_millis"];

const DEFAULT_RECONNECT_INITIAL_MILLIS: u64 = 200;
const DEFAULT_RECONNECT_MAX_MILLIS: u64 = 10_000;
const DEFAULT_RETRY_AFTER_MILLIS: u64 = 30_000;

/// Where the agent obtains the practitioner's bearer token for each call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSetting {
    /// No token: calls carry no `authorization` metadata (a broker that requires tokens refuses them).
    None,
    /// A file the agency's own system keeps fresh; read again on every call.
    File(PathBuf),
    /// A command whose standard output is the token; its result is cached until the token's `exp` minus 30 seconds.
    Command(Vec<String>),
}

/// How the agent paces its reconnections and refusals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverySettings {
    /// First delay before reconnecting the delivery stream (and retrying the outbox) after a failure.
    pub reconnect_initial: Duration,
    /// Upper bound of the exponential backoff.
    pub reconnect_max: Duration,
    /// The delay the agent asks for when it negatively acknowledges a delivery it could not write.
    pub retry_after: Duration,
}

/// A validated agent configuration with absolute (or working-directory relative) paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// The agency this agent runs for. For display and sanity checks only: the broker takes the agency from the
    /// client certificate.
    pub agency: String,
    /// The broker's address, `https://host:port`.
    pub broker_url: String,
    /// The DNS name in the broker's server certificate.
    pub server_name: String,
    /// The certificate authority that signed the broker's server certificate.
    pub ca_cert: PathBuf,
    /// This agency's client certificate (PEM) and its private key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Folder the agent writes deliveries into, one `<delivery_id>.json` file each.
    pub inbox: PathBuf,
    /// Folder the agent watches for messages to send, if any.
    pub outbox: Option<PathBuf>,
    pub token: TokenSetting,
    pub delivery: DeliverySettings,
}

/// Every problem found in a configuration, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblems {
    /// The file the problems were found in.
    pub path: PathBuf,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigProblems {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "invalid agent configuration `{}`:", self.path.display())?;
        for problem in &self.problems {
            write!(formatter, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigProblems {}

impl AgentConfig {
    /// Reads and validates the configuration file at `path`, with overrides from the process environment.
    ///
    /// # Errors
    /// Returns every problem found: an unreadable file, bad TOML, unknown or missing keys, bad values, certificate
    /// files that do not exist.
    pub fn load(path: impl AsRef<Path>) -> Result<AgentConfig, ConfigProblems> {
        Self::load_with_environment(path, |name| std::env::var(name).ok())
    }

    /// Like [`AgentConfig::load`], with environment variables looked up through `environment` (tests pass a map).
    ///
    /// # Errors
    /// As [`AgentConfig::load`].
    pub fn load_with_environment(
        path: impl AsRef<Path>,
        environment: impl Fn(&str) -> Option<String>,
    ) -> Result<AgentConfig, ConfigProblems> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigProblems {
            path: path.to_path_buf(),
            problems: vec![format!("cannot read the configuration file: {}", describe_io_error(&error))],
        })?;
        let base_directory = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, &base_directory, environment)
            .map_err(|problems| ConfigProblems { path: path.to_path_buf(), problems })
    }

    /// Validates configuration `text` whose relative paths are relative to `base_directory`.
    ///
    /// # Errors
    /// Returns the list of every problem found.
    pub fn parse(
        text: &str,
        base_directory: &Path,
        environment: impl Fn(&str) -> Option<String>,
    ) -> Result<AgentConfig, Vec<String>> {
        let mut problems = Vec::new();
        let file = parse_file(text, &mut problems);
        let mut builder = Builder::default();

        // Settings from the file, with relative paths resolved against its folder.
        let from_file = |value: Option<PathBuf>| value.map(|value| base_directory.join(value));
        builder.agency = file.agency;
        builder.broker_url = file.broker_url;
        builder.server_name = file.server_name;
        builder.ca_cert = from_file(file.ca_cert);
        builder.cert = from_file(file.cert);
        builder.key = from_file(file.key);
        builder.inbox = from_file(file.inbox);
        builder.outbox = from_file(file.outbox);
        builder.token_file = from_file(file.token_file);
        builder.token_command = file.token_command;
        builder.reconnect_initial_millis = file.delivery.reconnect_initial_millis;
        builder.reconnect_max_millis = file.delivery.reconnect_max_millis;
        builder.retry_after_millis = file.delivery.retry_after_millis;

        builder.apply_environment(&environment, &mut problems);
        builder.validate(problems)
    }
}

/// Parses the TOML text, reporting unknown keys one by one before serde sees the rest.
fn parse_file(text: &str, problems: &mut Vec<String>) -> ConfigFile {
    let mut table: toml::Table = match text.parse() {
        Ok(table) => table,
        Err(error) => {
            problems.push(format!("invalid TOML: {}", error.message()));
            return ConfigFile::default();
        }
    };
    let unknown: Vec<String> = table.keys().filter(|key| !TOP_LEVEL_KEYS.contains(&key.as_str())).cloned().collect();
    for key in unknown {
        problems.push(format!("unknown key `{key}`"));
        table.remove(&key);
    }
    if let Some(toml::Value::Table(delivery)) = table.get_mut("delivery") {
        let unknown: Vec<String> =
            delivery.keys().filter(|key| !DELIVERY_KEYS.contains(&key.as_str())).cloned().collect();
        for key in unknown {
            problems.push(format!("unknown key `delivery.{key}`"));
            delivery.remove(&key);
        }
    }
    // Type errors are reported key by key too: each known key is deserialized on its own first.
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        let Some(value) = table.get(&key) else { continue };
        let mut single = toml::Table::new();
        single.insert(key.clone(), value.clone());
        if let Err(error) = single.try_into::<ConfigFile>() {
            problems.push(format!("`{key}`: {}", error.message().trim()));
            table.remove(&key);
        }
    }
    match table.try_into::<ConfigFile>() {
        Ok(file) => file,
        Err(error) => {
            problems.push(format!("invalid configuration: {}", error.message().trim()));
            ConfigFile::default()
        }
    }
}

/// Settings gathered from the file and the environment, before validation.
#[derive(Default)]
struct Builder {
    agency: Option<String>,
    broker_url: Option<String>,
    server_name: Option<String>,
    ca_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    inbox: Option<PathBuf>,
    outbox: Option<PathBuf>,
    token_file: Option<PathBuf>,
    token_command: Option<Vec<String>>,
    reconnect_initial_millis: Option<u64>,
    reconnect_max_millis: Option<u64>,
    retry_after_millis: Option<u64>,
}

impl Builder {
    fn apply_environment(&mut self, environment: &impl Fn(&str) -> Option<String>, problems: &mut Vec<String>) {
        let text = |name: &str| environment(name).filter(|value| !value.is_empty());
        if let Some(value) = text("AGENT_AGENCY") {
            self.agency = Some(value);
        }
        if let Some(value) = text("AGENT_BROKER_URL") {
            self.broker_url = Some(value);
        }
        if let Some(value) = text("AGENT_SERVER_NAME") {
            self.server_name = Some(value);
        }
        for (name, slot) in [
            ("AGENT_CA_CERT", &mut self.ca_cert),
            ("AGENT_CERT", &mut self.cert),
            ("AGENT_KEY", &mut self.key),
            ("AGENT_INBOX", &mut self.inbox),
            ("AGENT_OUTBOX", &mut self.outbox),
        ] {
            if let Some(value) = text(name) {
                *slot = Some(PathBuf::from(value));
            }
        }
        if let Some(value) = text("AGENT_TOKEN_FILE") {
            self.token_file = Some(PathBuf::from(value));
            self.token_command = None;
        }
        if let Some(value) = text("AGENT_TOKEN_COMMAND") {
            self.token_command = Some(vec!["sh".to_owned(), "-c".to_owned(), value]);
            self.token_file = None;
        }
        for (name, slot) in [
            ("AGENT_RECONNECT_INITIAL_MILLIS", &mut self.reconnect_initial_millis),
            ("AGENT_RECONNECT_MAX_MILLIS", &mut self.reconnect_max_millis),
            ("AGENT_RETRY_AFTER_MILLIS", &mut self.retry_after_millis),
        ] {
            if let Some(value) = text(name) {
                match value.trim().parse::<u64>() {
                    Ok(number) => *slot = Some(number),
                    Err(_) => problems.push(format!(
                        "environment variable {name} must be a whole number of milliseconds, not `{value}`"
                    )),
                }
            }
        }
    }

    fn validate(self, mut problems: Vec<String>) -> Result<AgentConfig, Vec<String>> {
        let mut required = |name: &str, value: Option<String>| match value {
            Some(value) if !value.trim().is_empty() => value,
            Some(_) => {
                problems.push(format!("`{name}` must not be empty"));
                String::new()
            }
            None => {
                problems.push(format!("missing required key `{name}`"));
                String::new()
            }
        };
        let agency = required("agency", self.agency);
        let broker_url = required("broker_url", self.broker_url);
        let server_name = required("server_name", self.server_name);
        let mut required_path = |name: &str, value: Option<PathBuf>| match value {
            Some(value) => value,
            None => {
                problems.push(format!("missing required key `{name}`"));
                PathBuf::new()
            }
        };
        let ca_cert = required_path("ca_cert", self.ca_cert);
        let cert = required_path("cert", self.cert);
        let key = required_path("key", self.key);
        let inbox = required_path("inbox", self.inbox);

        if !agency.is_empty() && !is_agency_id(&agency) {
            problems.push(format!(
                "`agency` must be an agency id of lowercase letters, digits and hyphens, not `{agency}`"
            ));
        }
        if !broker_url.is_empty() && !broker_url.starts_with("https://") {
            problems.push(format!(
                "`broker_url` must start with `https://` (the broker only speaks TLS), not `{broker_url}`"
            ));
        }
        for (name, path) in [("ca_cert", &ca_cert), ("cert", &cert), ("key", &key)] {
            if !path.as_os_str().is_empty() && !path.is_file() {
                problems.push(format!("`{name}` file `{}` does not exist", path.display()));
            }
        }
        if !inbox.as_os_str().is_empty() && inbox.exists() && !inbox.is_dir() {
            problems.push(format!("`inbox` `{}` is not a folder", inbox.display()));
        }
        if let Some(outbox) = &self.outbox {
            if outbox.exists() && !outbox.is_dir() {
                problems.push(format!("`outbox` `{}` is not a folder", outbox.display()));
            }
            if *outbox == inbox {
                problems.push("`outbox` and `inbox` must be different folders".to_owned());
            }
        }

        let token = match (self.token_file, self.token_command) {
            (Some(_), Some(_)) => {
                problems.push("set `token_file` or `token_command`, not both".to_owned());
                TokenSetting::None
            }
            (Some(file), None) => TokenSetting::File(file),
            (None, Some(command)) if command.is_empty() || command[0].is_empty() => {
                problems.push("`token_command` must name a program to run".to_owned());
                TokenSetting::None
            }
            (None, Some(command)) => TokenSetting::Command(command),
            (None, None) => TokenSetting::None,
        };

        let initial = self.reconnect_initial_millis.unwrap_or(DEFAULT_RECONNECT_INITIAL_MILLIS);
        let max = self.reconnect_max_millis.unwrap_or(DEFAULT_RECONNECT_MAX_MILLIS);
        let retry_after = self.retry_after_millis.unwrap_or(DEFAULT_RETRY_AFTER_MILLIS);
        if initial == 0 {
            problems.push("`delivery.reconnect_initial_millis` must be greater than 0".to_owned());
        }
        if max < initial {
            problems.push(format!(
                "`delivery.reconnect_max_millis` ({max}) must not be less than `delivery.reconnect_initial_millis` ({initial})"
            ));
        }

        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(AgentConfig {
            agency,
            broker_url,
            server_name,
            ca_cert,
            cert,
            key,
            inbox,
            outbox: self.outbox,
            token,
            delivery: DeliverySettings {
                reconnect_initial: Duration::from_millis(initial),
                reconnect_max: Duration::from_millis(max),
                retry_after: Duration::from_millis(retry_after),
            },
        })
    }
}

/// Agency ids are lowercase words joined by hyphens (`luton-csc`), as in the policy set's registry.
fn is_agency_id(value: &str) -> bool {
    !value.starts_with('-')
        && !value.ends_with('-')
        && value
            .chars()
            .all(|character| character.is_ascii_lowercase() || character.is_ascii_digit() || character == '-')
}

fn describe_io_error(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_owned(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A folder with the certificate files a configuration names, so that only the settings under test can fail.
    fn folder_with_certificates() -> tempfile::TempDir {
        let folder = tempfile::tempdir().unwrap();
        fs_write(folder.path(), "pki/ca.pem");
        fs_write(folder.path(), "pki/agents/beds-police.pem");
        fs_write(folder.path(), "pki/agents/beds-police.key");
        std::fs::create_dir_all(folder.path().join("config")).unwrap();
        folder
    }

    fn fs_write(base: &Path, relative: &str) {
        let path = base.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "placeholder").unwrap();
    }

    const VALID: &str = r#"
        agency = "beds-police"
        broker_url = "https://127.0.0.1:50051"
        server_name = "localhost"
        ca_cert = "../pki/ca.pem"
        cert = "../pki/agents/beds-police.pem"
        key = "../pki/agents/beds-police.key"
        inbox = "../inbox/beds-police"
        outbox = "../outbox/beds-police"
        token_file = "../tokens/beds-police.jwt"
        [delivery]
        reconnect_initial_millis = 100
        reconnect_max_millis = 5000
    "#;

    fn write_config(folder: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = folder.path().join("config/agent.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn no_environment(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn valid_file_resolves_paths_against_its_folder() {
        let folder = folder_with_certificates();
        let path = write_config(&folder, VALID);
        let config = AgentConfig::load_with_environment(&path, no_environment).unwrap();
        let config_folder = folder.path().join("config");
        assert_eq!(config.agency, "beds-police");
        assert_eq!(config.ca_cert, config_folder.join("../pki/ca.pem"));
        assert_eq!(config.inbox, config_folder.join("../inbox/beds-police"));
        assert_eq!(config.outbox, Some(config_folder.join("../outbox/beds-police")));
        assert_eq!(config.token, TokenSetting::File(config_folder.join("../tokens/beds-police.jwt")));
        assert_eq!(config.delivery.reconnect_initial, Duration::from_millis(100));
        assert_eq!(config.delivery.reconnect_max, Duration::from_millis(5000));
        assert_eq!(config.delivery.retry_after, Duration::from_millis(DEFAULT_RETRY_AFTER_MILLIS));
    }

    #[test]
    fn defaults_apply_without_a_delivery_table() {
        let folder = folder_with_certificates();
        let text: String = VALID.lines().take_while(|line| !line.contains("[delivery]")).collect::<Vec<_>>().join("\n");
        let text = text
            .replace("outbox = \"../outbox/beds-police\"", "")
            .replace("token_file = \"../tokens/beds-police.jwt\"", "");
        let config = AgentConfig::load_with_environment(write_config(&folder, &text), no_environment).unwrap();
        assert_eq!(config.outbox, None);
        assert_eq!(config.token, TokenSetting::None);
        assert_eq!(config.delivery.reconnect_initial, Duration::from_millis(DEFAULT_RECONNECT_INITIAL_MILLIS));
        assert_eq!(config.delivery.reconnect_max, Duration::from_millis(DEFAULT_RECONNECT_MAX_MILLIS));
    }

    #[test]
    fn unknown_key_is_named() {
        let folder = folder_with_certificates();
        let text = format!("brokr_url = \"https://x\"\n{VALID}");
        let problems = AgentConfig::load_with_environment(write_config(&folder, &text), no_environment).unwrap_err();
        assert_eq!(problems.problems, vec!["unknown key `brokr_url`".to_owned()]);
        assert!(problems.to_string().contains("unknown key `brokr_url`"));
    }

    #[test]
    fn missing_file_is_reported() {
        let folder = tempfile::tempdir().unwrap();
        let problems =
            AgentConfig::load_with_environment(folder.path().join("absent.toml"), no_environment).unwrap_err();
        assert_eq!(problems.problems.len(), 1);
        assert!(problems.problems[0].contains("no such file"), "{problems}");
    }

    #[test]
    fn invalid_toml_is_reported() {
        let folder = tempfile::tempdir().unwrap();
        let problems = AgentConfig::parse("agency = ", folder.path(), no_environment).unwrap_err();
        assert!(problems[0].starts_with("invalid TOML"), "{problems:?}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let folder = tempfile::tempdir().unwrap();
        let text = r#"
            agency = "Beds Police"
            broker_url = "http://127.0.0.1:50051"
            ca_cert = "missing-ca.pem"
            cert = 42
            colour = "blue"
            token_file = "t.jwt"
            token_command = ["print-token"]
            [delivery]
            reconnect_initial_millis = 5000
            reconnect_max_millis = 100
            jitter = true
        "#;
        let problems = AgentConfig::parse(text, folder.path(), no_environment).unwrap_err();
        let expected = [
            "unknown key `colour`",
            "unknown key `delivery.jitter`",
            "`cert`:",
            "missing required key `server_name`",
            "missing required key `key`",
            "missing required key `inbox`",
            "`agency` must be an agency id",
            "`broker_url` must start with `https://`",
            "`ca_cert` file",
            "set `token_file` or `token_command`, not both",
            "`delivery.reconnect_max_millis` (100) must not be less than",
        ];
        for fragment in expected {
            assert!(problems.iter().any(|problem| problem.contains(fragment)), "`{fragment}` not in {problems:#?}");
        }
        assert_eq!(problems.len(), expected.len() + 1, "{problems:#?}"); // `cert` is also reported missing.
    }

    #[test]
    fn environment_overrides_the_file() {
        let folder = folder_with_certificates();
        let path = write_config(&folder, VALID);
        let environment: HashMap<&str, &str> = HashMap::from([
            ("AGENT_BROKER_URL", "https://broker.example:443"),
            ("AGENT_INBOX", "/srv/agent/inbox"),
            ("AGENT_TOKEN_COMMAND", "cat /run/token"),
            ("AGENT_RECONNECT_MAX_MILLIS", "20000"),
            ("AGENT_OUTBOX", ""),
        ]);
        let lookup = |name: &str| environment.get(name).map(|value| (*value).to_owned());
        let config = AgentConfig::load_with_environment(&path, lookup).unwrap();
        assert_eq!(config.broker_url, "https://broker.example:443");
        assert_eq!(config.inbox, PathBuf::from("/srv/agent/inbox"));
        assert_eq!(config.token, TokenSetting::Command(vec!["sh".into(), "-c".into(), "cat /run/token".into()]));
        assert_eq!(config.delivery.reconnect_max, Duration::from_millis(20_000));
        // An empty variable does not override.
        assert_eq!(config.outbox, Some(folder.path().join("config/../outbox/beds-police")));
        assert_eq!(config.server_name, "localhost");
    }

    #[test]
    fn environment_values_are_validated_too() {
        let folder = folder_with_certificates();
        let path = write_config(&folder, VALID);
        let lookup = |name: &str| match name {
            "AGENT_RECONNECT_INITIAL_MILLIS" => Some("soon".to_owned()),
            "AGENT_CA_CERT" => Some("/nonexistent/ca.pem".to_owned()),
            _ => None,
        };
        let problems = AgentConfig::load_with_environment(&path, lookup).unwrap_err().problems;
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(problems[0].contains("AGENT_RECONNECT_INITIAL_MILLIS"));
        assert!(problems[1].contains("/nonexistent/ca.pem"));
    }
}
