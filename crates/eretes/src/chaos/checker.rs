//! The checker of a chaos run: what the guarantees say, counted from what
//! the run saw — the fenced sink's record of every write, the store's
//! history as the chaos process watched it, the tasks' final states and
//! the nemesis's log. Nothing is derived from the run's parameters.
//!
//! * **overlaps**: two runs of one task alive at once, from the witness's
//!   own send times (a run is alive from its first write to its last);
//! * **stale writes accepted**: writes the sink took although the store
//!   had already given the task a newer epoch when they were sent;
//!   **refused**: writes the sink turned down (a newer epoch had written);
//! * **lost**: a task that vanished, an ending task that did not complete
//!   (or end killed, when a kill was sent), a permanent task with no owner
//!   at the end;
//! * **double completions**: a task whose terminal result was written
//!   twice;
//! * **sequence gaps**: a run that started from a checkpoint older than
//!   the newest one the store held when the run was claimed (progress lost
//!   beyond the last checkpoint);
//! * **max unavailable**: the longest time a task that should have run had
//!   no write, outside its pauses.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use eretes_protocol::Outcome;
use serde::Serialize;

use super::history::{Change, Observed};
use super::nemesis::FaultRecord;
use super::sink::{Line, Recorded};

/// A task of the run's workload and what was done to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTask {
    /// Its id.
    pub id: String,
    /// Writes until it ends; 0 for a permanent task.
    pub work: u64,
    /// Whether a kill command was sent to it.
    pub kill_sent: bool,
    /// Pause → resume windows (µs since the Unix epoch) it spent paused.
    pub paused: Vec<(u64, u64)>,
}

/// How a task stood in the store at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalState {
    /// Its record and an owner.
    Running,
    /// Its record, no owner.
    Pending,
    /// Its terminal result.
    Ended(Outcome),
    /// Nothing of it.
    Missing,
}

/// Everything the checker reads.
#[derive(Debug, Default)]
pub struct Evidence {
    /// The workload.
    pub tasks: Vec<PlannedTask>,
    /// The sink's record.
    pub writes: Vec<Recorded>,
    /// The store's history.
    pub history: Vec<Observed>,
    /// Each task's final state.
    pub finals: HashMap<String, FinalState>,
    /// The nemesis's log.
    pub faults: Vec<FaultRecord>,
    /// Agents that exited without being killed.
    pub agent_crashes: u64,
    /// Agents in the run.
    pub agents: usize,
    /// How long the run took (µs).
    pub duration_us: u64,
    /// When the run's checks end (µs since the Unix epoch): permanent
    /// tasks should have run until then.
    pub end_us: u64,
    /// The lease TTL (µs): faults within a few of it are named beside a
    /// violation.
    pub ttl_us: u64,
}

/// The checker's figures: the last line of `eretes chaos --json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Agents in the run.
    pub agents: usize,
    /// Tasks submitted.
    pub tasks: usize,
    /// How long the run took.
    pub duration_ms: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Pairs of runs of one task alive at once.
    pub overlaps: u64,
    /// Writes accepted after the store had moved the task to a newer epoch.
    pub stale_writes_accepted: u64,
    /// Writes the sink refused.
    pub stale_writes_refused: u64,
    /// Tasks that vanished or did not end as they should.
    pub lost: u64,
    /// Tasks whose terminal result was written more than once.
    pub double_completions: u64,
    /// Runs that started before their task's last stored checkpoint.
    pub sequence_gaps: u64,
    /// Agents that exited without being killed.
    pub agent_crashes: u64,
    /// The longest time a task that should run had no run.
    pub max_unavailable_ms: u64,
    /// Where that was: the task, the gap, and the faults around it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_unavailable_at: Option<String>,
    /// Tasks that completed.
    pub completed: u64,
    /// Runs seen by the sink.
    pub runs: u64,
    /// Writes seen by the sink.
    pub writes: u64,
    /// Whether every guarantee held.
    pub ok: bool,
    /// The history of the first violation found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_violation: Option<String>,
}

/// One run of a task, as its writes show it.
#[derive(Debug, Clone)]
struct Run {
    task: String,
    epoch: i64,
    node: String,
    loaded: u64,
    first_us: u64,
    last_us: u64,
}

