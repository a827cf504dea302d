//! What a Kubernetes task runs: its [`KubeSpec`], kept in the task's
//! properties under `"kubernetes"`, and the checks it passes at submit and
//! again before a Job is made of it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PodTemplateSpec, ResourceRequirements, Toleration};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::names::{is_dns_label, is_dns_subdomain, is_label_key, is_label_value};

/// The key of a Kubernetes task's spec in its properties.
pub const PROPERTIES_KEY: &str = "kubernetes";
/// Attempts when the spec does not say.
pub const DEFAULT_ATTEMPTS: u32 = 3;
/// Most attempts a spec may ask for: as many errors as a task's state
/// record keeps, since the error policy counts the kept errors.
pub const MAX_ATTEMPTS: u32 = eretes_protocol::machine::MAX_ERRORS_KEPT as u32;
/// Longest image reference, in bytes.
pub const MAX_IMAGE_BYTES: usize = 512;
/// Most command words and arguments together.
pub const MAX_WORDS: usize = 4096;
/// Most bytes of command words and arguments together.
pub const MAX_WORD_BYTES: usize = 256 * 1024;
/// Most environment variables.
pub const MAX_ENV: usize = 256;
/// Most bytes of environment names and values together.
pub const MAX_ENV_BYTES: usize = 32 * 1024;
/// Longest `active_deadline_seconds`: a year.
pub const MAX_DEADLINE_SECONDS: i64 = 365 * 24 * 3600;
/// Most bytes of the whole spec as JSON (the pod template included); a
/// Kubernetes object is limited to about 1.5 MB, and the spec is stored in
/// the task record too.
pub const MAX_SPEC_BYTES: usize = 256 * 1024;

/// A task run as a Kubernetes Job: one pod whose container `main` runs
/// `image` with `command` and `args`.
///
/// In a task's properties:
///
/// ```json
/// {"kubernetes": {"image": "registry.example.com/jobs/report:1.4",
///                 "command": ["report"], "args": ["--month", "2026-11"],
///                 "env": {"MODE": "full"}, "namespace": "batch",
///                 "resources": {"requests": {"cpu": "500m"}, "limits": {"memory": "1Gi"}},
///                 "service_account": "reports", "node_selector": {"pool": "batch"},
///                 "tolerations": [{"key": "batch", "operator": "Exists"}],
///                 "active_deadline_seconds": 3600, "max_attempts": 3}}
/// ```
///
/// `pod_template` is the escape hatch for everything else a pod can say
/// (volumes, sidecars, security contexts, affinity): the Job's pod starts
/// from it, and the fields above are laid over its container `main` (added
/// if absent). A Job does not checkpoint: each run starts from the image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeSpec {
    /// The container image (checked against the agent's `--allow-images`).
    pub image: String,
    /// The container's entrypoint; the image's own when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Its arguments; the image's own when both are empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Variables for the container (names of letters, digits, `_`, `-`,
    /// `.`, not `ERETES_*`, which eretes sets).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The Kubernetes namespace of the Job; the agent's
    /// `--kubernetes-namespace` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The container's requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The pod's service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The pod's node selector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// The pod's tolerations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Longest one attempt may run, in seconds (the Job's
    /// `activeDeadlineSeconds`); past it the attempt fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline_seconds: Option<i64>,
    /// The pod to start from, for what the fields above do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodTemplateSpec>,
    /// How many times a run that fails is tried, in all.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
}

fn default_attempts() -> u32 {
    DEFAULT_ATTEMPTS
}

/// Why a spec was refused; the message names the field and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid kubernetes task: {0}")]
pub struct SpecError(pub String);

impl KubeSpec {
    /// A spec for `image` with the defaults.
    pub fn new(image: impl Into<String>) -> Self {
        KubeSpec {
            image: image.into(),
            command: Vec::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
            namespace: None,
            resources: None,
            service_account: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            active_deadline_seconds: None,
            pod_template: None,
            max_attempts: DEFAULT_ATTEMPTS,
        }
    }

