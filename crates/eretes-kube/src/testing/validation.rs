//! The API server's validation rules for what the fake stores: names,
//! labels, Jobs and ConfigMaps, with the field paths and messages the real
//! server gives, so a client sees the same 422 `Invalid` it would in a cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;

/// The largest label value (and the name part of a label key); also the
/// largest Job name, since the name becomes the pods' `job-name` label.
pub(crate) const MAX_LABEL_VALUE: usize = 63;
/// The largest DNS-1123 subdomain (most object names, label key prefixes).
const MAX_SUBDOMAIN: usize = 253;
/// The largest ConfigMap payload (etcd's value limit, as the server checks).
const MAX_CONFIGMAP_BYTES: usize = 1024 * 1024;

/// One field's validation failure, in the shape of the server's
/// `field.Error`: the field path, the `StatusCause` reason and the message.
#[derive(Debug, Clone)]
pub(crate) struct FieldErr {
    pub field: String,
    pub reason: &'static str,
    pub message: String,
}

impl FieldErr {
    /// A value that breaks a rule (`FieldValueInvalid`).
    pub(crate) fn invalid(field: impl Into<String>, value: &str, detail: &str) -> FieldErr {
        FieldErr {
            field: field.into(),
            reason: "FieldValueInvalid",
            message: format!("Invalid value: {value:?}: {detail}"),
        }
    }

    /// A missing value (`FieldValueRequired`).
    pub(crate) fn required(field: impl Into<String>, detail: &str) -> FieldErr {
        let message = if detail.is_empty() {
            "Required value".to_string()
        } else {
            format!("Required value: {detail}")
        };
        FieldErr {
            field: field.into(),
            reason: "FieldValueRequired",
            message,
        }
    }

    /// A value outside an enumeration (`FieldValueNotSupported`).
    pub(crate) fn not_supported(
        field: impl Into<String>,
        value: &str,
        supported: &[&str],
    ) -> FieldErr {
        let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        FieldErr {
            field: field.into(),
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: {value:?}: supported values: {}",
                list.join(", ")
            ),
        }
    }
}

impl std::fmt::Display for FieldErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
const QUALIFIED_NAME_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?` without the length bound.
fn dns_label_shape(s: &str) -> bool {
    let b = s.as_bytes();
    let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty() && b.iter().all(inner) && edge(&b[0]) && edge(&b[b.len() - 1])
}

/// Whether `s` is an RFC 1123 label (container names, some generated names).
pub(crate) fn is_dns1123_label(s: &str) -> bool {
    s.len() <= MAX_LABEL_VALUE && dns_label_shape(s)
}

/// Whether `s` is an RFC 1123 subdomain (object names, label key prefixes).
pub(crate) fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= MAX_SUBDOMAIN && s.split('.').all(dns_label_shape)
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`: the shape of label values
/// (when not empty) and of the name part of label keys.
fn qualified_shape(s: &str) -> bool {
    let b = s.as_bytes();
    let inner = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.');
    !b.is_empty()
        && b.iter().all(inner)
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Why `value` is not a valid label value (empty when it is).
pub(crate) fn label_value_errors(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > MAX_LABEL_VALUE {
        errs.push(format!("must be no more than {MAX_LABEL_VALUE} characters"));
    }
    if !value.is_empty() && !qualified_shape(value) {
        errs.push(LABEL_VALUE_MSG.to_string());
    }
    errs
}

/// Why `key` is not a valid label key, a "qualified name" `[prefix/]name`
/// (empty when it is).
pub(crate) fn label_key_errors(key: &str) -> Vec<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let mut errs = Vec::new();
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            errs.push("prefix part must be non-empty".to_string());
        } else if !is_dns1123_subdomain(prefix) {
            errs.push(format!("prefix part {DNS1123_SUBDOMAIN_MSG}"));
        }
    }
    if name.is_empty() {
        errs.push("name part must be non-empty".to_string());
    } else {
        if name.len() > MAX_LABEL_VALUE {
            errs.push(format!(
                "name part must be no more than {MAX_LABEL_VALUE} characters"
            ));
        }
        if !qualified_shape(name) {
            errs.push(QUALIFIED_NAME_MSG.to_string());
        }
    }
    errs
}

/// Checks a label map the way `ValidateLabels` does, under `field`.
pub(crate) fn validate_labels(
    labels: Option<&BTreeMap<String, String>>,
    field: &str,
    errs: &mut Vec<FieldErr>,
) {
    for (key, value) in labels.into_iter().flatten() {
        for e in label_key_errors(key) {
            errs.push(FieldErr::invalid(field, key, &e));
        }
        for e in label_value_errors(value) {
            errs.push(FieldErr::invalid(field, value, &e));
        }
    }
}

/// Checks an object name as a DNS-1123 subdomain (the rule for Jobs, Pods
/// and ConfigMaps).
pub(crate) fn validate_name(name: &str, errs: &mut Vec<FieldErr>) {
    if name.is_empty() {
        errs.push(FieldErr::required(
            "metadata.name",
            "name or generateName is required",
        ));
    } else if !is_dns1123_subdomain(name) {
        errs.push(FieldErr::invalid(
            "metadata.name",
            name,
            DNS1123_SUBDOMAIN_MSG,
        ));
    }
}

