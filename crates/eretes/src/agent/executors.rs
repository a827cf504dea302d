//! The agent's executors behind one handler: a task whose properties hold a
//! `"kubernetes"` spec runs as a Kubernetes Job (with `--kubernetes`), any
//! other as a process.

use std::future::Future;
use std::pin::Pin;

use eretes_exec::ProcessHandler;
use eretes_kube::{KubeHandler, KubeSpec};
use eretes_protocol::TaskRecord;
use eretes_runtime::{ErrorPolicy, StateContext, StatefulHandler, Step};

/// Routes each run to the executor its spec names.
pub struct Executors {
    /// Process tasks (`{"process": ...}`).
    pub process: ProcessHandler,
    /// Kubernetes tasks (`{"kubernetes": ...}`), when the agent runs them.
    pub kubernetes: Option<KubeHandler>,
}

/// Why this agent runs no Kubernetes task.
const NO_KUBERNETES: &str =
    "this agent does not run Kubernetes tasks: start it with --kubernetes and --allow-images";

// Written out rather than with `#[async_trait]`: the executor's own boxed
// future is handed on as it is, so routing adds no allocation or state to
// a run (a process task's run is held for as long as it runs).
impl StatefulHandler for Executors {
    fn run<'life0, 'async_trait>(
        &'life0 self,
        ctx: StateContext,
    ) -> Pin<Box<dyn Future<Output = Step> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        if !KubeSpec::is_in(&ctx.task.task.spec.properties.value()) {
            return self.process.run(ctx);
        }
        match &self.kubernetes {
            Some(kubernetes) => kubernetes.run(ctx),
            None => Box::pin(std::future::ready(Step::Fatal(NO_KUBERNETES.into()))),
        }
    }

    fn error_policy(&self, task: &TaskRecord) -> Option<ErrorPolicy> {
        if !KubeSpec::is_in(&task.spec.properties.value()) {
            return self.process.error_policy(task);
        }
        self.kubernetes.as_ref()?.error_policy(task)
    }
}
