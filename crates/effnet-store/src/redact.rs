//! Credentials removed from URLs before a human sees them.
//!
//! A storage URL may carry its own credentials: `user:password@` before the host, a presigned
//! S3 or GCS query string (`X-Amz-Signature`, `X-Amz-Credential`, `X-Amz-Security-Token`,
//! `X-Goog-Signature`), an Azure SAS token (`sv=…&se=…&sp=…&sig=…`). Such a URL still has to
//! reach the store (and a coordinator has to deal it to workers), but every copy written for
//! people — error lines, logs, `job.json`, `state.json`, reports, the coordinator's status page
//! — goes through [`redact`] (one URL) or [`redact_text`] (a message that may quote URLs, such
//! as an `object_store` or HTTP client error).
//!
//! What is kept is what helps find a mistake: the scheme, host, path, the user name, and the
//! names of the query parameters. What is replaced by [`MASK`]:
//!
//! - the password of `user:password@`; a user without a password is itself the secret in the
//!   `https://TOKEN@host` form (as pip treats it), except in the Azure forms, where
//!   `abfss://container@account…` names a container;
//! - the value of every query parameter when any parameter carries a signature (`sig`,
//!   `signature`, `X-Amz-Signature`, `X-Goog-Signature`): the other values of a presigned URL
//!   or SAS token (expiry, permissions, credential scope) are part of the grant, and keeping
//!   none of them is simpler than arguing which are harmless;
//! - otherwise the value of any parameter whose name says it is secret (it contains
//!   `credential`, `token`, `secret`, `password`, `signature` or `key`).
//!
//! The URL is rewritten as text, not parsed and re-serialised, so everything else stays as
//! written, malformed URLs included.

use std::fmt;

/// What a secret is replaced with: plain ASCII, so it survives JSON, HTML and Markdown as is.
pub const MASK: &str = "REDACTED";

/// `url` with the credentials it carries replaced by [`MASK`]; a string without credentials
/// (a local path, a plain bucket URL) comes back unchanged.
///
/// ```
/// use effnet_store::redact;
///
/// assert_eq!(redact("http://user:password@host:9/data"), "http://user:REDACTED@host:9/data");
/// assert_eq!(
///     redact("https://b.s3.amazonaws.com/k?X-Amz-Expires=60&X-Amz-Signature=abc"),
///     "https://b.s3.amazonaws.com/k?X-Amz-Expires=REDACTED&X-Amz-Signature=REDACTED"
/// );
/// assert_eq!(redact("s3://bucket/datasets/imagenet"), "s3://bucket/datasets/imagenet");
/// assert_eq!(redact("/data/imagenet"), "/data/imagenet");
/// ```
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let scheme = &url[..scheme_end];
    let after_scheme = scheme_end + 3;
    // The authority runs to the first '/', '?' or '#'; '@' inside it ends the user information.
    let authority_end = url[after_scheme..].find(['/', '?', '#']).map_or(url.len(), |i| after_scheme + i);
    let mut redacted = String::with_capacity(url.len());
    redacted.push_str(&url[..after_scheme]);
    match url[after_scheme..authority_end].rfind('@') {
        Some(at) => {
            let user_info = &url[after_scheme..after_scheme + at];
            match user_info.split_once(':') {
                Some((user, _password)) => {
                    redacted.push_str(user);
                    redacted.push(':');
                    redacted.push_str(MASK);
                }
                None if names_container(scheme) => redacted.push_str(user_info),
                None => redacted.push_str(MASK),
            }
            redacted.push_str(&url[after_scheme + at..authority_end]);
        }
        None => redacted.push_str(&url[after_scheme..authority_end]),
    }
    let rest = &url[authority_end..];
    let Some(question) = rest.find('?') else {
        redacted.push_str(rest);
        return redacted;
    };
    let query_end = rest.find('#').filter(|&hash| hash > question).unwrap_or(rest.len());
    redacted.push_str(&rest[..=question]);
    redacted.push_str(&redact_query(&rest[question + 1..query_end]));
    redacted.push_str(&rest[query_end..]);
    redacted
}