/// Check `evidence`.
pub fn check(evidence: &Evidence) -> Report {
    let mut report = Report {
        agents: evidence.agents,
        tasks: evidence.tasks.len(),
        duration_ms: evidence.duration_us / 1000,
        agent_crashes: evidence.agent_crashes,
        writes: evidence.writes.len() as u64,
        ..Report::default()
    };
    for fault in &evidence.faults {
        *report.faults.entry(fault.kind.clone()).or_default() += 1;
    }
    let mut violations: Vec<(u64, String)> = Vec::new();
    let runs = runs_of(&evidence.writes);
    report.runs = runs.len() as u64;
    let history = by_task(&evidence.history);

    check_overlaps(evidence, &runs, &mut report, &mut violations);
    check_stale_writes(evidence, &history, &mut report, &mut violations);
    check_sequence_gaps(evidence, &runs, &history, &mut report, &mut violations);
    check_endings(evidence, &history, &mut report, &mut violations);
    if let Some(gap) = longest_unavailable(evidence) {
        report.max_unavailable_ms = (gap.to - gap.from) / 1000;
        let mut at = format!(
            "task {} had no write from {} to {}",
            gap.task,
            clock(gap.from),
            clock(gap.to)
        );
        let nearby = faults_near(evidence, gap.to);
        if !nearby.is_empty() {
            let _ = write!(at, "; faults around then: {nearby}");
        }
        report.max_unavailable_at = Some(at);
    }
    if evidence.agent_crashes > 0 {
        violations.push((
            0,
            format!(
                "{} agent(s) exited without being killed (their logs are in the run's directory)",
                evidence.agent_crashes
            ),
        ));
    }
    report.ok = violations.is_empty();
    report.first_violation = violations
        .into_iter()
        .min_by_key(|(at, _)| *at)
        .map(|(at, text)| {
            let mut text = text;
            let nearby = faults_near(evidence, at);
            if !nearby.is_empty() {
                let _ = write!(text, "; faults around then: {nearby}");
            }
            text
        });
    report
}

fn runs_of(writes: &[Recorded]) -> Vec<Run> {
    let mut runs: BTreeMap<(String, i64, u64), Run> = BTreeMap::new();
    for recorded in writes {
        let Line::Write {
            task,
            epoch,
            node,
            nonce,
            loaded,
            sent_us,
            ..
        } = &recorded.line
        else {
            continue;
        };
        let run = runs
            .entry((task.clone(), *epoch, *nonce))
            .or_insert_with(|| Run {
                task: task.clone(),
                epoch: *epoch,
                node: node.clone(),
                loaded: *loaded,
                first_us: *sent_us,
                last_us: *sent_us,
            });
        run.first_us = run.first_us.min(*sent_us);
        run.last_us = run.last_us.max(*sent_us);
    }
    runs.into_values().collect()
}

fn by_task(history: &[Observed]) -> HashMap<&str, Vec<&Observed>> {
    let mut tasks: HashMap<&str, Vec<&Observed>> = HashMap::new();
    for observed in history {
        tasks
            .entry(observed.task.as_str())
            .or_default()
            .push(observed);
    }
    for events in tasks.values_mut() {
        events.sort_by_key(|o| o.revision);
    }
    tasks
}

fn check_overlaps(
    _evidence: &Evidence,
    runs: &[Run],
    report: &mut Report,
    violations: &mut Vec<(u64, String)>,
) {
    let mut per_task: HashMap<&str, Vec<&Run>> = HashMap::new();
    for run in runs {
        per_task.entry(run.task.as_str()).or_default().push(run);
    }
    for runs in per_task.values_mut() {
        runs.sort_by_key(|run| run.first_us);
        for (i, earlier) in runs.iter().enumerate() {
            for later in &runs[i + 1..] {
                if later.first_us < earlier.last_us {
                    report.overlaps += 1;
                    violations.push((
                        later.first_us,
                        format!(
                            "overlap: task {} ran as epoch {} on {} (writes {} → {}) and as \
                             epoch {} on {} from {}",
                            earlier.task,
                            earlier.epoch,
                            earlier.node,
                            clock(earlier.first_us),
                            clock(earlier.last_us),
                            later.epoch,
                            later.node,
                            clock(later.first_us)
                        ),
                    ));
                }
            }
        }
    }
}

