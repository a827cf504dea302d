//! The agent's secrets (its API tokens, etcd's password): read from files,
//! kept out of reach of the tasks it runs.
//!
//! * `--token-file`, `--read-token-file` and `--etcd-password-file` read a
//!   secret from a file (its first line). That is the way to pass them: a
//!   command line is readable by every user of the machine (`ps`).
//! * Secrets read from the environment (`ERETES_TOKEN`, `ERETES_READ_TOKEN`,
//!   `ERETES_ETCD_PASSWORD`) are removed from it before anything else
//!   starts, so no child inherits them.
//! * The agent makes itself non-dumpable, so that other processes of its
//!   user — the tasks it runs among them — can neither read its memory nor
//!   its `/proc` entries (`environ`, where the original environment stays).

use std::path::Path;

use anyhow::{bail, Context, Result};

/// The variables that may carry the agent's secrets.
pub const SECRET_VARIABLES: [&str; 3] =
    ["ERETES_TOKEN", "ERETES_READ_TOKEN", "ERETES_ETCD_PASSWORD"];

/// Stands for a secret variable whose value was not UTF-8.
const NOT_UTF8: &str = "\u{0}not-utf-8";

/// Longest secret file accepted.
const MAX_SECRET_BYTES: u64 = 4096;

/// The secret in `path`: its first line, without the line end. `flag` names
/// the option in errors.
pub fn read_secret_file(path: &Path, flag: &str) -> Result<String> {
    let metadata = std::fs::metadata(path).with_context(|| format!("{flag} {}", path.display()))?;
    if !metadata.is_file() {
        bail!("{flag} {} is not a file", path.display());
    }
    if metadata.len() > MAX_SECRET_BYTES {
        bail!(
            "{flag} {} has {} bytes; a secret file holds one line of at most {MAX_SECRET_BYTES}",
            path.display(),
            metadata.len()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{flag} {} (a secret file is UTF-8 text)", path.display()))?;
    let secret = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if secret.trim().is_empty() {
        bail!("{flag} {} is empty", path.display());
    }
    if std::os::unix::fs::PermissionsExt::mode(&metadata.permissions()) & 0o077 != 0 {
        tracing::warn!(file = %path.display(), "{flag}: the file is readable by other users; chmod 600 it");
    }
    Ok(secret.to_string())
}

/// The secrets in this process's environment, removed from it; then make
/// the process non-dumpable. Call first thing in `main`, while the process
/// has one thread (changing the environment is not thread-safe).
pub fn take_from_environment() -> Vec<(&'static str, String)> {
    let mut taken = Vec::new();
    for name in SECRET_VARIABLES {
        if let Some(value) = std::env::var_os(name) {
            // A value that is not UTF-8 is kept as a marker that `resolve`
            // refuses, rather than dropped (an agent must not start open
            // because its token was unreadable).
            let value = value.into_string().unwrap_or_else(|_| NOT_UTF8.to_string());
            taken.push((name, value));
            std::env::remove_var(name);
        }
    }
    // SAFETY: prctl(PR_SET_DUMPABLE) takes plain integers.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    taken
}

/// The value `take_from_environment` took for `variable`, if any.
pub fn taken(taken: &[(&'static str, String)], variable: &str) -> Option<String> {
    taken
        .iter()
        .find(|(name, _)| *name == variable)
        .map(|(_, value)| value.clone())
}

/// A secret given on the command line (`value`), else in the environment
/// (`variable`, as taken), or in a file; a value and a file are refused
/// together.
pub fn resolve(
    value: Option<String>,
    file: Option<&Path>,
    variable: &str,
    taken_secrets: &[(&'static str, String)],
    flag: &str,
) -> Result<Option<String>> {
    let on_command_line = value.is_some();
    let value = value.or_else(|| taken(taken_secrets, variable));
    match value.as_deref() {
        Some(NOT_UTF8) => bail!("{variable} is not UTF-8 text"),
        Some(value) if value.trim().is_empty() => bail!("{flag} (or {variable}) is empty"),
        _ => {}
    }
    match (value, file) {
        (Some(_), Some(_)) => bail!("give {flag} or {flag}-file, not both"),
        (Some(value), None) => {
            if on_command_line {
                tracing::warn!("{flag} on the command line is visible to every user of this machine (ps); use {flag}-file");
            }
            Ok(Some(value))
        }
        (None, Some(file)) => read_secret_file(file, &format!("{flag}-file")).map(Some),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_gives_its_first_line_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, "s3cret\nignored\n").unwrap();
        assert_eq!(read_secret_file(&good, "--token-file").unwrap(), "s3cret");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let huge = dir.path().join("huge");
        std::fs::write(&huge, "x".repeat(5000)).unwrap();
        for (path, expected) in [
            (empty.as_path(), "is empty"),
            (huge.as_path(), "at most 4096"),
            (dir.path(), "is not a file"),
            (
                Path::new("/nonexistent/token"),
                "--token-file /nonexistent/token",
            ),
        ] {
            let error = format!("{:#}", read_secret_file(path, "--token-file").unwrap_err());
            assert!(error.contains(expected), "{error}");
        }
        let both = resolve(
            Some("a".into()),
            Some(&good),
            "ERETES_TOKEN",
            &[],
            "--token",
        );
        assert!(format!("{:#}", both.unwrap_err()).contains("not both"));
    }
}
