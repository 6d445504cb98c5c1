//! From a URL to a store and the prefix inside it.

use std::collections::HashMap;
use std::path::{Component, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ClientConfigKey, ObjectStore};
use url::Url;

use crate::error::{Error, Result};
use crate::options::{Environment, StoreOptions, is_truthy};
use crate::read_only::ReadOnlyStore;
use crate::redact::redact;

/// The kind of store a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `file:///abs/dir`, `/abs/dir`, `relative/dir`.
    File,
    /// `memory://NAME/prefix`: a process-global in-memory store per NAME.
    Memory,
    /// `s3://bucket/prefix` (also `s3a://`).
    S3,
    /// `gs://bucket/prefix`.
    Gcs,
    /// `az://container/prefix`, `abfs(s)://container@account.dfs.core.windows.net/prefix`,
    /// `adl://`, `azure://`.
    Azure,
    /// `http(s)://host/path`, read-only.
    Http,
}

impl Scheme {
    /// The scheme of `url`; a string without `://` is a local path.
    pub fn of(url: &str) -> Result<Scheme> {
        let Some((scheme, _)) = url.split_once("://") else {
            return Ok(Scheme::File);
        };
        match scheme.to_ascii_lowercase().as_str() {
            "file" => Ok(Scheme::File),
            "memory" => Ok(Scheme::Memory),
            "s3" | "s3a" => Ok(Scheme::S3),
            "gs" => Ok(Scheme::Gcs),
            "az" | "abfs" | "abfss" | "adl" | "azure" => Ok(Scheme::Azure),
            "http" | "https" => Ok(Scheme::Http),
            _ => Err(Error::UnknownScheme { url: redact(url), scheme: scheme.to_string() }),
        }
    }
}

/// A store and the prefix inside it that a URL names.
///
/// Objects of the location live under `prefix`: use [`StoreLocation::path`] to name them, so
/// the same code works for a local directory (prefix empty, store rooted at the directory) and
/// a bucket (prefix = the key path after the bucket).
#[derive(Clone, Debug)]
pub struct StoreLocation {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    pub scheme: Scheme,
    /// The URL as given, for messages.
    pub url: String,
}

impl StoreLocation {
    /// The object `relative` (slash-separated, e.g. `part-00000.parquet` or `step-1/COMMIT`)
    /// under this location's prefix.
    pub fn path(&self, relative: &str) -> Result<Path> {
        let relative = Path::parse(relative).map_err(|source| Error::InvalidUrl {
            url: format!("{}/{relative}", self.url.trim_end_matches('/')),
            reason: source.to_string(),
        })?;
        Ok(self.prefix.parts().chain(relative.parts()).collect())
    }

    /// True for `http(s)://` locations, which refuse writes with [`Error::ReadOnly`].
    pub fn is_read_only(&self) -> bool {
        self.scheme == Scheme::Http
    }
}

/// Open the store a URL names, with credentials from the process environment and the default
/// retry settings. See the crate docs for the URL forms.
pub fn open(url: &str) -> Result<StoreLocation> {
    open_with(url, &StoreOptions::default())
}

/// Open the store a URL names with explicit options.
pub fn open_with(url: &str, options: &StoreOptions) -> Result<StoreLocation> {
    let scheme = Scheme::of(url)?;
    let (store, prefix): (Arc<dyn ObjectStore>, Path) = match scheme {
        Scheme::File => (open_local(url)?, Path::default()),
        Scheme::Memory => open_memory(url)?,
        Scheme::S3 => open_s3(url, options)?,
        Scheme::Gcs => open_gcs(url, options)?,
        Scheme::Azure => open_azure(url, options)?,
        Scheme::Http => open_http(url, options)?,
    };
    let faults = crate::faults::FaultPlan::from_env()?;
    let store = match faults.clone() {
        Some(plan) => Arc::new(crate::faults::FaultyStore::new(store, plan)) as Arc<dyn ObjectStore>,
        None => store,
    };
    // Memory stores fail only when faults are injected; unwrapped, two opens of one name stay
    // the same store.
    let store: Arc<dyn ObjectStore> = if scheme == Scheme::Memory && faults.is_none() {
        store
    } else {
        // EFFNET_STORE_MAX_RETRIES=0 (fail at the first error) holds for this layer too.
        let retries = options
            .environment
            .var(crate::options::MAX_RETRIES_VAR)
            .and_then(|value| value.trim().parse::<u32>().ok())
            .map_or(crate::retrying::RETRIES, |value| value.min(crate::retrying::RETRIES));
        Arc::new(crate::retrying::RetryingStore::with_retries(store, retries))
    };
    Ok(StoreLocation { store, prefix, scheme, url: url.to_string() })
}

