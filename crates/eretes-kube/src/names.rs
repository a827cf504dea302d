//! Names and labels of a task's Jobs: deterministic from the eretes
//! namespace, the task id and the claim epoch, and valid Kubernetes names
//! whatever the task id holds (eretes ids may have `:`, `.`, `_` and capital
//! letters, and be 128 characters long; a Job name is at most 63 characters
//! of `a-z 0-9 -`, since it becomes its pods' `job-name` label).

use std::collections::BTreeMap;

use eretes_protocol::{Namespace, TaskId};

/// Longest Job name: Kubernetes copies it into a label value of its pods.
pub const MAX_JOB_NAME: usize = 63;
/// Set on every object eretes makes.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "eretes");
/// The label naming the eretes namespace (or its hash, see [`label_value`]).
pub const NAMESPACE_LABEL: &str = "eretes.io/namespace";
/// The label naming the task (or its hash, see [`label_value`]).
pub const TASK_LABEL: &str = "eretes.io/task";
/// The label holding the claim epoch that made the Job.
pub const EPOCH_LABEL: &str = "eretes.io/epoch";
/// The annotation holding the task id as it is (labels cannot).
pub const TASK_ID_ANNOTATION: &str = "eretes.io/task-id";
/// The annotation holding the node that made the Job.
pub const NODE_ANNOTATION: &str = "eretes.io/node";

/// The Job name of `task`'s run at `epoch` in `namespace`:
/// `eretes-<readable part of the id>-<epoch>-<hash>`. The hash (of the
/// namespace, the id and the epoch) keeps two ids that read alike apart
/// (`A` and `a`, `x:y` and `x-y`), and the readable part is cut so the
/// whole fits [`MAX_JOB_NAME`].
pub fn job_name(namespace: &Namespace, task: &TaskId, epoch: i64) -> String {
    let hash = short_hash(&[
        namespace.name().as_bytes(),
        task.as_str().as_bytes(),
        epoch.to_string().as_bytes(),
    ]);
    let tail = format!("-{epoch}-{hash}");
    let room = MAX_JOB_NAME - "eretes".len() - tail.len() - 1;
    let mut slug = String::with_capacity(room);
    for c in task.as_str().chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        // One dash for a run of them, none at the start.
        if c == '-' && (slug.is_empty() || slug.ends_with('-')) {
            continue;
        }
        if slug.len() == room {
            break;
        }
        slug.push(c);
    }
    let slug = slug.trim_end_matches('-');
    if slug.is_empty() {
        format!("eretes{tail}")
    } else {
        format!("eretes-{slug}{tail}")
    }
}

/// `value` as a label value when it is one, else `h-` and a hash of it, so
/// that the label selects exactly what it names either way.
pub fn label_value(value: &str) -> String {
    if is_label_value(value) && !value.starts_with("h-") {
        value.to_string()
    } else {
        format!("h-{}", short_hash(&[value.as_bytes()]))
    }
}

/// The labels that select every Job (and pod) eretes made for
/// `namespace`.
pub fn namespace_labels(namespace: &Namespace) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (NAMESPACE_LABEL.to_string(), label_value(namespace.name())),
    ])
}

/// The labels that select every Job (and pod) of `task` in `namespace`,
/// whatever its epoch.
pub fn task_labels(namespace: &Namespace, task: &TaskId) -> BTreeMap<String, String> {
    let mut labels = namespace_labels(namespace);
    labels.insert(TASK_LABEL.to_string(), label_value(task.as_str()));
    labels
}

/// `labels` as a label selector (`a=b,c=d`).
pub fn selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// 16 hex digits of SHA-256 over `parts`, each length-prefixed so that
/// `("ab", "c")` and `("a", "bc")` differ. Stable across builds and
/// machines, which a Job name must be.
fn short_hash(parts: &[&[u8]]) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part);
    }
    let digest = context.finish();
    digest.as_ref()[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A DNS-1123 label: 1–63 of `a-z 0-9 -`, starting and ending with a
/// letter or digit (namespaces, container names).
pub fn is_dns_label(value: &str) -> bool {
    (1..=63).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-')
}

/// A DNS-1123 subdomain: up to 253 characters of dot-separated labels
/// (service accounts, label key prefixes).
pub fn is_dns_subdomain(value: &str) -> bool {
    value.len() <= 253 && value.split('.').all(is_dns_label)
}

/// A label value: empty, or up to 63 of `A-Z a-z 0-9 - _ .` starting and
/// ending with a letter or digit.
pub fn is_label_value(value: &str) -> bool {
    value.is_empty() || is_qualified_name_part(value)
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain, the name up to
/// 63 of `A-Z a-z 0-9 - _ .` starting and ending with a letter or digit.
pub fn is_label_key(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_qualified_name_part(name),
        None => is_qualified_name_part(key),
    }
}

fn is_qualified_name_part(value: &str) -> bool {
    (1..=63).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && value.as_bytes()[0].is_ascii_alphanumeric()
        && value.as_bytes()[value.len() - 1].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ns() -> Namespace {
        Namespace::new("prod").unwrap()
    }

    #[test]
    fn names_are_deterministic_readable_and_apart() {
        let id = TaskId::new("Nightly:Backup.db_1").unwrap();
        let name = job_name(&ns(), &id, 42);
        assert_eq!(name, job_name(&ns(), &id, 42));
        assert!(name.starts_with("eretes-nightly-backup-db-1-42-"), "{name}");
        assert!(is_dns_label(&name), "{name}");
        assert_ne!(name, job_name(&ns(), &id, 43));
        assert_ne!(name, job_name(&Namespace::new("dev").unwrap(), &id, 42));
        // Ids that read alike get different names.
        let a = job_name(&ns(), &TaskId::new("a").unwrap(), 1);
        let upper = job_name(&ns(), &TaskId::new("A").unwrap(), 1);
        assert_ne!(a, upper);
    }

    #[test]
    fn long_and_odd_ids_fit() {
        let long = TaskId::new("x".repeat(128)).unwrap();
        let name = job_name(&ns(), &long, i64::MAX);
        assert!(name.len() <= MAX_JOB_NAME && is_dns_label(&name), "{name}");
        let odd = TaskId::new("::__..::").unwrap();
        let name = job_name(&ns(), &odd, 7);
        assert!(name.starts_with("eretes-7-"), "{name}");
        assert!(is_dns_label(&name), "{name}");
    }

    #[test]
    fn label_values_are_kept_or_hashed() {
        assert_eq!(label_value("backup-1"), "backup-1");
        let hashed = label_value("a:b");
        assert!(
            hashed.starts_with("h-") && is_label_value(&hashed),
            "{hashed}"
        );
        assert_ne!(
            label_value("h-x"),
            "h-x",
            "a value shaped like a hash is hashed too"
        );
        assert!(is_label_value(&label_value(&"y".repeat(100))));
    }

    proptest! {
        #[test]
        fn every_valid_id_gives_a_valid_name(id in "[A-Za-z0-9._:-]{1,128}", epoch in 0i64..i64::MAX) {
            // The only strings of these characters that are no task id.
            prop_assume!(id != "." && id != "..");
            let task = TaskId::new(id).unwrap();
            let name = job_name(&ns(), &task, epoch);
            prop_assert!(name.len() <= MAX_JOB_NAME);
            prop_assert!(is_dns_label(&name), "{}", name);
            for value in task_labels(&ns(), &task).values() {
                prop_assert!(is_label_value(value), "{}", value);
            }
        }
    }
}