/// Validates a Job after defaulting, as `ValidateJob` does for what this fake
/// understands. The template labels already carry `job-name`, so a name
/// longer than 63 characters fails there, as in a real cluster.
pub(crate) fn validate_job(job: &Job) -> Vec<FieldErr> {
    let mut errs = Vec::new();
    let name = job.metadata.name.as_deref().unwrap_or("");
    validate_name(name, &mut errs);
    validate_labels(job.metadata.labels.as_ref(), "metadata.labels", &mut errs);
    let spec = &job.spec.as_ref().cloned().unwrap_or_default();
    for (field, value) in [
        ("spec.activeDeadlineSeconds", spec.active_deadline_seconds),
        ("spec.backoffLimit", spec.backoff_limit.map(i64::from)),
        (
            "spec.ttlSecondsAfterFinished",
            spec.ttl_seconds_after_finished.map(i64::from),
        ),
        ("spec.completions", spec.completions.map(i64::from)),
        ("spec.parallelism", spec.parallelism.map(i64::from)),
    ] {
        if let Some(v) = value.filter(|v| *v < 0) {
            errs.push(FieldErr::invalid(
                field,
                &v.to_string(),
                "must be greater than or equal to 0",
            ));
        }
    }
    let template = &spec.template;
    let template_labels = template.metadata.as_ref().and_then(|m| m.labels.as_ref());
    validate_labels(template_labels, "spec.template.labels", &mut errs);
    let pod_spec = template.spec.clone().unwrap_or_default();
    let restart = pod_spec.restart_policy.as_deref().unwrap_or("Always");
    if restart != "Never" && restart != "OnFailure" {
        errs.push(FieldErr::not_supported(
            "spec.template.spec.restartPolicy",
            restart,
            &["OnFailure", "Never"],
        ));
    }
    if pod_spec.containers.is_empty() {
        errs.push(FieldErr::required("spec.template.spec.containers", ""));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, c) in pod_spec.containers.iter().enumerate() {
        let field = format!("spec.template.spec.containers[{i}]");
        if c.name.is_empty() {
            errs.push(FieldErr::required(format!("{field}.name"), ""));
        } else if !is_dns1123_label(&c.name) {
            errs.push(FieldErr::invalid(
                format!("{field}.name"),
                &c.name,
                DNS1123_LABEL_MSG,
            ));
        } else if !seen.insert(c.name.clone()) {
            errs.push(FieldErr {
                field: format!("{field}.name"),
                reason: "FieldValueDuplicate",
                message: format!("Duplicate value: {:?}", c.name),
            });
        }
        if c.image.as_deref().unwrap_or("").trim().is_empty() {
            errs.push(FieldErr::required(format!("{field}.image"), ""));
        }
    }
    if let Some(g) = pod_spec.termination_grace_period_seconds.filter(|g| *g < 0) {
        errs.push(FieldErr::invalid(
            "spec.template.spec.terminationGracePeriodSeconds",
            &g.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    errs
}

/// Validates a ConfigMap: its name, labels, data keys, and total size.
pub(crate) fn validate_configmap(cm: &ConfigMap) -> Vec<FieldErr> {
    let mut errs = Vec::new();
    validate_name(cm.metadata.name.as_deref().unwrap_or(""), &mut errs);
    validate_labels(cm.metadata.labels.as_ref(), "metadata.labels", &mut errs);
    let key_ok = |k: &str| {
        !k.is_empty()
            && k.len() <= MAX_SUBDOMAIN
            && k.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && k != "."
            && k != ".."
    };
    let mut total = 0usize;
    for (k, v) in cm.data.iter().flatten() {
        if !key_ok(k) {
            errs.push(FieldErr::invalid(
                "data",
                k,
                "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')",
            ));
        }
        total += k.len() + v.len();
    }
    for (k, v) in cm.binary_data.iter().flatten() {
        if !key_ok(k) {
            errs.push(FieldErr::invalid(
                "binaryData",
                k,
                "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
            ));
        }
        total += k.len() + v.0.len();
    }
    if total > MAX_CONFIGMAP_BYTES {
        errs.push(FieldErr {
            field: String::new(),
            reason: "FieldValueTooLong",
            message: format!("Too long: must have at most {MAX_CONFIGMAP_BYTES} bytes"),
        });
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_rules() {
        assert!(label_value_errors("").is_empty());
        assert!(label_value_errors("a.b_c-D9").is_empty());
        assert!(!label_value_errors("-a").is_empty());
        assert!(!label_value_errors(&"a".repeat(64)).is_empty());
        assert!(label_key_errors("eretes.dev/task").is_empty());
        assert!(!label_key_errors("Bad_Prefix/x").is_empty());
        assert!(!label_key_errors("a/").is_empty());
        assert!(is_dns1123_subdomain("a.b-c"));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(!is_dns1123_label("a.b"));
    }
}