fn check_stale_writes(
    evidence: &Evidence,
    history: &HashMap<&str, Vec<&Observed>>,
    report: &mut Report,
    violations: &mut Vec<(u64, String)>,
) {
    for recorded in &evidence.writes {
        let Line::Write {
            task,
            epoch,
            node,
            sequence,
            sent_us,
            ..
        } = &recorded.line
        else {
            continue;
        };
        if !recorded.accepted {
            report.stale_writes_refused += 1;
            continue;
        }
        // The newest claim the chaos process had seen when this was sent.
        let newer = history.get(task.as_str()).and_then(|events| {
            events
                .iter()
                .filter(|o| o.seen_us < *sent_us)
                .filter_map(|o| match &o.change {
                    Change::Claimed {
                        epoch: claimed,
                        node,
                    } if claimed > epoch => Some((*claimed, node.clone(), o.seen_us)),
                    _ => None,
                })
                .max_by_key(|(claimed, _, _)| *claimed)
        });
        if let Some((claimed, by, seen_us)) = newer {
            report.stale_writes_accepted += 1;
            violations.push((
                *sent_us,
                format!(
                    "stale write accepted: task {task} epoch {epoch} on {node} wrote {sequence} at \
                     {}, after the store gave it epoch {claimed} on {by} (seen at {})",
                    clock(*sent_us),
                    clock(seen_us)
                ),
            ));
        }
    }
}

fn check_sequence_gaps(
    _evidence: &Evidence,
    runs: &[Run],
    history: &HashMap<&str, Vec<&Observed>>,
    report: &mut Report,
    violations: &mut Vec<(u64, String)>,
) {
    for run in runs {
        // The newest checkpoint stored before this run's claim.
        let stored = history.get(run.task.as_str()).and_then(|events| {
            events
                .iter()
                .filter(|o| o.revision < run.epoch)
                .filter_map(|o| match o.change {
                    Change::Checkpoint(value) => Some((o.revision, value)),
                    _ => None,
                })
                .max_by_key(|(revision, _)| *revision)
        });
        if let Some((revision, value)) = stored {
            if run.loaded < value {
                report.sequence_gaps += 1;
                violations.push((
                    run.first_us,
                    format!(
                        "sequence gap: task {} epoch {} on {} started from checkpoint {} at {}, \
                         but the store held {value} since revision {revision}",
                        run.task,
                        run.epoch,
                        run.node,
                        run.loaded,
                        clock(run.first_us)
                    ),
                ));
            }
        }
    }
}

fn check_endings(
    evidence: &Evidence,
    history: &HashMap<&str, Vec<&Observed>>,
    report: &mut Report,
    violations: &mut Vec<(u64, String)>,
) {
    for task in &evidence.tasks {
        let state = evidence
            .finals
            .get(&task.id)
            .copied()
            .unwrap_or(FinalState::Missing);
        if state == FinalState::Ended(Outcome::Done) {
            report.completed += 1;
        }
        if !ends_well(task, state) {
            report.lost += 1;
            let expected = match (task.work, task.kill_sent) {
                (0, _) => "running (a permanent task)",
                (_, true) => "done or killed",
                (_, false) => "done",
            };
            violations.push((
                evidence.end_us,
                format!(
                    "lost: task {} ended the run {:?}, expected {expected}",
                    task.id, state
                ),
            ));
        }
        let endings = history.get(task.id.as_str()).map_or(0, |events| {
            events
                .iter()
                .filter(|o| matches!(o.change, Change::Ended(_)))
                .count()
        });
        if endings > 1 {
            report.double_completions += 1;
            violations.push((
                evidence.end_us,
                format!(
                    "double completion: task {} was ended {endings} times",
                    task.id
                ),
            ));
        }
    }
}

/// Whether `task` stands as it should at the end: a permanent task
/// running, an ending one done (or killed, when a kill was sent).
pub fn ends_well(task: &PlannedTask, state: FinalState) -> bool {
    match (task.work, state) {
        (_, FinalState::Missing) => false,
        (0, state) => state == FinalState::Running,
        (_, FinalState::Ended(Outcome::Done)) => true,
        (_, FinalState::Ended(Outcome::Killed)) => task.kill_sent,
        _ => false,
    }
}

/// A time a task had no write.
struct Gap<'a> {
    task: &'a str,
    from: u64,
    to: u64,
}

