//! The nemesis of a chaos run: from a seeded random schedule, it keeps
//! injecting faults into the agents and the etcd cluster, and heals each
//! after a while. Every fault is logged with its target and times.
//!
//! The kinds cycle in a shuffled order, so that every enabled kind comes
//! up once per cycle; a kind that cannot be applied at that moment (too
//! many agents or members already impaired) waits for the next cycle. At
//! most a minority of the agents is impaired at once, and at most a
//! minority of the etcd members is down, so the cluster keeps a quorum and
//! some agent to move tasks to.

use std::str::FromStr;
use std::time::Duration;

use eretes::NodeAction;
use eretes_etcd::testing::EtcdCluster;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use tokio::time::Instant;

use super::agents::{Agent, AgentSettings};
use crate::witness::now_us;

/// The longest a node command may take (the client has no timeout of its
/// own past connecting, and a frozen agent never answers).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// `kill -9` of an agent, restarted 1–3 s later.
    Kill,
    /// SIGSTOP of an agent for 1–3× the lease TTL, then SIGCONT.
    Freeze,
    /// An agent cut off from every etcd member for 1.5–3× the TTL.
    Partition,
    /// `kill -9` of an etcd member that is not the leader, restarted 2–5 s later.
    EtcdKill,
    /// `kill -9` of the etcd leader, restarted 2–5 s later.
    EtcdLeaderKill,
    /// Node commands: drain (undone by unfreeze 1–3 s later), freeze then
    /// unfreeze, balance.
    Commands,
}

impl FaultKind {
    /// Every kind, in the order `--faults` lists them.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::Kill,
        FaultKind::Freeze,
        FaultKind::Partition,
        FaultKind::EtcdKill,
        FaultKind::EtcdLeaderKill,
        FaultKind::Commands,
    ];

    /// The name `--faults` and the report use.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Freeze => "freeze",
            FaultKind::Partition => "partition",
            FaultKind::EtcdKill => "etcd-kill",
            FaultKind::EtcdLeaderKill => "etcd-leader-kill",
            FaultKind::Commands => "commands",
        }
    }
}

