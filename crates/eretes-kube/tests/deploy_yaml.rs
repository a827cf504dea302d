//! The YAML under `deploy/kubernetes/` is read into the API's own types
//! (`k8s-openapi`), with every field that no type knows refused, so a typo
//! (`serviceAcountName`, `volumeMount`) fails the suite instead of being
//! dropped by the API server; and the Role grants what the executor uses.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes")
}

/// One document read into `T`, or the fields `T` does not know.
fn strict<T: DeserializeOwned>(document: &Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let object: T = serde_ignored::deserialize(document, |path| unknown.push(path.to_string()))
        .map_err(|e| e.to_string())?;
    if unknown.is_empty() {
        Ok(object)
    } else {
        Err(format!("unknown fields: {}", unknown.join(", ")))
    }
}

/// The objects of one YAML text, each checked by its kind.
#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    accounts: Vec<ServiceAccount>,
    roles: Vec<Role>,
    bindings: Vec<RoleBinding>,
}

fn read(text: &str, objects: &mut Objects) -> Result<(), String> {
    let documents: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| e.to_string())?;
    for document in documents.iter().filter(|d| !d.is_null()) {
        let kind = document["kind"].as_str().unwrap_or_default();
        let api = document["apiVersion"].as_str().unwrap_or_default();
        match (api, kind) {
            ("v1", "Namespace") => objects.namespaces.push(strict(document)?),
            ("apps/v1", "Deployment") => objects.deployments.push(strict(document)?),
            ("v1", "Service") => objects.services.push(strict(document)?),
            ("v1", "ServiceAccount") => objects.accounts.push(strict(document)?),
            ("rbac.authorization.k8s.io/v1", "Role") => objects.roles.push(strict(document)?),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                objects.bindings.push(strict(document)?)
            }
            other => return Err(format!("an object this test does not know: {other:?}")),
        }
    }
    Ok(())
}

fn read_all() -> Objects {
    let mut objects = Objects::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/kubernetes exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        if let Err(error) = read(&text, &mut objects) {
            panic!("{}: {error}", file.display());
        }
    }
    objects
}

#[test]
fn the_deploy_yaml_is_valid_and_complete() {
    let objects = read_all();
    assert_eq!(objects.deployments.len(), 1);
    assert_eq!(objects.services.len(), 1);
    let deployment = &objects.deployments[0];
    let pod = deployment.spec.template.spec.as_ref().unwrap();
    let account = pod.service_account_name.as_deref().unwrap();
    let args = pod.containers[0].args.clone().unwrap();
    for needed in ["agent", "--kubernetes"] {
        assert!(
            args.iter().any(|a| a == needed),
            "{needed} missing: {args:?}"
        );
    }
    assert!(
        args.iter().any(|a| a.starts_with("--allow-images=")),
        "{args:?}"
    );
    assert!(
        args.iter().any(|a| a.starts_with("--token-file=")),
        "{args:?}"
    );

    // The service account exists beside the agents, and its Role is bound
    // to it in the Jobs' namespace, which is another one, with the
    // restricted Pod Security Standard.
    let agents_ns = deployment.metadata.namespace.as_deref().unwrap();
    assert!(objects.accounts.iter().any(|a| {
        a.metadata.name.as_deref() == Some(account)
            && a.metadata.namespace.as_deref() == Some(agents_ns)
    }));
    let jobs_ns = args
        .iter()
        .find_map(|a| a.strip_prefix("--kubernetes-namespace="))
        .unwrap();
    assert_ne!(jobs_ns, agents_ns);
    let jobs_namespace = objects
        .namespaces
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(jobs_ns))
        .unwrap();
    assert_eq!(
        jobs_namespace.metadata.labels.as_ref().unwrap()["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    let role = &objects.roles[0];
    let binding = &objects.bindings[0];
    assert_eq!(role.metadata.namespace.as_deref(), Some(jobs_ns));
    assert_eq!(binding.metadata.namespace.as_deref(), Some(jobs_ns));
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
    assert!(binding.subjects.iter().flatten().any(|s| {
        s.kind == "ServiceAccount" && s.name == account && s.namespace.as_deref() == Some(agents_ns)
    }));

    // The Role grants every call the executor makes.
    let grants = |group: &str, resource: &str, verb: &str| {
        role.rules.iter().flatten().any(|rule| {
            rule.api_groups.iter().flatten().any(|g| g == group)
                && rule.resources.iter().flatten().any(|r| r == resource)
                && rule.verbs.iter().any(|v| v == verb)
        })
    };
    for verb in ["create", "get", "list", "watch", "delete"] {
        assert!(grants("batch", "jobs", verb), "jobs {verb}");
    }
    for verb in ["get", "list", "watch", "delete"] {
        assert!(grants("", "pods", verb), "pods {verb}");
    }
    assert!(grants("", "pods/log", "get"));
}

#[test]
fn a_typo_in_the_yaml_fails() {
    let text = std::fs::read_to_string(deploy_dir().join("agent.yaml")).unwrap();
    for (right, wrong) in [
        ("serviceAccountName:", "serviceAcountName:"),
        ("volumeMounts:", "volumeMount:"),
        ("readinessProbe:", "readynessProbe:"),
    ] {
        assert!(text.contains(right), "{right}");
        let typo = text.replacen(right, wrong, 1);
        let error = read(&typo, &mut Objects::default()).unwrap_err();
        assert!(
            error.contains(wrong.trim_end_matches(':')),
            "{wrong}: {error}"
        );
    }
    // A wrong type is refused too.
    let typo = text.replacen("replicas: 2", "replicas: two", 1);
    assert!(read(&typo, &mut Objects::default()).is_err());
}