fn invalid(url: &str, reason: impl Into<String>) -> Error {
    Error::InvalidUrl { url: redact(url), reason: reason.into() }
}

fn build_error(url: &str, source: object_store::Error) -> Error {
    Error::Store { location: redact(url), source }
}

fn parse_url(url: &str) -> Result<Url> {
    Url::parse(url).map_err(|e| invalid(url, e.to_string()))
}

/// The key path after the bucket/container: the URL path without its leading `/`.
fn url_prefix(url: &str, parsed: &Url) -> Result<Path> {
    Path::from_url_path(parsed.path()).map_err(|e| invalid(url, e.to_string()))
}

/// The local directory a `file://` URL or bare path names, absolute and with `.`/`..` resolved
/// lexically (the directory may not exist yet).
pub fn local_directory(url: &str, current_dir: &std::path::Path) -> Result<PathBuf> {
    let path = if url.starts_with("file:") {
        let parsed = parse_url(url)?;
        parsed
            .to_file_path()
            .map_err(|()| invalid(url, "not a local absolute path (a host is not allowed)"))?
    } else {
        PathBuf::from(url)
    };
    if path.as_os_str().is_empty() {
        return Err(invalid(url, "empty path"));
    }
    let absolute = if path.is_absolute() { path } else { current_dir.join(path) };
    let mut normal = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    Ok(normal)
}

/// A local directory is the store root, created if missing so that writes work at once; the
/// prefix is empty.
fn open_local(url: &str) -> Result<Arc<dyn ObjectStore>> {
    let current_dir =
        std::env::current_dir().map_err(|e| invalid(url, format!("no current directory: {e}")))?;
    let directory = local_directory(url, &current_dir)?;
    std::fs::create_dir_all(&directory)
        .map_err(|source| Error::LocalDirectory { path: directory.clone(), source })?;
    if !directory.is_dir() {
        return Err(invalid(url, "not a directory (a location names a directory of objects)"));
    }
    let store = LocalFileSystem::new_with_prefix(&directory).map_err(|e| build_error(url, e))?;
    Ok(Arc::new(store))
}

/// Process-global in-memory stores by name, so two opens of `memory://NAME` share objects
/// (tests, and in-process pipelines handing data from a writer to a reader).
fn memory_registry() -> &'static Mutex<HashMap<String, Arc<InMemory>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

fn open_memory(url: &str) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let parsed = parse_url(url)?;
    let name = parsed.host_str().unwrap_or_default().to_string();
    let prefix = url_prefix(url, &parsed)?;
    // A poisoned lock only means another thread panicked while inserting; the map is intact.
    let mut registry = memory_registry().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let store = registry.entry(name).or_insert_with(|| Arc::new(InMemory::new())).clone();
    Ok((store, prefix))
}

/// Drop the in-memory store `name` from the registry; the next open starts empty.
pub fn forget_memory_store(name: &str) -> bool {
    let mut registry = memory_registry().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    registry.remove(name).is_some()
}

fn bucket_of(url: &str, parsed: &Url) -> Result<()> {
    match parsed.host_str() {
        Some(host) if !host.is_empty() => Ok(()),
        _ => Err(invalid(url, "no bucket or container after the scheme")),
    }
}

/// Feed `prefix`-named environment variables to a builder, as object_store's `from_env` does,
/// but from [`Environment`] so tests need not touch the process environment.
fn env_config<K: std::str::FromStr>(env: &Environment, prefix: &str) -> Vec<(K, String)> {
    env.vars()
        .into_iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .filter_map(|(name, value)| Some((name.to_ascii_lowercase().parse::<K>().ok()?, value)))
        .collect()
}

