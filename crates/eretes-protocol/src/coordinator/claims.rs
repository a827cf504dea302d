//! Claims: the single claim, the batch that carries up to
//! [`MAX_CLAIM_BATCH`] tasks in one transaction (and falls back to one
//! transaction per task when any would fail), the read-back of a claim
//! that lost, and the read of what a claim checks.

use super::*;

impl Coordinator {
    /// What claiming `id` for `node` checks and writes. Shared by the single
    /// and the batched claim so both write exactly the same records.
    ///
    /// A claim that parks the task writes its result, which holds the spec:
    /// `spec` must then be the record's (read at `basis.task_revision`).
    pub(super) fn plan_claim(
        &self,
        node: &NodeName,
        lease: LeaseId,
        id: &TaskId,
        basis: &ClaimBasis,
        spec: Option<&TaskSpec>,
    ) -> ClaimPlan {
        let (task_key, owner_key, run_key) = (self.ns.task(id), self.ns.owner(id), self.ns.run(id));
        let takeovers = basis.run.takeovers + u32::from(basis.run.open);
        let run = RunRecord {
            claims: basis.run.claims + 1,
            takeovers,
            open: true,
            node: Some(node.clone()),
        };
        let compares = vec![
            Compare::mod_revision_is(task_key.clone(), basis.task_revision),
            Compare::absent(owner_key.clone()),
            Compare::mod_revision_is(run_key.clone(), basis.run_revision),
        ];
        if takeovers <= self.takeover_limit {
            let owner = OwnerRecord {
                node: node.clone(),
                group: basis.group.clone(),
            };
            let writes = vec![
                TxnOp::Put(PutRequest::new(owner_key, encode(&owner)).with_lease(lease)),
                put(run_key, encode(&run)),
                get(task_key),
            ];
            return ClaimPlan {
                compares,
                writes,
                run,
                parked: None,
            };
        }
        // A parked task never ran under this claim: record the takeovers, not a run.
        let parked_run = RunRecord {
            claims: basis.run.claims,
            open: false,
            ..run.clone()
        };
        let result = ResultRecord {
            outcome: Outcome::Failed,
            result: Value::Null,
            error: Some(format!(
                "parked: its owners died or lost their lease {takeovers} times while running it \
                 (limit {}); suspected poison task",
                self.takeover_limit
            )),
            spec: spec
                .cloned()
                .unwrap_or_else(|| TaskSpec::new(basis.group.clone(), Value::Null)),
            epoch: 0,
            node: node.clone(),
            runs: parked_run,
            finished_at_ms: now_ms(),
        };
        let mut writes = vec![
            delete(task_key),
            delete(run_key),
            put(self.ns.result(id), encode(&result)),
        ];
        writes.extend(self.forget_machine(id));
        ClaimPlan {
            compares,
            writes,
            run,
            parked: Some(takeovers),
        }
    }

    /// Claim a task for `node` under its `lease`: one transaction that checks
    /// the task still exists as seen, has no owner and its run record is as
    /// seen, then writes the owner record (under the lease) and the run record.
    /// If the previous owner never released the task, this claim is a takeover;
    /// past the takeover limit the task is retired as failed instead.
    pub async fn claim(
        &self,
        node: &NodeName,
        lease: LeaseId,
        id: &TaskId,
        basis: &ClaimBasis,
    ) -> Result<ClaimOutcome, ProtocolError> {
        let mut plan = self.plan_claim(node, lease, id, basis, None);
        if plan.parked.is_some() {
            // Parking writes the result, spec included: read the record
            // first; the transaction checks it is still the one read.
            let spec = self.task_spec_at(id, basis).await?;
            plan = self.plan_claim(node, lease, id, basis, Some(&spec));
        }
        let txn = Txn {
            compares: plan.compares,
            success: plan.writes,
            failure: self.task_key_reads(id).to_vec(),
        };
        let response = self.store.txn(txn).await?;
        if !response.succeeded {
            let mut responses = response.responses.iter();
            return Ok(ClaimOutcome::Lost(task_keys_read(
                &mut responses,
                response.revision,
            )));
        }
        if let Some(takeovers) = plan.parked {
            return Ok(ClaimOutcome::Parked { takeovers });
        }
        self.claimed(
            node,
            id,
            basis,
            response.revision,
            plan.run,
            response.responses.last(),
        )
        .await
    }