/// The longest gap between two writes of a task that should have been
/// running: from its first write until it reported done, or until the end
/// of the checks for a permanent task; gaps that overlap a pause of the
/// task, and tasks a kill was sent to, do not count.
fn longest_unavailable(evidence: &Evidence) -> Option<Gap<'_>> {
    let mut times: HashMap<&str, Vec<u64>> = HashMap::new();
    let mut done: HashMap<&str, u64> = HashMap::new();
    for recorded in &evidence.writes {
        match &recorded.line {
            Line::Write { task, sent_us, .. } => {
                times.entry(task.as_str()).or_default().push(*sent_us)
            }
            Line::Done { task, sent_us, .. } => {
                let first = done.entry(task.as_str()).or_insert(*sent_us);
                *first = (*first).min(*sent_us);
            }
        }
    }
    let mut longest: Option<Gap> = None;
    for task in &evidence.tasks {
        if task.kill_sent {
            continue;
        }
        let Some(times) = times.get_mut(task.id.as_str()) else {
            continue;
        };
        times.sort_unstable();
        let end = if task.work == 0 {
            evidence.end_us
        } else {
            done.get(task.id.as_str())
                .copied()
                .unwrap_or(evidence.end_us)
        };
        let mut previous = times[0];
        for &at in times.iter().skip(1).chain(std::iter::once(&end)) {
            let at = at.min(end);
            let paused = task
                .paused
                .iter()
                .any(|&(from, to)| from < at && to > previous);
            let longer = longest
                .as_ref()
                .is_none_or(|gap| at.saturating_sub(previous) > gap.to - gap.from);
            if !paused && at > previous && longer {
                longest = Some(Gap {
                    task: &task.id,
                    from: previous,
                    to: at,
                });
            }
            previous = previous.max(at);
        }
    }
    longest
}