    /// Whether a task's properties hold a Kubernetes spec (valid or not).
    pub fn is_in(properties: &Value) -> bool {
        properties.get(PROPERTIES_KEY).is_some()
    }

    /// The spec in a task's properties (`{"kubernetes": {...}}`), checked.
    pub fn from_properties(properties: &Value) -> Result<Self, SpecError> {
        let value = properties.get(PROPERTIES_KEY).ok_or_else(|| {
            SpecError(format!(
                "the task's properties have no {PROPERTIES_KEY:?} object"
            ))
        })?;
        Self::from_value(value)
    }

    /// A spec from its JSON, refusing fields that no part of it knows —
    /// nested ones of the pod template, resources and tolerations too, so a
    /// misspelt `volumeMounts` is an error rather than silently dropped.
    pub fn from_value(value: &Value) -> Result<Self, SpecError> {
        let encoded = value.to_string();
        if encoded.len() > MAX_SPEC_BYTES {
            return Err(SpecError(format!(
                "the spec is {} bytes of JSON; the limit is {MAX_SPEC_BYTES}",
                encoded.len()
            )));
        }
        let mut unknown = Vec::new();
        let mut deserializer = serde_json::Deserializer::from_str(&encoded);
        let spec: KubeSpec =
            serde_ignored::deserialize(&mut deserializer, |path| unknown.push(path.to_string()))
                .map_err(|e| SpecError(e.to_string()))?;
        if let Some(path) = unknown.first() {
            return Err(SpecError(format!("unknown field {path:?}")));
        }
        spec.validate()?;
        Ok(spec)
    }

    /// The properties that carry this spec.
    pub fn to_properties(&self) -> Value {
        serde_json::json!({ PROPERTIES_KEY: self })
    }

    /// Check every field; the error names the first one that is wrong.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_image(&self.image)?;
        let words = self.command.len() + self.args.len();
        if words > MAX_WORDS {
            return Err(SpecError(format!(
                "command and args have {words} words; the limit is {MAX_WORDS}"
            )));
        }
        let word_bytes: usize = self.command.iter().chain(&self.args).map(String::len).sum();
        if word_bytes > MAX_WORD_BYTES {
            return Err(SpecError(format!(
                "command and args are {word_bytes} bytes; the limit is {MAX_WORD_BYTES}"
            )));
        }
        if self
            .command
            .iter()
            .chain(&self.args)
            .any(|w| w.contains('\0'))
        {
            return Err(SpecError("command or args hold a NUL byte".into()));
        }
        self.validate_env()?;
        if let Some(namespace) = &self.namespace {
            if !is_dns_label(namespace) {
                return Err(SpecError(format!(
                    "namespace {namespace:?} is not a DNS-1123 label (1-63 of a-z 0-9 -, starting and ending with a letter or digit)"
                )));
            }
        }
        if let Some(account) = &self.service_account {
            if !is_dns_subdomain(account) {
                return Err(SpecError(format!(
                    "service_account {account:?} is not a DNS-1123 subdomain"
                )));
            }
        }
        for (key, value) in &self.node_selector {
            if !is_label_key(key) {
                return Err(SpecError(format!(
                    "node_selector key {key:?} is not a label key"
                )));
            }
            if !is_label_value(value) {
                return Err(SpecError(format!(
                    "node_selector value {value:?} (of {key:?}) is not a label value"
                )));
            }
        }
        if let Some(seconds) = self.active_deadline_seconds {
            if !(1..=MAX_DEADLINE_SECONDS).contains(&seconds) {
                return Err(SpecError(format!(
                    "active_deadline_seconds {seconds} is not between 1 and {MAX_DEADLINE_SECONDS}"
                )));
            }
        }
        if !(1..=MAX_ATTEMPTS).contains(&self.max_attempts) {
            return Err(SpecError(format!(
                "max_attempts {} is not between 1 and {MAX_ATTEMPTS}",
                self.max_attempts
            )));
        }
        if let Some(template) = &self.pod_template {
            check_template(template)?;
        }
        Ok(())
    }

    fn validate_env(&self) -> Result<(), SpecError> {
        if self.env.len() > MAX_ENV {
            return Err(SpecError(format!(
                "env has {} variables; the limit is {MAX_ENV}",
                self.env.len()
            )));
        }
        let bytes: usize = self.env.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > MAX_ENV_BYTES {
            return Err(SpecError(format!(
                "env is {bytes} bytes; the limit is {MAX_ENV_BYTES}"
            )));
        }
        for name in self.env.keys() {
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !valid {
                return Err(SpecError(format!(
                    "env name {name:?} is not a variable name (letters, digits, _ - ., not starting with a digit)"
                )));
            }
            if name.starts_with("ERETES_") {
                return Err(SpecError(format!(
                    "env name {name:?}: ERETES_* variables are set by eretes"
                )));
            }
        }
        Ok(())
    }
}