fn user_config<K: std::str::FromStr>(options: &StoreOptions) -> Result<Vec<(K, String)>> {
    options
        .config
        .iter()
        .map(|(name, value)| {
            let key = name.to_ascii_lowercase().parse::<K>().map_err(|_| Error::InvalidOption {
                name: name.clone(),
                reason: "not an object_store configuration key for this scheme".into(),
            })?;
            Ok((key, value.clone()))
        })
        .collect()
}

/// A plain `http://` endpoint without `allow_http` would fail on first use with reqwest's bare
/// "builder error"; say what to set instead, at open time.
fn check_plain_http(endpoint: Option<String>, allow_http: Option<String>, variable: &str) -> Result<()> {
    match endpoint {
        Some(endpoint) if endpoint.starts_with("http://") && !allow_http.is_some_and(|v| is_truthy(&v)) => {
            Err(Error::InvalidOption {
                name: "allow_http".into(),
                reason: format!(
                    "endpoint {endpoint} is plain HTTP; set allow_http (or {variable}=true) to use it"
                ),
            })
        }
        _ => Ok(()),
    }
}

fn open_s3(url: &str, options: &StoreOptions) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let parsed = parse_url(url)?;
    bucket_of(url, &parsed)?;
    let mut builder = AmazonS3Builder::new();
    for (key, value) in env_config::<AmazonS3ConfigKey>(&options.environment, "AWS_") {
        builder = builder.with_config(key, value);
    }
    for (key, value) in user_config::<AmazonS3ConfigKey>(options)? {
        builder = builder.with_config(key, value);
    }
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(region) = &options.region {
        builder = builder.with_region(region);
    }
    if let Some(allow_http) = options.allow_http {
        builder = builder.with_allow_http(allow_http);
    }
    check_s3_credentials(url, &builder, options)?;
    check_plain_http(
        builder.get_config_value(&AmazonS3ConfigKey::Endpoint),
        builder.get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)),
        "AWS_ALLOW_HTTP",
    )?;
    let store =
        builder.with_url(url).with_retry(options.retry_config()?).build().map_err(|e| build_error(url, e))?;
    Ok((Arc::new(store), url_prefix(url, &parsed)?))
}

fn check_s3_credentials(url: &str, builder: &AmazonS3Builder, options: &StoreOptions) -> Result<()> {
    let has = |key: AmazonS3ConfigKey| builder.get_config_value(&key).is_some_and(|v| !v.is_empty());
    let flag = |key: AmazonS3ConfigKey| builder.get_config_value(&key).is_some_and(|v| is_truthy(&v));
    let missing = |hint: &str| Err(Error::MissingCredentials { url: redact(url), hint: hint.to_string() });
    match (has(AmazonS3ConfigKey::AccessKeyId), has(AmazonS3ConfigKey::SecretAccessKey)) {
        (true, true) => return Ok(()),
        (true, false) => return missing("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"),
        (false, true) => return missing("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not"),
        (false, false) => {}
    }
    let web_identity = has(AmazonS3ConfigKey::WebIdentityTokenFile) && has(AmazonS3ConfigKey::RoleArn);
    let container = has(AmazonS3ConfigKey::ContainerCredentialsRelativeUri)
        || has(AmazonS3ConfigKey::ContainerCredentialsFullUri);
    if web_identity || container || flag(AmazonS3ConfigKey::SkipSignature) || options.ambient_credentials {
        return Ok(());
    }
    missing(
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN, \
         or AWS_SKIP_SIGNATURE=true for public buckets), or enable ambient_credentials on EC2",
    )
}