/// `text` with every URL in it passed through [`redact`]: for messages written by other
/// libraries (object_store, the HTTP client) that quote the URL they were given. A URL ends at
/// whitespace, a quote, or a closing bracket, the ways messages delimit one.
///
/// ```
/// use effnet_store::redact_text;
///
/// assert_eq!(
///     redact_text("error sending request for url (http://u:pw@host/x): refused"),
///     "error sending request for url (http://u:REDACTED@host/x): refused"
/// );
/// ```
pub fn redact_text(text: &str) -> String {
    let mut redacted = String::with_capacity(text.len());
    let mut copied = 0;
    let mut search_from = 0;
    while let Some(found) = text[search_from..].find("://") {
        let separator = search_from + found;
        // The scheme: letters, digits, '+', '-', '.' back from "://", starting with a letter.
        let scheme_start = text[..separator]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let end = text[separator..].find(ends_url).map_or(text.len(), |i| separator + i);
        let starts_with_letter = text[scheme_start..].starts_with(|c: char| c.is_ascii_alphabetic());
        if scheme_start < separator && starts_with_letter {
            redacted.push_str(&text[copied..scheme_start]);
            redacted.push_str(&redact(&text[scheme_start..end]));
            copied = end;
        }
        search_from = end.max(separator + 3);
    }
    redacted.push_str(&text[copied..]);
    redacted
}

/// Displays a URL redacted, for format strings and tracing fields without an allocation at the
/// call site: `tracing::info!(url = %Redacted(&url), "opened")`.
///
/// ```
/// use effnet_store::Redacted;
///
/// assert_eq!(format!("opening {}", Redacted("s3://b/k?token=t")), "opening s3://b/k?token=REDACTED");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Redacted<'a>(pub &'a str);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(self.0))
    }
}

/// Every string in a JSON document passed through [`redact_text`]: for records written from a
/// job spec (`job.json`, a checkpoint's `state.json`, API listings), so every URL field is covered,
/// including ones added to the spec later.
///
/// ```
/// let mut spec = serde_json::json!({ "data": { "train": "http://u:pw@h/d", "batch_size": 8 } });
/// effnet_store::redact_json(&mut spec);
/// assert_eq!(spec["data"]["train"], "http://u:REDACTED@h/d");
/// assert_eq!(spec["data"]["batch_size"], 8);
/// ```
pub fn redact_json(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(text) => {
            if text.contains("://") {
                *text = redact_text(text);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_json),
        serde_json::Value::Object(entries) => entries.values_mut().for_each(redact_json),
        serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => {}
    }
}

/// `value` serialised to JSON with [`redact_json`] applied.
pub fn redacted_json<T: serde::Serialize + ?Sized>(value: &T) -> serde_json::Result<serde_json::Value> {
    let mut json = serde_json::to_value(value)?;
    redact_json(&mut json);
    Ok(json)
}

/// True for the Azure forms whose `name@` before the host is a container, not a credential.
fn names_container(scheme: &str) -> bool {
    ["abfs", "abfss", "az", "wasb", "wasbs"].iter().any(|azure| scheme.eq_ignore_ascii_case(azure))
}

fn ends_url(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>' | ')' | ']' | '}' | '\\')
}

/// The query string `a=1&b=2` with the secret values masked (see the module documentation).
fn redact_query(query: &str) -> String {
    let mut names = query.split(['&', ';']).map(|pair| pair.split_once('=').map_or(pair, |(name, _)| name));
    let signed = names.any(|name| {
        let name = name.to_ascii_lowercase();
        name == "sig" || name.ends_with("signature")
    });
    let mut redacted = String::with_capacity(query.len());
    let mut rest = query;
    loop {
        let (pair, separator, tail) = match rest.find(['&', ';']) {
            Some(i) => (&rest[..i], &rest[i..=i], &rest[i + 1..]),
            None => (rest, "", ""),
        };
        match pair.split_once('=') {
            Some((name, value)) if !value.is_empty() && (signed || secret_name(name)) => {
                redacted.push_str(name);
                redacted.push('=');
                redacted.push_str(MASK);
            }
            _ => redacted.push_str(pair),
        }
        redacted.push_str(separator);
        if separator.is_empty() {
            return redacted;
        }
        rest = tail;
    }
}