fn faults_near(evidence: &Evidence, at: u64) -> String {
    let window = evidence.ttl_us * 3;
    evidence
        .faults
        .iter()
        .filter(|f| f.started_us <= at && f.ended_us.unwrap_or(u64::MAX) + window >= at)
        .map(|f| {
            format!(
                "[{} {} {} for {} ms]",
                clock(f.started_us),
                f.kind,
                f.target,
                f.ended_us
                    .unwrap_or(evidence.end_us)
                    .saturating_sub(f.started_us)
                    / 1000
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A wall-clock time of day, UTC, to the millisecond.
fn clock(us: u64) -> String {
    let ms = us / 1000;
    let (h, m, s, milli) = (
        (ms / 3_600_000) % 24,
        (ms / 60_000) % 60,
        (ms / 1000) % 60,
        ms % 1000,
    );
    format!("{h:02}:{m:02}:{s:02}.{milli:03}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    fn write(task: &str, epoch: i64, nonce: u64, loaded: u64, seq: u64, at: u64) -> Recorded {
        Recorded {
            line: Line::Write {
                task: task.into(),
                epoch,
                node: format!("a{}", epoch % 3),
                nonce,
                loaded,
                sequence: seq,
                sent_us: at,
            },
            received_us: at + 100,
            accepted: true,
        }
    }

    fn done(task: &str, epoch: i64, at: u64) -> Recorded {
        Recorded {
            line: Line::Done {
                task: task.into(),
                epoch,
                node: "a0".into(),
                nonce: 1,
                sequence: 3,
                sent_us: at,
            },
            received_us: at,
            accepted: true,
        }
    }

    fn observed(task: &str, change: Change, revision: i64, seen_us: u64) -> Observed {
        Observed {
            task: task.into(),
            change,
            revision,
            seen_us,
        }
    }

    fn claimed(epoch: i64) -> Change {
        Change::Claimed {
            node: "a1".into(),
            epoch,
        }
    }

    /// One ending task run by epoch 10, killed at 2 s, taken over by epoch
    /// 20 at 5 s, which continues from checkpoint 2 and completes.
    fn clean() -> Evidence {
        let writes = vec![
            write("t", 10, 1, 0, 1, S),
            write("t", 10, 1, 0, 2, S + S / 10),
            write("t", 20, 2, 2, 3, 5 * S),
            done("t", 20, 5 * S + S / 10),
        ];
        let history = vec![
            observed("t", claimed(10), 10, S / 2),
            observed("t", Change::Checkpoint(2), 15, S + S / 5),
            observed("t", Change::Unowned, 18, 4 * S),
            observed("t", claimed(20), 20, 4 * S + S / 2),
            observed("t", Change::Ended(Outcome::Done), 25, 5 * S + S / 5),
        ];
        Evidence {
            tasks: vec![PlannedTask {
                id: "t".into(),
                work: 3,
                kill_sent: false,
                paused: vec![],
            }],
            writes,
            history,
            finals: HashMap::from([("t".into(), FinalState::Ended(Outcome::Done))]),
            faults: vec![FaultRecord {
                kind: "kill".into(),
                target: "a0".into(),
                started_us: 2 * S,
                ended_us: Some(3 * S),
            }],
            agents: 3,
            duration_us: 6 * S,
            end_us: 6 * S,
            ttl_us: S,
            ..Evidence::default()
        }
    }

    #[test]
    fn a_clean_takeover_passes_with_its_unavailability_measured() {
        let report = check(&clean());
        assert!(report.ok, "{report:?}");
        assert_eq!(report.completed, 1);
        assert_eq!(report.runs, 2);
        assert_eq!(report.faults["kill"], 1);
        // From the last write of epoch 10 (1.1 s) to the first of 20 (5 s).
        assert_eq!(report.max_unavailable_ms, 3900);
        let at = report.max_unavailable_at.unwrap();
        assert!(
            at.starts_with("task t had no write from 00:00:01.100 to 00:00:05.000"),
            "{at}"
        );
        assert!(at.contains("kill a0"), "{at}");
        assert_eq!(report.first_violation, None);
    }

    #[test]
    fn a_run_writing_after_its_successor_started_is_an_overlap() {
        let mut evidence = clean();
        evidence
            .writes
            .push(write("t", 10, 1, 0, 3, 5 * S + S / 20));
        let report = check(&evidence);
        assert_eq!(report.overlaps, 1);
        // It was also sent after the chaos process saw epoch 20's claim.
        assert_eq!(report.stale_writes_accepted, 1);
        assert!(!report.ok);
        let text = report.first_violation.unwrap();
        assert!(text.contains("overlap: task t ran as epoch 10"), "{text}");
        assert!(
            text.contains("kill a0"),
            "the fault nearby is named: {text}"
        );
    }

    #[test]
    fn refused_writes_are_counted_but_are_no_violation() {
        let mut evidence = clean();
        let mut refused = write("t", 10, 1, 0, 3, S + S / 5);
        refused.accepted = false;
        evidence.writes.push(refused);
        let report = check(&evidence);
        assert_eq!(report.stale_writes_refused, 1);
        assert!(report.ok, "{report:?}");
    }

    #[test]
    fn starting_before_the_stored_checkpoint_is_a_sequence_gap() {
        let mut evidence = clean();
        evidence.writes[2] = write("t", 20, 2, 1, 2, 5 * S);
        let report = check(&evidence);
        assert_eq!(report.sequence_gaps, 1);
        assert!(report
            .first_violation
            .unwrap()
            .contains("started from checkpoint 1"));
    }

    #[test]
    fn a_missing_or_unfinished_task_is_lost_and_a_second_ending_is_double() {
        let mut evidence = clean();
        evidence.finals.insert("t".into(), FinalState::Missing);
        assert_eq!(check(&evidence).lost, 1);
        evidence.finals.insert("t".into(), FinalState::Pending);
        assert_eq!(check(&evidence).lost, 1);
        // Killed without a kill command is lost too.
        evidence
            .finals
            .insert("t".into(), FinalState::Ended(Outcome::Killed));
        assert_eq!(check(&evidence).lost, 1);
        evidence.tasks[0].kill_sent = true;
        assert_eq!(check(&evidence).lost, 0);
        evidence
            .history
            .push(observed("t", Change::Ended(Outcome::Done), 30, 6 * S));
        let report = check(&evidence);
        assert_eq!(report.double_completions, 1);
        assert!(!report.ok);
    }

    #[test]
    fn a_permanent_task_must_run_at_the_end_and_pauses_are_not_unavailability() {
        let mut evidence = clean();
        evidence.tasks[0].work = 0;
        evidence.finals.insert("t".into(), FinalState::Running);
        evidence.writes.pop(); // no done line
        evidence.history.pop();
        // Paused from 1.5 s to 4.8 s: the gap around it does not count;
        // the tail from 5 s to the end (6 s) does.
        evidence.tasks[0].paused = vec![(S + S / 2, 4 * S + 4 * S / 5)];
        let report = check(&evidence);
        assert!(report.ok, "{report:?}");
        assert_eq!(report.max_unavailable_ms, 1000);
        evidence.finals.insert("t".into(), FinalState::Pending);
        assert_eq!(check(&evidence).lost, 1);
    }

    #[test]
    fn crashes_fail_the_run() {
        let mut evidence = clean();
        evidence.agent_crashes = 1;
        let report = check(&evidence);
        assert!(!report.ok);
        assert!(report.first_violation.unwrap().contains("exited without"));
    }
}
