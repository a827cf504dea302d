//! `eretes agent --kubernetes` end to end: a real agent process reaches the
//! fake Kubernetes API server of `eretes_kube::testing` through a
//! kubeconfig file, and the CLI submits, waits for and reads the logs of
//! tasks that run as Jobs.

mod common;

use std::time::Duration;

use common::{agent_refuses, Agent};
use eretes_kube::testing::fake_api::{FakeApiServer, JobEventKind, PodScript};
use k8s_openapi::api::batch::v1::Job;

// The CLI runs as a blocking child process; the fake API server needs a
// worker of its own meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_task_runs_as_a_job_through_the_cli() {
    let api = FakeApiServer::start().await;
    api.set_kubelet(|job: &Job| {
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let words: Vec<String> = pod.containers[0]
            .command
            .iter()
            .flatten()
            .chain(pod.containers[0].args.iter().flatten())
            .cloned()
            .collect();
        // The "container" prints its command line, and fails on "fail".
        PodScript {
            pending_for: Duration::from_millis(50),
            log: vec![words.join(" ")],
            run_for: Duration::from_millis(200),
            exit_code: Some(if words.iter().any(|w| w == "fail") {
                7
            } else {
                0
            }),
            ignore_sigterm: false,
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let data = dir.path().join("data");
    let agent = Agent::start(
        &data,
        &[
            "--kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--allow-images",
            "registry.test/jobs/,busybox:1.36",
        ],
    )
    .await;

    // Waited for: the exit code is the container's, the log is the pod's.
    let out = agent.ok(&[
        "submit",
        "--id",
        "hello",
        "--image",
        "busybox:1.36",
        "--wait",
        "--",
        "echo",
        "hi",
    ]);
    assert!(out.contains("hello done (exit code 0)"), "{out}");
    let logs = agent.ok(&["logs", "hello"]);
    assert_eq!(logs, "echo hi\n");
    let shown = agent.ok(&["show", "hello"]);
    assert!(shown.contains("[busybox:1.36] echo hi"), "{shown}");

    let failed = agent.cli(&[
        "submit",
        "--id",
        "sad",
        "--image",
        "registry.test/jobs/w:2",
        "--max-attempts",
        "1",
        "--wait",
        "--",
        "fail",
    ]);
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    let view = agent.ok(&["show", "sad", "--json"]);
    assert!(view.contains("exit code 7"), "{view}");

    // Refused by the image list: failed at once, no Job made.
    let created = || {
        api.job_history()
            .iter()
            .filter(|event| matches!(event.kind, JobEventKind::Created))
            .count()
    };
    let before = created();
    agent.ok(&["submit", "--id", "evil", "--image", "evil.example/x:1"]);
    let out = agent.cli(&["wait", "evil"]);
    assert!(!out.status.success());
    let view = agent.ok(&["show", "evil", "--json"]);
    assert!(view.contains("--allow-images"), "{view}");
    assert_eq!(created(), before);
    common::wait_until("every Job is gone", || api.jobs("default").is_empty()).await;
}

#[tokio::test]
async fn bad_kubernetes_specs_are_refused_at_submit_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]).await;
    let spec_file = dir.path().join("spec.json");
    std::fs::write(
        &spec_file,
        r#"{"image": "busybox:1.36", "pod_template": {"spec": {"containers": [], "volumez": []}}}"#,
    )
    .unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--kubernetes-spec", spec_file.to_str().unwrap()],
            "volumez",
        ),
        (vec!["--image", "bad image"], "holds the character"),
        (
            vec![
                "--image",
                "busybox",
                "--kubernetes-namespace",
                "Not_A_Label",
            ],
            "namespace",
        ),
        (vec!["--image", "busybox", "--permanent"], "--permanent"),
        (
            vec!["--image", "busybox", "--env", "ERETES_EPOCH=1"],
            "set by eretes",
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec!["submit"];
        all.extend(args.iter().copied());
        let output = agent.cli(&all);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // The API checks the same when the CLI is not in the way.
    let response = reqwest::Client::new()
        .post(format!("{}/v1/tasks", agent.url))
        .json(&serde_json::json!({"kubernetes": {"image": "busybox", "resources": {"limitz": {}}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("limitz"));
    let listed = agent.ok(&["ls", "--json"]);
    assert!(listed.contains("\"tasks\": []"), "{listed}");

    // An agent without --kubernetes fails a Kubernetes task with a reason.
    agent.ok(&["submit", "--id", "k", "--image", "busybox:1.36"]);
    agent.cli(&["wait", "k"]);
    let view = agent.ok(&["show", "k", "--json"]);
    assert!(view.contains("start it with --kubernetes"), "{view}");
}

#[test]
fn the_agent_refuses_kubernetes_without_an_image_list_or_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let missing = dir.path().join("missing-kubeconfig");
    let refused = agent_refuses(
        &data,
        &["--kubernetes", "--kubeconfig", missing.to_str().unwrap()],
    );
    assert!(refused.contains("--allow-images"), "{refused}");
    let refused = agent_refuses(
        &data,
        &[
            "--kubernetes",
            "--allow-images",
            "busybox:1.36",
            "--kubeconfig",
            missing.to_str().unwrap(),
        ],
    );
    assert!(refused.contains("--kubeconfig"), "{refused}");
    // Allow lists of names that cannot be Kubernetes names.
    let refused = agent_refuses(
        &data,
        &[
            "--kubernetes",
            "--allow-images",
            "busybox:1.36",
            "--allow-kubernetes-namespaces",
            "Not_A_Label",
        ],
    );
    assert!(
        refused.contains("--allow-kubernetes-namespaces"),
        "{refused}"
    );
    let refused = agent_refuses(
        &data,
        &[
            "--kubernetes",
            "--allow-images",
            "busybox:1.36",
            "--allow-service-accounts",
            "bad account",
        ],
    );
    assert!(refused.contains("--allow-service-accounts"), "{refused}");
    let refused = agent_refuses(&data, &["--kubernetes", "--allow-images", "a b"]);
    assert!(refused.contains("--allow-images"), "{refused}");
    // A Kubernetes option without --kubernetes is a usage error.
    let output = std::process::Command::new(common::BIN)
        .args(["agent", "--data-dir"])
        .arg(&data)
        .args(["--allow-images", "busybox:1.36"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--kubernetes"));
}
