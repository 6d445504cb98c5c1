//! Options for opening a store: endpoint, region, plain-HTTP opt-in, retries, raw object_store
//! configuration keys, and where credentials come from.

use std::collections::BTreeMap;
use std::time::Duration;

use object_store::{BackoffConfig, RetryConfig};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How to reach a store beyond what its URL says. Every field is optional; the defaults read
/// credentials from the process environment exactly like the cloud SDKs do.
///
/// Precedence, lowest first: environment variables, `config`, then the named fields
/// (`endpoint`, `region`, `allow_http`), then what the URL itself says (bucket, container).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreOptions {
    /// Custom endpoint for S3-protocol servers (MinIO, moto, R2) or Azure emulators,
    /// e.g. `http://127.0.0.1:9000`.
    pub endpoint: Option<String>,
    /// Cloud region (S3). Without it, `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Allow plain `http://` endpoints. Off by default so credentials never travel in clear
    /// text by accident; local test servers need it.
    pub allow_http: Option<bool>,
    /// Trust credentials the machine provides without any environment variable (EC2 instance
    /// profile, GCE metadata server, Azure managed identity). Off by default because probing a
    /// metadata endpoint that does not exist stalls for the whole retry budget before failing
    /// with an obscure error; with it off, absent credentials are reported at once.
    pub ambient_credentials: bool,
    /// Retry and backoff of every request; see [`RetrySettings`].
    pub retry: RetrySettings,
    /// Raw object_store configuration keys (`aws_virtual_hosted_style_request`,
    /// `google_service_account`, `azure_storage_account_name`, ...) applied after the
    /// environment. Unknown keys are an error.
    pub config: BTreeMap<String, String>,
    /// Where `AWS_*`, `GOOGLE_*`, `AZURE_*` variables are read from.
    #[serde(skip)]
    pub environment: Environment,
}

/// Overrides [`RetrySettings::max_retries`] from the environment, e.g. `0` to fail fast in
/// scripts and tests or a larger number on a flaky network.
pub const MAX_RETRIES_VAR: &str = "EFFNET_STORE_MAX_RETRIES";

impl StoreOptions {
    /// The retry configuration: [`StoreOptions::retry`], with `max_retries` replaced by
    /// [`MAX_RETRIES_VAR`] when that variable is set in [`StoreOptions::environment`].
    pub fn retry_config(&self) -> Result<RetryConfig> {
        let mut retry = self.retry.clone();
        if let Some(value) = self.environment.var(MAX_RETRIES_VAR) {
            retry.max_retries = value.trim().parse().map_err(|_| Error::InvalidOption {
                name: MAX_RETRIES_VAR.into(),
                reason: format!("must be a whole number, got '{value}'"),
            })?;
        }
        retry.to_retry_config()
    }
}

/// The source of credential environment variables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Environment {
    /// The process environment (production).
    #[default]
    Process,
    /// A fixed set of variables, so tests (which run in parallel threads) never have to mutate
    /// the process environment, and a test server's settings cannot be overridden by a
    /// developer's own `AWS_*` variables.
    Vars(BTreeMap<String, String>),
}

impl Environment {
    /// An empty environment: nothing is inherited.
    pub fn empty() -> Self {
        Environment::Vars(BTreeMap::new())
    }

    /// All variables as (name, value) pairs; non-UTF-8 process variables are skipped as
    /// object_store's own `from_env` does.
    pub fn vars(&self) -> Vec<(String, String)> {
        match self {
            Environment::Process => std::env::vars_os()
                .filter_map(|(key, value)| Some((key.into_string().ok()?, value.into_string().ok()?)))
                .collect(),
            Environment::Vars(vars) => vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }

    /// One variable, if set and non-empty.
    pub fn var(&self, name: &str) -> Option<String> {
        let value = match self {
            Environment::Process => std::env::var(name).ok(),
            Environment::Vars(vars) => vars.get(name).cloned(),
        };
        value.filter(|v| !v.is_empty())
    }
}

/// Retry and backoff of requests to remote stores (s3, gs, az, http).
///
/// object_store retries a request that failed with a 5xx or 429 status, a connection error, or a
/// timeout of a read-only request, waiting an exponentially growing, jittered delay between
/// attempts: `initial_backoff_ms`, then × `backoff_base` per attempt, capped at `max_backoff_ms`.
/// It gives up after `max_retries` retries or once `retry_timeout_secs` have passed since the
/// first attempt, whichever comes first. The defaults (10 retries, 100 ms → 15 s, base 2, 3
/// minutes) ride out a throttling burst or a short network outage; the 3 minute bound keeps a
/// retried request inside the validity of its signature (S3 presigning tolerates about 5
/// minutes of clock skew and retries reuse the signature).
///
/// The values equal object_store 0.14's defaults but are pinned here so an upgrade cannot
/// change them silently, and so a job file can tune them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// Retries after the first attempt; 0 disables retrying.
    pub max_retries: usize,
    /// Delay before the first retry.
    pub initial_backoff_ms: u64,
    /// Upper bound of any one delay.
    pub max_backoff_ms: u64,
    /// Growth factor of the delay per retry (at least 1).
    pub backoff_base: f64,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout_secs: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_retries: 10,
            initial_backoff_ms: 100,
            max_backoff_ms: 15_000,
            backoff_base: 2.0,
            retry_timeout_secs: 180,
        }
    }
}