    /// The spec to park `id` with: its record's, if the record is still at
    /// the basis' revision. Otherwise any will do: the parking transaction's
    /// compare then fails, and its failure branch reads the keys back.
    pub(super) async fn task_spec_at(
        &self,
        id: &TaskId,
        basis: &ClaimBasis,
    ) -> Result<TaskSpec, ProtocolError> {
        let key = self.ns.task(id);
        let record = self
            .store
            .get_key(&key)
            .await?
            .filter(|kv| kv.mod_revision == basis.task_revision)
            // Garbage cannot be claimed, but its takeovers can still park
            // it: its result then has no properties.
            .and_then(|kv| decode_task(&key, &kv.value).ok());
        Ok(record.map_or_else(
            || TaskSpec::new(basis.group.clone(), Value::Null),
            |record| record.spec,
        ))
    }

    /// The claim of `id` at `epoch`, with the task record its transaction
    /// read (`read`, the answer to the record's get). The claim checked the
    /// record's revision, so it is the record the claimant decided on; were
    /// it garbage anyway (a basis made by hand), the claim is undone (its
    /// owner record deleted, its run record put back as `basis` saw it,
    /// fenced by the epoch) and the record named. Should the undo itself
    /// fail, the owner record goes with the claimant's lease.
    pub(super) async fn claimed(
        &self,
        node: &NodeName,
        id: &TaskId,
        basis: &ClaimBasis,
        epoch: Revision,
        run: RunRecord,
        read: Option<&TxnOpResponse>,
    ) -> Result<ClaimOutcome, ProtocolError> {
        let key = self.ns.task(id);
        let decoded = match got(read) {
            Some(kv) => decode_task(&key, &kv.value),
            None => Err(MalformedValue {
                kind: "task",
                key: key.clone(),
                reason: "the claim read no record".into(),
            }),
        };
        match decoded {
            Ok(record) => Ok(ClaimOutcome::Claimed(Claim {
                task: id.clone(),
                epoch,
                node: node.clone(),
                record: Arc::new(record),
                run,
                takeover: basis.run.open,
            })),
            Err(why) => {
                let run_key = self.ns.run(id);
                let run = if basis.run_revision == 0 {
                    delete(run_key)
                } else {
                    put(run_key, encode(&basis.run))
                };
                let undo = Txn::new()
                    .when(self.fence_epoch(id, epoch))
                    .and_then(delete(self.ns.owner(id)))
                    .and_then(run);
                self.store.txn(undo).await?;
                Err(ProtocolError::Malformed(why))
            }
        }
    }

    /// Read what a claim of each of `ids` checks: its task, owner and run
    /// records, each id's three in one transaction with up to
    /// [`MAX_CLAIM_BATCH`] others (three reads per task stay under etcd's
    /// default limit of 128 operations per transaction). A node reads this
    /// for a task whose owner went while the node kept only a count of what
    /// that owner ran (see the runtime's cache), before it claims the task.
    /// Answers are in input order.
    pub async fn read_task_keys(&self, ids: &[TaskId]) -> Result<Vec<TaskKeys>, ProtocolError> {
        let mut answers = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(MAX_CLAIM_BATCH) {
            let mut txn = Txn::new();
            for id in chunk {
                txn.success.extend(self.task_key_reads(id));
            }
            let response = self.store.txn(txn).await?;
            let mut responses = response.responses.iter();
            for _ in chunk {
                answers.push(task_keys_read(&mut responses, response.revision));
            }
        }
        Ok(answers)
    }

    /// Claim several tasks in one transaction: every task's checks must hold,
    /// and then every task is claimed at the same revision (which is each
    /// one's epoch). When the transaction fails because some other node got
    /// to one of the tasks first, its failure branch has read every task's
    /// keys: the tasks whose checks failed come back `Lost` with them, and
    /// the others are claimed again in one transaction (up to
    /// [`BATCH_ATTEMPTS`] in all), then one by one. So one contested task
    /// never costs the others their claim, nor the store a transaction per
    /// task. A task due to be parked makes each task be claimed on its own.
    /// At most [`MAX_CLAIM_BATCH`] tasks go into one transaction; larger
    /// batches are split. Outcomes are in input order.
    pub async fn claim_batch(
        &self,
        node: &NodeName,
        lease: LeaseId,
        tasks: &[(TaskId, ClaimBasis)],
    ) -> Vec<Result<ClaimOutcome, ProtocolError>> {
        let mut outcomes = Vec::with_capacity(tasks.len());
        for chunk in tasks.chunks(MAX_CLAIM_BATCH) {
            outcomes.extend(self.claim_chunk(node, lease, chunk).await);
        }
        outcomes
    }