fn open_gcs(url: &str, options: &StoreOptions) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let parsed = parse_url(url)?;
    bucket_of(url, &parsed)?;
    let mut builder = GoogleCloudStorageBuilder::new();
    // object_store's from_env also honours a bare SERVICE_ACCOUNT variable.
    if let Some(path) = options.environment.var("SERVICE_ACCOUNT") {
        builder = builder.with_config(GoogleConfigKey::ServiceAccount, path);
    }
    for (key, value) in env_config::<GoogleConfigKey>(&options.environment, "GOOGLE_") {
        builder = builder.with_config(key, value);
    }
    for (key, value) in user_config::<GoogleConfigKey>(options)? {
        builder = builder.with_config(key, value);
    }
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_config(GoogleConfigKey::BaseUrl, endpoint);
    }
    if let Some(allow_http) = options.allow_http {
        builder =
            builder.with_config(GoogleConfigKey::Client(ClientConfigKey::AllowHttp), allow_http.to_string());
    }
    check_gcs_credentials(url, &builder, options)?;
    check_plain_http(
        builder.get_config_value(&GoogleConfigKey::BaseUrl),
        builder.get_config_value(&GoogleConfigKey::Client(ClientConfigKey::AllowHttp)),
        "GOOGLE_ALLOW_HTTP",
    )?;
    let store =
        builder.with_url(url).with_retry(options.retry_config()?).build().map_err(|e| build_error(url, e))?;
    Ok((Arc::new(store), url_prefix(url, &parsed)?))
}

fn check_gcs_credentials(
    url: &str,
    builder: &GoogleCloudStorageBuilder,
    options: &StoreOptions,
) -> Result<()> {
    let has = |key: GoogleConfigKey| builder.get_config_value(&key).is_some_and(|v| !v.is_empty());
    let explicit = has(GoogleConfigKey::ServiceAccount)
        || has(GoogleConfigKey::ServiceAccountKey)
        || has(GoogleConfigKey::ApplicationCredentials)
        || builder.get_config_value(&GoogleConfigKey::SkipSignature).is_some_and(|v| is_truthy(&v));
    // `gcloud auth application-default login` writes this file; object_store reads it.
    let gcloud_default = options
        .environment
        .var("HOME")
        .map(|home| PathBuf::from(home).join(".config/gcloud/application_default_credentials.json"))
        .is_some_and(|path| path.is_file());
    if explicit || gcloud_default || options.ambient_credentials {
        return Ok(());
    }
    Err(Error::MissingCredentials {
        url: redact(url),
        hint:
            "set GOOGLE_APPLICATION_CREDENTIALS or GOOGLE_SERVICE_ACCOUNT (a service account JSON file) or \
               GOOGLE_SERVICE_ACCOUNT_KEY, run `gcloud auth application-default login`, or enable \
               ambient_credentials on GCE"
                .to_string(),
    })
}

fn open_azure(url: &str, options: &StoreOptions) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let parsed = parse_url(url)?;
    bucket_of(url, &parsed)?;
    let mut builder = MicrosoftAzureBuilder::new();
    for (key, value) in env_config::<AzureConfigKey>(&options.environment, "AZURE_") {
        builder = builder.with_config(key, value);
    }
    if let Some(endpoint) = options.environment.var("MSI_ENDPOINT") {
        builder = builder.with_config(AzureConfigKey::MsiEndpoint, endpoint);
    }
    for (key, value) in user_config::<AzureConfigKey>(options)? {
        builder = builder.with_config(key, value);
    }
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    if let Some(allow_http) = options.allow_http {
        builder = builder.with_allow_http(allow_http);
    }
    check_azure_credentials(url, &builder, options)?;
    check_plain_http(
        builder.get_config_value(&AzureConfigKey::Endpoint),
        builder.get_config_value(&AzureConfigKey::Client(ClientConfigKey::AllowHttp)),
        "AZURE_ALLOW_HTTP",
    )?;
    let store =
        builder.with_url(url).with_retry(options.retry_config()?).build().map_err(|e| build_error(url, e))?;
    Ok((Arc::new(store), url_prefix(url, &parsed)?))
}