impl RetrySettings {
    /// Check the settings and turn them into object_store's [`RetryConfig`].
    pub fn to_retry_config(&self) -> Result<RetryConfig> {
        if !self.backoff_base.is_finite() || self.backoff_base < 1.0 {
            return Err(Error::InvalidOption {
                name: "retry.backoff_base".into(),
                reason: format!("must be a finite number >= 1, got {}", self.backoff_base),
            });
        }
        if self.initial_backoff_ms > self.max_backoff_ms {
            return Err(Error::InvalidOption {
                name: "retry.initial_backoff_ms".into(),
                reason: format!(
                    "{} ms exceeds retry.max_backoff_ms {} ms",
                    self.initial_backoff_ms, self.max_backoff_ms
                ),
            });
        }
        Ok(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(self.initial_backoff_ms),
                max_backoff: Duration::from_millis(self.max_backoff_ms),
                base: self.backoff_base,
            },
            max_retries: self.max_retries,
            retry_timeout: Duration::from_secs(self.retry_timeout_secs),
        })
    }
}

/// object_store's reading of a boolean configuration value.
pub(crate) fn is_truthy(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes" | "on")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_retry_settings_are_the_documented_ones() {
        let config = RetrySettings::default().to_retry_config().unwrap();
        assert_eq!(config.max_retries, 10);
        assert_eq!(config.backoff.init_backoff, Duration::from_millis(100));
        assert_eq!(config.backoff.max_backoff, Duration::from_secs(15));
        assert_eq!(config.backoff.base, 2.0);
        assert_eq!(config.retry_timeout, Duration::from_secs(180));
    }

    #[test]
    fn max_retries_can_come_from_the_environment() {
        let vars = |value: &str| Environment::Vars([(MAX_RETRIES_VAR.to_string(), value.to_string())].into());
        let options = StoreOptions { environment: vars("0"), ..Default::default() };
        assert_eq!(options.retry_config().unwrap().max_retries, 0);
        let options = StoreOptions { environment: Environment::empty(), ..Default::default() };
        assert_eq!(options.retry_config().unwrap().max_retries, 10);
        let options = StoreOptions { environment: vars("lots"), ..Default::default() };
        let message = options.retry_config().unwrap_err().to_string();
        assert!(message.contains(MAX_RETRIES_VAR) && message.contains("'lots'"), "{message}");
    }

    #[test]
    fn bad_retry_settings_name_the_field() {
        let settings = RetrySettings { backoff_base: 0.5, ..Default::default() };
        let message = settings.to_retry_config().unwrap_err().to_string();
        assert_eq!(message, "invalid store option retry.backoff_base: must be a finite number >= 1, got 0.5");

        let settings = RetrySettings { initial_backoff_ms: 20_000, ..Default::default() };
        let message = settings.to_retry_config().unwrap_err().to_string();
        assert!(message.contains("retry.initial_backoff_ms"), "{message}");
    }

    #[test]
    fn options_deserialize_with_defaults() {
        let options: StoreOptions = serde_json::from_str(
            r#"{"endpoint": "http://127.0.0.1:9000", "allow_http": true, "retry": {"max_retries": 3}}"#,
        )
        .unwrap();
        assert_eq!(options.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(options.allow_http, Some(true));
        assert_eq!(options.retry.max_retries, 3);
        assert_eq!(options.retry.max_backoff_ms, 15_000);
        assert_eq!(options.environment, Environment::Process);
        assert!(serde_json::from_str::<StoreOptions>(r#"{"endpiont": "x"}"#).is_err());
    }

    #[test]
    fn environment_vars_are_isolated_from_the_process() {
        let env = Environment::Vars(BTreeMap::from([("AWS_REGION".to_string(), "eu-west-1".to_string())]));
        assert_eq!(env.var("AWS_REGION").as_deref(), Some("eu-west-1"));
        assert_eq!(env.var("PATH"), None);
        assert!(Environment::empty().vars().is_empty());
    }
}