/// Label keys eretes and the Job controller set: a template may not.
const RESERVED_LABEL_PREFIXES: [&str; 4] = [
    "eretes.io/",
    "batch.kubernetes.io/",
    "app.kubernetes.io/managed-by",
    "controller-uid",
];

/// What a pod template may not say: the things eretes decides (names,
/// finalizers that would keep a deleted pod, the labels its fencing selects
/// by, the restart policy, the service account, which the agent's own
/// allow list covers) and the ways out of a container's sandbox (the host's
/// namespaces and paths, privileged containers), which no image allow list
/// could make safe.
fn check_template(template: &PodTemplateSpec) -> Result<(), SpecError> {
    if let Some(meta) = &template.metadata {
        let encoded = serde_json::to_value(meta).unwrap_or_default();
        if let Some(field) = encoded
            .as_object()
            .into_iter()
            .flatten()
            .map(|(field, _)| field)
            .find(|field| !matches!(field.as_str(), "labels" | "annotations"))
        {
            return Err(SpecError(format!(
                "pod_template.metadata.{field}: only labels and annotations may be set"
            )));
        }
        for (key, value) in meta.labels.iter().flatten() {
            if !is_label_key(key) || !is_label_value(value) {
                return Err(SpecError(format!(
                    "pod_template.metadata.labels: {key:?}={value:?} is not a label"
                )));
            }
            if key == "job-name"
                || RESERVED_LABEL_PREFIXES
                    .iter()
                    .any(|prefix| key.starts_with(prefix))
            {
                return Err(SpecError(format!(
                    "pod_template.metadata.labels: {key:?} is set by eretes or Kubernetes"
                )));
            }
        }
    }
    let Some(pod) = &template.spec else {
        return Ok(());
    };
    if let Some(policy) = pod.restart_policy.as_deref().filter(|p| *p != "Never") {
        return Err(SpecError(format!(
            "pod_template.spec.restartPolicy is {policy:?}: eretes retries a task itself, so its Jobs' pods use \"Never\""
        )));
    }
    if pod.service_account_name.is_some() || pod.service_account.is_some() {
        return Err(SpecError(
            "pod_template.spec.serviceAccountName: use service_account (the agent checks it against --allow-service-accounts)".into(),
        ));
    }
    for (field, set) in [
        ("hostNetwork", pod.host_network),
        ("hostPID", pod.host_pid),
        ("hostIPC", pod.host_ipc),
    ] {
        if set == Some(true) {
            return Err(SpecError(format!(
                "pod_template.spec.{field}: a task's pod may not share the host's namespaces"
            )));
        }
    }
    if let Some(volume) = pod
        .volumes
        .iter()
        .flatten()
        .find(|volume| volume.host_path.is_some())
    {
        return Err(SpecError(format!(
            "pod_template.spec.volumes: {:?} is a hostPath; a task's pod may not mount the host's files",
            volume.name
        )));
    }
    if pod
        .ephemeral_containers
        .as_ref()
        .is_some_and(|c| !c.is_empty())
    {
        return Err(SpecError(
            "pod_template.spec.ephemeralContainers: not allowed in a Job's pod".into(),
        ));
    }
    let containers = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten());
    let mut names = std::collections::BTreeSet::new();
    for container in containers {
        if !names.insert(container.name.as_str()) {
            return Err(SpecError(format!(
                "pod_template.spec: two containers are named {:?}",
                container.name
            )));
        }
        let context = container.security_context.as_ref();
        if context.and_then(|c| c.privileged) == Some(true) {
            return Err(SpecError(format!(
                "pod_template.spec: container {:?} is privileged",
                container.name
            )));
        }
        if let Some(image) = &container.image {
            check_image(image)?;
        }
    }
    Ok(())
}