fn check_azure_credentials(url: &str, builder: &MicrosoftAzureBuilder, options: &StoreOptions) -> Result<()> {
    let has = |key: AzureConfigKey| builder.get_config_value(&key).is_some_and(|v| !v.is_empty());
    let flag = |key: AzureConfigKey| builder.get_config_value(&key).is_some_and(|v| is_truthy(&v));
    let service_principal = has(AzureConfigKey::ClientId)
        && (has(AzureConfigKey::ClientSecret) || has(AzureConfigKey::FederatedTokenFile));
    let present = has(AzureConfigKey::AccessKey)
        || has(AzureConfigKey::SasKey)
        || has(AzureConfigKey::Token)
        || service_principal
        || has(AzureConfigKey::MsiEndpoint)
        || flag(AzureConfigKey::UseEmulator)
        || flag(AzureConfigKey::UseAzureCli)
        || flag(AzureConfigKey::SkipSignature);
    if present || options.ambient_credentials {
        return Ok(());
    }
    Err(Error::MissingCredentials {
        url: redact(url),
        hint:
            "set AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_TOKEN, or \
               AZURE_CLIENT_ID/AZURE_CLIENT_SECRET/AZURE_TENANT_ID), AZURE_USE_AZURE_CLI=true, or enable \
               ambient_credentials for a managed identity"
                .to_string(),
    })
}