    pub(super) async fn claim_chunk(
        &self,
        node: &NodeName,
        lease: LeaseId,
        tasks: &[(TaskId, ClaimBasis)],
    ) -> Vec<Result<ClaimOutcome, ProtocolError>> {
        let plans: Vec<ClaimPlan> = tasks
            .iter()
            .map(|(id, basis)| self.plan_claim(node, lease, id, basis, None))
            .collect();
        let mut outcomes: Vec<Option<Result<ClaimOutcome, ProtocolError>>> =
            tasks.iter().map(|_| None).collect();
        // Indexes of the tasks still to claim.
        let mut pending: Vec<usize> = (0..tasks.len()).collect();
        let parks = plans.iter().any(|plan| plan.parked.is_some());
        for _ in 0..BATCH_ATTEMPTS {
            if parks || pending.len() < 2 {
                break;
            }
            let mut txn = Txn::new();
            // Per task, the index of its record's read: its plan's last op.
            let mut reads = Vec::with_capacity(pending.len());
            for &index in &pending {
                let plan = &plans[index];
                txn.compares.extend(plan.compares.iter().cloned());
                txn.success.extend(plan.writes.iter().cloned());
                reads.push(txn.success.len() - 1);
                txn.failure.extend(self.task_key_reads(&tasks[index].0));
            }
            let response = match self.store.txn(txn).await {
                Ok(response) => response,
                Err(error) => {
                    for &index in &pending {
                        outcomes[index] = Some(Err(ProtocolError::Store(error.clone())));
                    }
                    pending.clear();
                    break;
                }
            };
            if response.succeeded {
                for (&index, read) in pending.iter().zip(reads) {
                    let (id, basis) = &tasks[index];
                    let read = response.responses.get(read);
                    let run = plans[index].run.clone();
                    outcomes[index] = Some(
                        self.claimed(node, id, basis, response.revision, run, read)
                            .await,
                    );
                }
                pending.clear();
                break;
            }
            // Some task's check failed: the failure branch read every
            // task's keys at that revision. The tasks whose checks failed
            // are lost, with what was read; the others go again together.
            let mut responses = response.responses.iter();
            let before = pending.len();
            pending.retain(|&index| {
                let keys = task_keys_read(&mut responses, response.revision);
                if claimable_as_seen(&keys, &tasks[index].1) {
                    return true;
                }
                outcomes[index] = Some(Ok(ClaimOutcome::Lost(keys)));
                false
            });
            if pending.len() == before {
                // Every check held when read back: the store and this
                // reading disagree; claim each on its own.
                break;
            }
        }
        let singles = futures::future::join_all(pending.iter().map(|&index| {
            let (id, basis) = &tasks[index];
            self.claim(node, lease, id, basis)
        }))
        .await;
        for (&index, outcome) in pending.iter().zip(singles) {
            outcomes[index] = Some(outcome);
        }
        outcomes
            .into_iter()
            .map(|outcome| outcome.expect("every task has an outcome"))
            .collect()
    }
}

impl Coordinator {
    /// The reads of what a claim of `id` checks: its task, owner and run
    /// records, in the order [`task_keys_read`] takes their answers.
    fn task_key_reads(&self, id: &TaskId) -> [TxnOp; 3] {
        [
            get(self.ns.task(id)),
            get(self.ns.owner(id)),
            get(self.ns.run(id)),
        ]
    }
}

/// One task's keys from the next three answers of `responses`, as
/// [`Coordinator::task_key_reads`] asked for them, read at `revision`.
fn task_keys_read<'a>(
    responses: &mut impl Iterator<Item = &'a TxnOpResponse>,
    revision: Revision,
) -> TaskKeys {
    TaskKeys {
        task: got(responses.next()),
        owner: got(responses.next()),
        run: got(responses.next()),
        revision,
    }
}

/// How many transactions a batch of claims tries, each without the tasks
/// the one before lost, before the tasks left are claimed one by one.
const BATCH_ATTEMPTS: usize = 3;

/// Whether a claim of a task at `basis` would pass its checks against
/// `keys`: the task as seen, no owner, the run record as seen.
fn claimable_as_seen(keys: &TaskKeys, basis: &ClaimBasis) -> bool {
    let revision = |kv: &Option<KeyValue>| kv.as_ref().map_or(0, |kv| kv.mod_revision);
    revision(&keys.task) == basis.task_revision
        && keys.owner.is_none()
        && revision(&keys.run) == basis.run_revision
}