/// Every image `spec` runs: its own, and those of the pod template's other
/// containers and init containers (each must be on the agent's list).
pub fn images(spec: &KubeSpec) -> Vec<&str> {
    let mut images = vec![spec.image.as_str()];
    if let Some(pod) = spec.pod_template.as_ref().and_then(|t| t.spec.as_ref()) {
        images.extend(
            pod.containers
                .iter()
                .chain(pod.init_containers.iter().flatten())
                .filter(|container| container.name != crate::job::CONTAINER)
                .filter_map(|container| container.image.as_deref()),
        );
    }
    images
}

/// An image reference as a container may name it: not empty, not too long,
/// no whitespace or control characters (the registry judges the rest).
fn check_image(image: &str) -> Result<(), SpecError> {
    if image.is_empty() {
        return Err(SpecError("image is empty".into()));
    }
    if image.len() > MAX_IMAGE_BYTES {
        return Err(SpecError(format!(
            "image is {} bytes; the limit is {MAX_IMAGE_BYTES}",
            image.len()
        )));
    }
    if let Some(c) = image.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(SpecError(format!(
            "image {image:?} holds the character {c:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<KubeSpec, SpecError> {
        KubeSpec::from_properties(&json!({ "kubernetes": value }))
    }

    #[test]
    fn a_full_spec_round_trips_through_the_properties() {
        let spec = parse(json!({
            "image": "registry.example.com/jobs/report:1.4",
            "command": ["report"], "args": ["--month", "2026-11"],
            "env": {"MODE": "full"}, "namespace": "batch",
            "resources": {"requests": {"cpu": "500m"}, "limits": {"memory": "1Gi"}},
            "service_account": "reports", "node_selector": {"pool": "batch"},
            "tolerations": [{"key": "batch", "operator": "Exists"}],
            "active_deadline_seconds": 3600, "max_attempts": 5,
            "pod_template": {"spec": {"containers": [], "volumes": [{"name": "scratch", "emptyDir": {}}]}}
        }))
        .unwrap();
        assert_eq!(spec.max_attempts, 5);
        assert_eq!(spec.tolerations[0].operator.as_deref(), Some("Exists"));
        assert_eq!(
            KubeSpec::from_properties(&spec.to_properties()).unwrap(),
            spec
        );
    }

    #[test]
    fn every_image_of_the_pod_is_listed() {
        let spec = parse(json!({"image": "registry.test/jobs/main:1", "pod_template": {"spec": {
            "containers": [{"name": "main", "image": "ignored:1"}, {"name": "side", "image": "proxy:1"}],
            "initContainers": [{"name": "init", "image": "setup:1"}]}}}))
        .unwrap();
        assert_eq!(
            images(&spec),
            ["registry.test/jobs/main:1", "proxy:1", "setup:1"]
        );
    }

    #[test]
    fn unknown_fields_are_refused_at_any_depth() {
        let top = parse(json!({"image": "busybox", "imagee": "x"})).unwrap_err();
        assert!(top.0.contains("imagee"), "{top}");
        let nested = parse(json!({"image": "busybox",
            "pod_template": {"spec": {"containers": [], "volumez": []}}}))
        .unwrap_err();
        assert!(nested.0.contains("volumez"), "{nested}");
        let resources = parse(json!({"image": "busybox", "resources": {"limit": {}}})).unwrap_err();
        assert!(resources.0.contains("limit"), "{resources}");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (json!({"image": ""}), "image is empty"),
            (json!({"image": "bad image"}), "holds the character"),
            (
                json!({"image": "busybox", "namespace": "Batch"}),
                "namespace",
            ),
            (
                json!({"image": "busybox", "service_account": "a_b"}),
                "service_account",
            ),
            (
                json!({"image": "busybox", "node_selector": {"pool": "a b"}}),
                "node_selector value",
            ),
            (
                json!({"image": "busybox", "node_selector": {"-x": "a"}}),
                "node_selector key",
            ),
            (
                json!({"image": "busybox", "active_deadline_seconds": 0}),
                "active_deadline_seconds",
            ),
            (
                json!({"image": "busybox", "max_attempts": 0}),
                "max_attempts",
            ),
            (
                json!({"image": "busybox", "max_attempts": 1000}),
                "max_attempts",
            ),
            (
                json!({"image": "busybox", "env": {"ERETES_EPOCH": "1"}}),
                "set by eretes",
            ),
            (
                json!({"image": "busybox", "env": {"1X": "1"}}),
                "not a variable name",
            ),
            (json!({"image": "busybox", "args": ["a\u{0}b"]}), "NUL"),
            (
                json!({"image": "busybox", "pod_template": {"spec": {"containers": [], "restartPolicy": "Always"}}}),
                "restartPolicy",
            ),
            (json!({"command": ["x"]}), "image"),
        ];
        for (value, expected) in cases {
            let error = parse(value.clone()).unwrap_err();
            assert!(error.0.contains(expected), "{value}: {error}");
        }
        let template_cases = [
            (
                json!({"metadata": {"finalizers": ["x/y"]}, "spec": {"containers": []}}),
                "only labels and annotations",
            ),
            (
                json!({"metadata": {"labels": {"eretes.io/epoch": "9"}}}),
                "set by eretes",
            ),
            (
                json!({"metadata": {"labels": {"job-name": "other"}}}),
                "set by eretes",
            ),
            (
                json!({"spec": {"containers": [], "hostNetwork": true}}),
                "hostNetwork",
            ),
            (
                json!({"spec": {"containers": [], "hostPID": true}}),
                "hostPID",
            ),
            (
                json!({"spec": {"containers": [], "volumes": [{"name": "root", "hostPath": {"path": "/"}}]}}),
                "hostPath",
            ),
            (
                json!({"spec": {"containers": [{"name": "x", "image": "busybox", "securityContext": {"privileged": true}}]}}),
                "privileged",
            ),
            (
                json!({"spec": {"containers": [], "initContainers": [{"name": "i", "securityContext": {"privileged": true}}]}}),
                "privileged",
            ),
            (
                json!({"spec": {"containers": [], "serviceAccountName": "eretes-agent"}}),
                "service_account",
            ),
            (
                json!({"spec": {"containers": [{"name": "a"}, {"name": "a"}]}}),
                "two containers",
            ),
        ];
        for (template, expected) in template_cases {
            let error =
                parse(json!({"image": "busybox", "pod_template": template.clone()})).unwrap_err();
            assert!(error.0.contains(expected), "{template}: {error}");
        }
        let huge = "x".repeat(MAX_SPEC_BYTES);
        let error = parse(json!({"image": "busybox", "args": [huge]})).unwrap_err();
        assert!(error.0.contains("bytes of JSON"), "{error}");
    }
}