fn secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name == "sig"
        || ["credential", "token", "secret", "password", "signature", "key"]
            .iter()
            .any(|word| name.contains(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_masked_and_user_kept() {
        assert_eq!(redact("http://user:password@127.0.0.1:9/data"), "http://user:REDACTED@127.0.0.1:9/data");
        assert_eq!(redact("https://user:@host/"), "https://user:REDACTED@host/");
        // A password containing '@' (should have been escaped, often is not): the last '@' of the
        // authority ends the user information, so none of the password survives.
        assert_eq!(redact("http://u:p@ss@host/x"), "http://u:REDACTED@host/x");
    }

    #[test]
    fn a_lone_user_is_a_token_except_for_azure_containers() {
        assert_eq!(redact("https://ghp_secret@host/repo"), "https://REDACTED@host/repo");
        assert_eq!(
            redact("abfss://container@account.dfs.core.windows.net/prefix"),
            "abfss://container@account.dfs.core.windows.net/prefix"
        );
    }

    #[test]
    fn an_at_sign_in_the_path_is_not_user_information() {
        assert_eq!(redact("s3://bucket/people/a@b.com/x"), "s3://bucket/people/a@b.com/x");
    }

    #[test]
    fn presigned_s3_masks_every_value_and_keeps_names() {
        let url = "https://bucket.s3.amazonaws.com/val?X-Amz-Algorithm=AWS4-HMAC-SHA256\
                   &X-Amz-Credential=AKIAFAKE%2F20260101&X-Amz-Date=20260101T000000Z&X-Amz-Expires=60\
                   &X-Amz-Security-Token=tokensecret&X-Amz-SignedHeaders=host&X-Amz-Signature=deadbeef";
        let redacted = redact(url);
        for secret in ["AKIAFAKE", "tokensecret", "deadbeef", "AWS4-HMAC"] {
            assert!(!redacted.contains(secret), "{secret} in {redacted}");
        }
        assert!(
            redacted.starts_with("https://bucket.s3.amazonaws.com/val?X-Amz-Algorithm=REDACTED&"),
            "{redacted}"
        );
        assert!(redacted.ends_with("&X-Amz-Signature=REDACTED"), "{redacted}");
    }

    #[test]
    fn azure_sas_and_gcs_signed_urls() {
        assert_eq!(
            redact("https://acct.blob.core.windows.net/c/d?sv=2022-11-02&se=2026-01-01&sp=rl&sig=abc%3D"),
            "https://acct.blob.core.windows.net/c/d?sv=REDACTED&se=REDACTED&sp=REDACTED&sig=REDACTED"
        );
        assert_eq!(
            redact("https://storage.googleapis.com/b/o?X-Goog-Credential=sa%40p&X-Goog-Signature=f00d"),
            "https://storage.googleapis.com/b/o?X-Goog-Credential=REDACTED&X-Goog-Signature=REDACTED"
        );
    }

    #[test]
    fn unsigned_queries_keep_harmless_values() {
        assert_eq!(redact("http://h/d?version=2&token=abc"), "http://h/d?version=2&token=REDACTED");
        assert_eq!(redact("http://h/d?api_key=abc#part"), "http://h/d?api_key=REDACTED#part");
        assert_eq!(redact("http://h/d?flag&empty="), "http://h/d?flag&empty=");
    }

    #[test]
    fn text_without_credentials_is_unchanged() {
        for text in ["", "plain words", "/abs/path", "memory://docs/x", "a :// b", "1://x", "://x"] {
            assert_eq!(redact_text(text), text);
            assert_eq!(redact(text), text);
        }
    }

    #[test]
    fn every_url_in_a_message_is_redacted() {
        let message = "cannot open dataset http://u:pw1@h/d: Error performing GET http://u:pw1@h/d/_manifest.json \
                       in 3ms - HTTP error: error sending request for url (http://u:pw1@h/d/_manifest.json); \
                       also \"s3://b/k?X-Amz-Signature=sig2\" and 'gs://b/o?X-Goog-Signature=sig3'";
        let redacted = redact_text(message);
        for secret in ["pw1", "sig2", "sig3"] {
            assert!(!redacted.contains(secret), "{secret} in {redacted}");
        }
        assert!(redacted.contains("(http://u:REDACTED@h/d/_manifest.json);"), "{redacted}");
        assert!(redacted.contains("\"s3://b/k?X-Amz-Signature=REDACTED\""), "{redacted}");
    }

    #[test]
    fn redacting_twice_changes_nothing_more() {
        let once = redact_text("x http://u:p@h/?sig=1&sv=2 y");
        assert_eq!(redact_text(&once), once);
    }
}