/// `http(s)://` is read-only: the store is rooted at the URL (prefix empty) and wrapped so
/// that writes fail with [`Error::ReadOnly`] before any request is sent.
fn open_http(url: &str, options: &StoreOptions) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let parsed = parse_url(url)?;
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid(url, "no host"));
    }
    let mut builder = HttpBuilder::new().with_url(url).with_retry(options.retry_config()?);
    if let Some(allow_http) = options.allow_http {
        builder = builder.with_config(ClientConfigKey::AllowHttp, allow_http.to_string());
    } else if parsed.scheme() == "http" {
        // The URL itself asks for plain HTTP and no credentials are sent to a read-only source.
        builder = builder.with_config(ClientConfigKey::AllowHttp, "true");
    }
    let store = builder.build().map_err(|e| build_error(url, e))?;
    Ok((Arc::new(ReadOnlyStore::new(store, redact(url))), Path::default()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn with_env(vars: &[(&str, &str)]) -> StoreOptions {
        let vars: BTreeMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        StoreOptions { environment: Environment::Vars(vars), ..Default::default() }
    }

    const AWS_KEYS: [(&str, &str); 2] = [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")];

    #[test]
    fn schemes_are_recognised() {
        assert_eq!(Scheme::of("s3://b/k").unwrap(), Scheme::S3);
        assert_eq!(Scheme::of("s3a://b/k").unwrap(), Scheme::S3);
        assert_eq!(Scheme::of("gs://b/k").unwrap(), Scheme::Gcs);
        assert_eq!(Scheme::of("az://c/k").unwrap(), Scheme::Azure);
        assert_eq!(Scheme::of("abfss://c@a.dfs.core.windows.net/k").unwrap(), Scheme::Azure);
        assert_eq!(Scheme::of("https://example.com/d").unwrap(), Scheme::Http);
        assert_eq!(Scheme::of("memory://x").unwrap(), Scheme::Memory);
        assert_eq!(Scheme::of("file:///a").unwrap(), Scheme::File);
        assert_eq!(Scheme::of("/a/b").unwrap(), Scheme::File);
        assert_eq!(Scheme::of("a/b").unwrap(), Scheme::File);
    }

    #[test]
    fn unknown_scheme_names_url_and_scheme() {
        let err = open("ftp://host/data").unwrap_err();
        assert!(matches!(&err, Error::UnknownScheme { scheme, .. } if scheme == "ftp"), "{err:?}");
        assert_eq!(
            err.to_string(),
            "unknown storage scheme 'ftp' in 'ftp://host/data' (expected file, memory, s3, gs, az, abfs(s), \
             http or https)"
        );
        assert!(err.is_bad_input());
    }

    #[test]
    fn s3_url_gives_bucket_store_and_key_prefix() {
        let location = open_with("s3://my-bucket/datasets/fmnist/", &with_env(&AWS_KEYS)).unwrap();
        assert_eq!(location.scheme, Scheme::S3);
        assert_eq!(location.prefix.as_ref(), "datasets/fmnist");
        assert_eq!(location.store.to_string(), "AmazonS3(my-bucket)");
        assert_eq!(
            location.path("part-00000.parquet").unwrap().as_ref(),
            "datasets/fmnist/part-00000.parquet"
        );
        assert!(!location.is_read_only());

        let root = open_with("s3://my-bucket", &with_env(&AWS_KEYS)).unwrap();
        assert_eq!(root.prefix.as_ref(), "");
        assert_eq!(root.path("a/b").unwrap().as_ref(), "a/b");
    }

    #[test]
    fn s3_prefix_is_percent_decoded() {
        let location = open_with("s3://b/my%20data/x", &with_env(&AWS_KEYS)).unwrap();
        assert_eq!(
            location.prefix.parts().map(|p| p.as_ref().to_string()).collect::<Vec<_>>(),
            ["my data", "x"]
        );
    }

    #[test]
    fn s3_without_bucket_is_invalid() {
        let err = open_with("s3:///key", &with_env(&AWS_KEYS)).unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }), "{err:?}");
        assert!(err.to_string().contains("s3:///key"), "{err}");
    }

    #[test]
    fn s3_without_credentials_says_which_variables_to_set() {
        let err = open_with("s3://bucket/x", &with_env(&[("AWS_REGION", "eu-west-1")])).unwrap_err();
        assert!(matches!(&err, Error::MissingCredentials { url, .. } if url == "s3://bucket/x"), "{err:?}");
        let message = err.to_string();
        assert!(
            message.starts_with("no credentials for 's3://bucket/x': set AWS_ACCESS_KEY_ID"),
            "{message}"
        );
        assert!(!message.contains('\n'));

        let err = open_with("s3://bucket/x", &with_env(&[("AWS_ACCESS_KEY_ID", "k")])).unwrap_err();
        assert!(err.to_string().contains("AWS_SECRET_ACCESS_KEY is not"), "{err}");
    }

    #[test]
    fn s3_credentials_may_come_from_options_or_other_sources() {
        let mut options = with_env(&[]);
        options.config.insert("aws_access_key_id".into(), "k".into());
        options.config.insert("aws_secret_access_key".into(), "s".into());
        assert!(open_with("s3://bucket/x", &options).is_ok());

        assert!(open_with("s3://bucket/x", &with_env(&[("AWS_SKIP_SIGNATURE", "true")])).is_ok());
        let web_identity =
            [("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/token"), ("AWS_ROLE_ARN", "arn:aws:iam::1:role/r")];
        assert!(open_with("s3://bucket/x", &with_env(&web_identity)).is_ok());
        let ambient = StoreOptions { ambient_credentials: true, ..with_env(&[]) };
        assert!(open_with("s3://bucket/x", &ambient).is_ok());
    }

    #[test]
    fn plain_http_endpoint_needs_allow_http() {
        let mut options = with_env(&AWS_KEYS);
        options.endpoint = Some("http://127.0.0.1:9000".into());
        let err = open_with("s3://bucket/x", &options).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid store option allow_http: endpoint http://127.0.0.1:9000 is plain HTTP; set allow_http (or \
             AWS_ALLOW_HTTP=true) to use it"
        );
        options.allow_http = Some(true);
        assert!(open_with("s3://bucket/x", &options).is_ok());
        let env = [AWS_KEYS[0], AWS_KEYS[1], ("AWS_ENDPOINT_URL", "http://h:1"), ("AWS_ALLOW_HTTP", "true")];
        assert!(open_with("s3://bucket/x", &with_env(&env)).is_ok());
    }

    #[test]
    fn unknown_config_key_is_an_invalid_option() {
        let mut options = with_env(&AWS_KEYS);
        options.config.insert("aws_no_such_thing".into(), "1".into());
        let err = open_with("s3://bucket/x", &options).unwrap_err();
        assert!(matches!(&err, Error::InvalidOption { name, .. } if name == "aws_no_such_thing"), "{err:?}");
    }

    #[test]
    fn gcs_url_and_missing_credentials() {
        let location = open_with("gs://bucket/a/b", &with_env(&[("GOOGLE_SKIP_SIGNATURE", "true")])).unwrap();
        assert_eq!(location.scheme, Scheme::Gcs);
        assert_eq!(location.prefix.as_ref(), "a/b");
        assert_eq!(location.store.to_string(), "GoogleCloudStorage(bucket)");

        let err = open_with("gs://bucket/a", &with_env(&[("HOME", "/nonexistent")])).unwrap_err();
        assert!(matches!(err, Error::MissingCredentials { .. }), "{err:?}");
        assert!(err.to_string().contains("GOOGLE_APPLICATION_CREDENTIALS"), "{err}");
    }

    #[test]
    fn azure_url_forms_and_missing_credentials() {
        let env = [("AZURE_STORAGE_ACCOUNT_NAME", "acct"), ("AZURE_SKIP_SIGNATURE", "true")];
        let location = open_with("az://container/a/b", &with_env(&env)).unwrap();
        assert_eq!(location.scheme, Scheme::Azure);
        assert_eq!(location.prefix.as_ref(), "a/b");
        assert_eq!(location.store.to_string(), "MicrosoftAzure { account: acct, container: container }");

        let location = open_with(
            "abfss://container@acct2.dfs.core.windows.net/x/y",
            &with_env(&[("AZURE_SKIP_SIGNATURE", "true")]),
        )
        .unwrap();
        assert_eq!(location.prefix.as_ref(), "x/y");
        assert_eq!(location.store.to_string(), "MicrosoftAzure { account: acct2, container: container }");

        let err =
            open_with("az://container/a", &with_env(&[("AZURE_STORAGE_ACCOUNT_NAME", "acct")])).unwrap_err();
        assert!(matches!(err, Error::MissingCredentials { .. }), "{err:?}");
        assert!(err.to_string().contains("AZURE_STORAGE_ACCOUNT_KEY"), "{err}");
    }

    #[test]
    fn http_is_read_only_and_rooted_at_the_url() {
        let location = open("https://example.com/datasets/fmnist").unwrap();
        assert_eq!(location.scheme, Scheme::Http);
        assert_eq!(location.prefix.as_ref(), "");
        assert!(location.is_read_only());
        assert!(matches!(open("https://").unwrap_err(), Error::InvalidUrl { .. }));
    }

    #[test]
    fn memory_stores_are_shared_by_name() {
        let first = open("memory://location-test-shared/a").unwrap();
        let second = open("memory://location-test-shared/b/c").unwrap();
        let other = open("memory://location-test-other").unwrap();
        assert_eq!(first.prefix.as_ref(), "a");
        assert_eq!(second.prefix.as_ref(), "b/c");
        assert!(Arc::ptr_eq(&first.store, &second.store));
        assert!(!Arc::ptr_eq(&first.store, &other.store));
        assert!(forget_memory_store("location-test-other"));
        assert!(!forget_memory_store("location-test-other"));
    }

    #[test]
    fn local_paths_resolve_against_the_current_directory() {
        let cwd = std::path::Path::new("/work/run");
        assert_eq!(local_directory("/a/b", cwd).unwrap(), PathBuf::from("/a/b"));
        assert_eq!(local_directory("file:///a/b/", cwd).unwrap(), PathBuf::from("/a/b"));
        assert_eq!(local_directory("file:///a/my%20dir", cwd).unwrap(), PathBuf::from("/a/my dir"));
        assert_eq!(local_directory("data/out", cwd).unwrap(), PathBuf::from("/work/run/data/out"));
        assert_eq!(local_directory("./data/../out", cwd).unwrap(), PathBuf::from("/work/run/out"));
        assert!(matches!(local_directory("file://host/a", cwd), Err(Error::InvalidUrl { .. })));
        assert!(matches!(local_directory("", cwd), Err(Error::InvalidUrl { .. })));
    }

    #[test]
    fn local_directory_is_created_and_is_the_store_root() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("nested/dataset");
        let url = format!("file://{}", target.display());
        let location = open(&url).unwrap();
        assert!(target.is_dir());
        assert_eq!(location.scheme, Scheme::File);
        assert_eq!(location.prefix.as_ref(), "");

        let bare = open(target.to_str().unwrap()).unwrap();
        assert_eq!(bare.store.to_string(), location.store.to_string());

        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let err = open(file.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. } | Error::LocalDirectory { .. }), "{err:?}");
    }

    #[test]
    fn relative_object_names_are_validated() {
        let location = open("memory://location-test-paths/root").unwrap();
        assert_eq!(location.path("step-00000010/COMMIT").unwrap().as_ref(), "root/step-00000010/COMMIT");
        let err = location.path("a//b").unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }), "{err:?}");
        assert!(location.path("../escape").is_err());
    }
}
