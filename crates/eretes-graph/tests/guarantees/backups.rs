//! Primary/backup hot standby: a backup takes over with every update the
//! primary's `update` returned for, a new backup is brought up after each
//! takeover, a backup that stops applying is given up before `update`
//! returns (so it can never take over), and the backup endpoints refuse
//! what they must.

use std::sync::atomic::Ordering;

use eretes_graph::proto::{BackupRequest, UpdateRequest};
use eretes_graph::{graph_task_id, BackupRecord, GraphError, JobName, UPDATE_PATIENCE};

use super::counter::*;
use super::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_takes_over_with_every_acknowledged_update_and_a_new_one_comes_up() {
    let (probe, mut cluster, _, job) = counter_job(3, "standby", 1, 1).await;
    let (primary, backup, first) = backed_up(&cluster, &probe, &job, 0, 50).await;
    // The job's status shows where its task runs and is backed up.
    let status = cluster.jobs.status(&job).await.unwrap().expect("the job");
    assert_eq!(status.spec.backups, 1);
    assert_eq!(
        (
            &status.tasks[0].node,
            &status.tasks[0].backups,
            status.tasks[0].ended
        ),
        (&Some(primary.clone()), &vec![backup.clone()], false)
    );
    let listed = cluster.jobs.list().await.unwrap();
    assert_eq!(listed.jobs.len(), 1);
    assert_eq!((&listed.jobs[0].name, listed.malformed), (&job, 0));
    cluster.kill(&primary);
    let (second, state) = takeover_after(&probe, 0, first).await;
    assert_no_update_lost(&state, &acked_by(&probe, first));
    assert_eq!(
        cluster.runner(&graph_task_id(&job, 0)),
        Some(backup.clone()),
        "the node holding the backup took the task over"
    );
    assert_eq!(lock(&probe.inits).len(), 1, "no cold start");

    // The new primary brings up a new backup on the third node (the only
    // one left), with its state, and goes on updating.
    let (now_primary, new_backup, claim) = backed_up(&cluster, &probe, &job, 0, 50).await;
    assert_eq!((now_primary.clone(), claim), (backup, second));
    assert!(probe.backups.load(Ordering::SeqCst) >= 2);

    // And takes over in turn, with every update of the second run.
    cluster.kill(&now_primary);
    let (_, state) = takeover_after(&probe, 0, second).await;
    assert_no_update_lost(&state, &acked_by(&probe, second));
    assert_eq!(cluster.runner(&graph_task_id(&job, 0)), Some(new_backup));
    assert_eq!(lock(&probe.inits).len(), 1, "no cold start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_that_stops_applying_is_given_up_before_update_returns() {
    let (probe, mut cluster, _, job) = counter_job(4, "stuck", 1, 1).await;
    let (primary, stuck, claim) = backed_up(&cluster, &probe, &job, 0, 20).await;
    // The backup's graph layer stops answering; its node (and lease, and so
    // its record) lives on.
    cluster.graph(&stuck).stop();
    let acked_before = acked_by(&probe, claim).len();
    // The primary's next update waits for it, gives it up, and returns;
    // then a new backup comes up elsewhere.
    let started = tokio::time::Instant::now();
    let (same, replacement, same_claim) =
        backed_up(&cluster, &probe, &job, 0, acked_before + 10).await;
    assert_eq!((same, same_claim), (primary.clone(), claim));
    assert_ne!(replacement, stuck);
    assert!(
        started.elapsed() >= UPDATE_PATIENCE / 2,
        "updates waited for the stuck backup before giving it up"
    );
    assert!(
        records(&cluster, &job, 0)
            .await
            .iter()
            .all(|(node, _)| *node != stuck),
        "the stuck backup's record is gone, so it can never take over"
    );
    // The primary dies: the replacement, not the stuck one, takes over
    // with every acknowledged update.
    cluster.kill(&stuck);
    cluster.kill(&primary);
    let (_, state) = takeover_after(&probe, 0, claim).await;
    assert_no_update_lost(&state, &acked_by(&probe, claim));
    assert_eq!(cluster.runner(&graph_task_id(&job, 0)), Some(replacement));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_backups_update_applies_locally_and_a_failover_starts_cold() {
    let (probe, mut cluster, _, job) = counter_job(2, "alone", 1, 0).await;
    let task = graph_task_id(&job, 0);
    let primary = eventually("task 0 running and updating", || {
        let runner = cluster.runner(&task)?;
        (lock(&probe.acked).len() >= 10).then_some(runner)
    })
    .await;
    assert!(records(&cluster, &job, 0).await.is_empty());
    cluster.kill(&primary);
    eventually("a cold restart", || {
        (lock(&probe.inits).len() == 2).then_some(())
    })
    .await;
    assert!(lock(&probe.promoted).is_empty());
    assert_eq!(probe.backups.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_endpoints_refuse_bad_and_stale_requests() {
    let (probe, mut cluster, nodes, job) = counter_job(3, "hostile", 1, 1).await;
    let task = graph_task_id(&job, 0);
    let (running, backup, claim) = backed_up(&cluster, &probe, &job, 0, 5).await;
    let spare = spare(&nodes, &running, &backup);
    let backup_request = |job: &str, task: u32, claim: i64| BackupRequest {
        job: job.into(),
        task,
        primary_claim_epoch: claim,
        primary_node: running.to_string(),
        sequence: 0,
        state: b"[]".to_vec(),
    };
    let cases = [
        (&spare, backup_request("no/such", 0, claim), "invalid"),
        (&spare, backup_request("nosuchjob", 0, claim), "no job"),
        (&spare, backup_request(job.as_str(), 7, claim), "no backups"),
        // A primary whose claim is not the task's current one (fenced).
        (
            &spare,
            backup_request(job.as_str(), 0, claim - 1),
            "not current",
        ),
        // Nor may it replace the current primary's backup.
        (
            &backup,
            backup_request(job.as_str(), 0, claim - 1),
            "later primary",
        ),
        // The node running the task does not back it up itself.
        (&running, backup_request(job.as_str(), 0, claim), "runs"),
    ];
    for (node, request, expected) in cases {
        let reply = client_of(&cluster, node)
            .await
            .backup(request.clone())
            .await;
        let refused = reply.unwrap().into_inner().refused;
        assert!(
            refused.contains(expected),
            "{request:?} to {node}: {refused:?} does not say {expected:?}"
        );
    }
    let update = |task: u32, claim: i64, sequence: u64| UpdateRequest {
        job: job.to_string(),
        task,
        primary_claim_epoch: claim,
        sequence,
        entry: 1u64.to_le_bytes().to_vec(),
    };
    let cases = [
        (update(3, claim, 1), "holds no backup"),
        (update(0, claim + 1, 1), "not"),
        (update(0, claim, u64::MAX), "missing"),
    ];
    let mut client = client_of(&cluster, &backup).await;
    for (request, expected) in cases {
        let refused = client
            .update(request.clone())
            .await
            .unwrap()
            .into_inner()
            .refused;
        assert!(
            refused.contains(expected),
            "{request:?}: {refused:?} does not say {expected:?}"
        );
    }
    // None of it disturbed the real backup: it is still the only one
    // recorded, for the same run, and takes over with every acknowledged
    // update.
    assert_eq!(
        records(&cluster, &job, 0).await,
        vec![(
            backup.clone(),
            BackupRecord {
                primary_claim_epoch: claim
            }
        )]
    );
    cluster.kill(&running);
    let (_, state) = takeover_after(&probe, 0, claim).await;
    assert_no_update_lost(&state, &acked_by(&probe, claim));
    assert_eq!(cluster.runner(&task), Some(backup));
}

#[tokio::test]
async fn jobs_with_more_backups_than_allowed_are_refused() {
    let (_, cluster) = counters();
    let mut spec = spec(KIND, 1);
    spec.backups = eretes_graph::MAX_BACKUPS + 1;
    let refused = cluster
        .jobs
        .start(&JobName::new("greedy").unwrap(), &spec)
        .await;
    assert!(
        matches!(&refused, Err(GraphError::Invalid(message)) if message.contains("backups")),
        "{}",
        show(&refused)
    );
    assert!(cluster
        .jobs
        .job(&JobName::new("greedy").unwrap())
        .await
        .unwrap()
        .is_none());
}
