//! Node commands (freeze, drain, balance, stop a task), taken from the
//! store one at a time in queue order.

use std::time::Duration;

use eretes_protocol::{NodeCommand, TaskId};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::stats::NodeStats;

use super::{MainLoop, StopReason, TakenCommand};

impl MainLoop {
    /// Take the oldest queued command, one at a time so order is kept.
    pub(super) fn next_command(&mut self) {
        if self.taking_command.is_some() || self.lease.is_none() || self.command_retry_at.is_some()
        {
            return;
        }
        let Some((revision, key)) = self.commands.pop_first() else {
            return;
        };
        let coordinator = self.coordinator.clone();
        self.taking_command = Some(Box::pin(async move {
            let result = coordinator.take_node_command(&key, revision).await;
            (key, revision, result)
        }));
    }

    pub(super) fn on_command_taken(&mut self, (key, revision, result): TakenCommand) {
        match result {
            Ok(Some(bytes)) => match NodeCommand::decode(&bytes) {
                Ok(command) => {
                    info!(node = %self.config.name, command = command.name(), "applying node command");
                    self.apply_command(command);
                }
                Err(error) => {
                    NodeStats::bump(&self.stats.commands_rejected);
                    warn!(node = %self.config.name, key, %error, "discarding node command");
                }
            },
            Ok(None) => {}
            Err(error) => {
                NodeStats::bump(&self.stats.store_errors);
                warn!(node = %self.config.name, key, %error, "could not take node command; retrying");
                // Keep its place at the head of the queue so order holds.
                self.commands.insert(revision, key);
                self.command_retry_at = Some(Instant::now() + Duration::from_millis(500));
            }
        }
    }

    pub(super) fn apply_command(&mut self, command: NodeCommand) {
        NodeStats::bump(&self.stats.commands_applied);
        match command {
            NodeCommand::Freeze => self.frozen = true,
            NodeCommand::Unfreeze => {
                if self.shutting_down.is_none() {
                    self.frozen = false;
                }
            }
            NodeCommand::Balance => self.balance(),
            NodeCommand::Drain => {
                self.frozen = true;
                let ids: Vec<TaskId> = self.running.keys().cloned().collect();
                for id in ids {
                    self.stop_task(&id, StopReason::Release);
                }
            }
            NodeCommand::StopTask(id) => self.stop_task(&id, StopReason::Release),
        }
    }
}