impl FromStr for FaultKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        FaultKind::ALL
            .into_iter()
            .find(|kind| kind.name() == text)
            .ok_or_else(|| {
                let names: Vec<_> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown fault {text:?}: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// One injected fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRecord {
    /// Its kind's name (for commands, the command: `drain`, `freeze`, `balance`).
    pub kind: String,
    /// The agent's name or the etcd member (`etcd-m1`).
    pub target: String,
    /// When it began (µs since the Unix epoch).
    pub started_us: u64,
    /// When it was healed, once it was.
    pub ended_us: Option<u64>,
}

/// What heals a fault.
#[derive(Debug, Clone, Copy)]
enum Heal {
    RestartAgent(usize),
    Thaw(usize),
    Reconnect(usize),
    RestartMember(usize),
    UnfreezeNode(usize),
}

/// The nemesis.
pub struct Nemesis {
    rng: StdRng,
    kinds: Vec<FaultKind>,
    cycle: Vec<FaultKind>,
    ttl: Duration,
    /// Healing actions due, with the index of their fault in `log`.
    pending: Vec<(Instant, Heal, usize)>,
    /// Every fault so far.
    pub log: Vec<FaultRecord>,
}

impl Nemesis {
    /// A nemesis injecting `kinds`, drawing from `rng`.
    pub fn new(rng: StdRng, kinds: Vec<FaultKind>, ttl: Duration) -> Nemesis {
        Nemesis {
            rng,
            kinds,
            cycle: Vec::new(),
            ttl,
            pending: Vec::new(),
            log: Vec::new(),
        }
    }

    /// How long to wait before the next fault: 1–3 s, or 0.5–1.5× the TTL
    /// when that is longer.
    pub fn next_pause(&mut self) -> Duration {
        let base = Duration::from_secs(2).max(self.ttl);
        base.mul_f64(self.rng.gen_range(0.5..1.5))
    }

    fn impaired_agents(&self, agents: &[Agent]) -> usize {
        agents
            .iter()
            .enumerate()
            .filter(|(index, agent)| {
                agent.pid().is_none()
                    || agent.frozen
                    || agent.partitioned()
                    || self
                        .pending
                        .iter()
                        .any(|(_, heal, _)| matches!(heal, Heal::UnfreezeNode(i) if i == index))
            })
            .count()
    }

    fn down_members(&self) -> Vec<usize> {
        self.pending
            .iter()
            .filter_map(|(_, heal, _)| match heal {
                Heal::RestartMember(index) => Some(*index),
                _ => None,
            })
            .collect()
    }

    /// Inject the next fault of the cycle that can be applied now.
    pub async fn strike(
        &mut self,
        agents: &mut [Agent],
        cluster: &mut EtcdCluster,
    ) -> Option<FaultRecord> {
        if self.cycle.is_empty() {
            self.cycle = self.kinds.clone();
            self.cycle.shuffle(&mut self.rng);
        }
        for position in 0..self.cycle.len() {
            let kind = self.cycle[position];
            if let Some(record) = self.try_strike(kind, agents, cluster).await {
                self.cycle.remove(position);
                return Some(record);
            }
        }
        None
    }

    async fn try_strike(
        &mut self,
        kind: FaultKind,
        agents: &mut [Agent],
        cluster: &mut EtcdCluster,
    ) -> Option<FaultRecord> {
        let now = Instant::now();
        let ttl = self.ttl;
        let agent_budget = agents.len().saturating_sub(1) / 2;
        let member_budget = cluster.size().saturating_sub(1) / 2;
        let healthy: Vec<usize> = (0..agents.len())
            .filter(|&i| {
                let agent = &agents[i];
                agent.pid().is_some()
                    && !agent.frozen
                    && !agent.partitioned()
                    && !self
                        .pending
                        .iter()
                        .any(|(_, heal, _)| matches!(heal, Heal::UnfreezeNode(n) if *n == i))
            })
            .collect();
        let agent_room = self.impaired_agents(agents) < agent_budget.max(1);
        let (label, target, heal, after) = match kind {
            FaultKind::Kill | FaultKind::Freeze | FaultKind::Partition => {
                if !agent_room {
                    return None;
                }
                let index = *healthy.choose(&mut self.rng)?;
                let agent = &mut agents[index];
                match kind {
                    FaultKind::Kill => {
                        agent.kill().await;
                        let after = Duration::from_millis(self.rng.gen_range(1000..3000));
                        (
                            kind.name().to_string(),
                            index,
                            Heal::RestartAgent(index),
                            after,
                        )
                    }
                    FaultKind::Freeze => {
                        agent.freeze(true);
                        let after = ttl.mul_f64(self.rng.gen_range(1.0..3.0));
                        (kind.name().to_string(), index, Heal::Thaw(index), after)
                    }
                    _ => {
                        agent.partition(true);
                        let after = ttl.mul_f64(self.rng.gen_range(1.5..3.0));
                        (
                            kind.name().to_string(),
                            index,
                            Heal::Reconnect(index),
                            after,
                        )
                    }
                }
            }
            FaultKind::EtcdKill | FaultKind::EtcdLeaderKill => {
                if self.down_members().len() >= member_budget {
                    return None;
                }
                let leader = cluster.leader().await?;
                let member = if kind == FaultKind::EtcdLeaderKill {
                    leader
                } else {
                    let others: Vec<usize> = (0..cluster.size())
                        .filter(|&m| m != leader && !self.down_members().contains(&m))
                        .collect();
                    *others.choose(&mut self.rng)?
                };
                cluster.kill(member);
                let after = Duration::from_millis(self.rng.gen_range(2000..5000));
                let record = self.record(kind.name(), format!("etcd-m{member}"));
                self.pending
                    .push((now + after, Heal::RestartMember(member), self.log.len() - 1));
                return Some(record);
            }
            FaultKind::Commands => {
                let index = *healthy.choose(&mut self.rng)?;
                let choice = self.rng.gen_range(0..3);
                let (action, label) = match choice {
                    0 if agent_room => (NodeAction::Drain, "drain"),
                    1 if agent_room => (NodeAction::Freeze, "freeze-node"),
                    _ => (NodeAction::Balance, "balance"),
                };
                // Any live agent can queue a command for any node.
                let node = agents[index].name.clone();
                let sender = healthy.choose(&mut self.rng).copied().unwrap_or(index);
                let sent = tokio::time::timeout(
                    COMMAND_TIMEOUT,
                    agents[sender].client.node_command(&node, &action),
                )
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    return None;
                }
                if matches!(action, NodeAction::Balance) {
                    // Nothing to undo: it ends as it starts.
                    let mut record = self.record(label, node);
                    record.ended_us = Some(record.started_us);
                    if let Some(last) = self.log.last_mut() {
                        last.ended_us = record.ended_us;
                    }
                    return Some(record);
                }
                let after = Duration::from_millis(self.rng.gen_range(1000..3000));
                (label.to_string(), index, Heal::UnfreezeNode(index), after)
            }
        };
        let record = self.record(&label, agents[target].name.clone());
        self.pending.push((now + after, heal, self.log.len() - 1));
        Some(record)
    }

    fn record(&mut self, kind: &str, target: String) -> FaultRecord {
        let record = FaultRecord {
            kind: kind.to_string(),
            target,
            started_us: now_us(),
            ended_us: None,
        };
        tracing::info!(kind, target = %record.target, "fault");
        self.log.push(record.clone());
        record
    }

    /// Heal every fault whose time has come (all of them with `all`).
    /// Returns the faults healed, as their log entries.
    pub async fn heal_due(
        &mut self,
        agents: &mut [Agent],
        cluster: &mut EtcdCluster,
        settings: &AgentSettings,
        all: bool,
    ) -> Vec<FaultRecord> {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self
            .pending
            .drain(..)
            .partition(|(at, _, _)| all || *at <= now);
        self.pending = later;
        let mut healed = Vec::new();
        for (_, heal, entry) in due {
            let done = match heal {
                Heal::RestartAgent(index) => agents[index].spawn(settings).is_ok(),
                Heal::Thaw(index) => {
                    agents[index].freeze(false);
                    true
                }
                Heal::Reconnect(index) => {
                    agents[index].partition(false);
                    true
                }
                Heal::RestartMember(member) => cluster.restart(member).is_ok(),
                Heal::UnfreezeNode(index) => {
                    // Through any agent that answers, the node's own first.
                    let node = agents[index].name.clone();
                    let mut sent = false;
                    // A stopped agent accepts connections and never answers:
                    // skip those, and bound every call.
                    for sender in std::iter::once(index).chain(0..agents.len()) {
                        let agent = &agents[sender];
                        if agent.frozen || agent.pid().is_none() {
                            continue;
                        }
                        let call = agent.client.node_command(&node, &NodeAction::Unfreeze);
                        if let Ok(Ok(())) = tokio::time::timeout(COMMAND_TIMEOUT, call).await {
                            sent = true;
                            break;
                        }
                    }
                    sent
                }
            };
            if done || all {
                self.log[entry].ended_us = Some(now_us());
                healed.push(self.log[entry].clone());
            } else {
                // Not healed yet: again in a second.
                self.pending
                    .push((now + Duration::from_secs(1), heal, entry));
            }
        }
        healed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_names_round_trip_and_an_unknown_one_is_named() {
        for kind in FaultKind::ALL {
            assert_eq!(kind.name().parse::<FaultKind>().unwrap(), kind);
        }
        let error = "etcd-explode".parse::<FaultKind>().unwrap_err();
        assert!(error.contains("etcd-explode") && error.contains("etcd-leader-kill"));
    }
}
