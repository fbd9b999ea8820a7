//! The worker as one node of several sharing a database queue.
//!
//! With the database store, the worker's jobs are a mirror of the shared table: its own
//! writes land there first (each on the version it was decided from, see
//! [`crate::store::Write`]), and the other nodes' changes come back as
//! [`ClusterEvent::Changed`] rows, which replace the mirror's copy when they are newer. A
//! write that meets another node's change is refused as a whole
//! ([`StoreError::Conflict`]); the worker takes the row as it is now and decides again
//! (a lost claim starts nothing, a cancel is tried again on the new record, an outcome of a
//! job another node took over is dropped).
//!
//! Running jobs belong to the node that claimed them, under a lease the store renews.
//! After each renewal the worker tells every trainer's supervisor how long the lease
//! surely holds, minus the time a stop takes: renewals that stop arriving (this daemon
//! paused, or cut off from the database) stop the trainers before any other node may take
//! their jobs over. A job this node runs whose row says otherwise (another owner, a cancel,
//! a lease not renewed) has its trainer stopped at once, and nothing of its end is written.
//! Running jobs whose lease has lapsed, anyone's, arrive as [`ClusterEvent::Expired`] and
//! are recovered as a boot recovers a crash's: requeued first, the cut start counted, or
//! failed when out of attempts.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Pending, StopReason, Worker, WorkerError};
use crate::job::{JobId, Status};
use crate::store::{ClusterEvent, Fence, Placement, Remote, StoreError};

/// What the database store gives the worker at boot, beside the jobs.
pub struct ClusterBoot {
    /// This node's name.
    pub node_id: String,
    pub lease: Duration,
    /// Each record's version as replay read it.
    pub versions: HashMap<JobId, u64>,
    /// The shared ranks of the unfinished jobs of this node's recovery order.
    pub ranks: HashMap<JobId, u64>,
    /// Jobs other nodes run, with their owners.
    pub elsewhere: HashMap<JobId, String>,
    pub events: mpsc::Receiver<ClusterEvent>,
}

/// Slack kept between the end of a trainer's stop and the moment its lease could lapse: for
/// the delivery of the renewal's answer and the supervisor's own poll.
const LEASE_SLACK: Duration = Duration::from_millis(1000);

/// The worker's cluster state.
pub(super) struct ClusterState {
    pub(super) node_id: String,
    pub(super) lease: Duration,
    pub(super) versions: HashMap<JobId, u64>,
    pub(super) elsewhere: HashMap<JobId, String>,
    pub(super) events: mpsc::Receiver<ClusterEvent>,
    /// When each running job of this node was claimed (its start landed): a renewal asked
    /// before that does not list it.
    pub(super) claimed: HashMap<JobId, Instant>,
    /// Rows read again after a refused write that could not say what it met.
    pub(super) reloaded: mpsc::UnboundedReceiver<Vec<Remote>>,
    pub(super) reload_tx: mpsc::UnboundedSender<Vec<Remote>>,
}

impl ClusterState {
    pub(super) fn new(boot: ClusterBoot) -> ClusterState {
        let (reload_tx, reloaded) = mpsc::unbounded_channel();
        ClusterState {
            node_id: boot.node_id,
            lease: boot.lease,
            versions: boot.versions,
            elsewhere: boot.elsewhere,
            events: boot.events,
            claimed: HashMap::new(),
            reloaded,
            reload_tx,
        }
    }

    /// The next event of the store or of a reload.
    pub(super) async fn next(&mut self) -> Option<ClusterEvent> {
        tokio::select! {
            event = self.events.recv() => event,
            Some(rows) = self.reloaded.recv() => Some(ClusterEvent::Changed(rows)),
        }
    }
}

/// The next cluster event, or never without the database store.
pub(super) async fn next_event(cluster: &mut Option<ClusterState>) -> Option<ClusterEvent> {
    match cluster {
        Some(cluster) => cluster.next().await,
        None => std::future::pending().await,
    }
}

impl Worker {
    /// The fence a pending change needs.
    pub(super) fn fence_of(pending: &Pending) -> Fence {
        match pending {
            Pending::Cancel { .. } => Fence::Any,
            Pending::Recover { .. } => Fence::Recover,
            _ => Fence::Owner,
        }
    }

    pub(super) fn on_cluster(&mut self, event: ClusterEvent) {
        match event {
            ClusterEvent::Changed(rows) => {
                for row in rows {
                    self.handle(super::Command::Remote(Box::new(row)));
                }
            }
            ClusterEvent::Expired(rows) => {
                for row in rows {
                    self.handle(super::Command::Takeover(Box::new(row)));
                }
            }
            ClusterEvent::Renewed {
                held,
                asked_at,
                until,
            } => self.renewed(held, asked_at, until),
        }
    }

    /// A renewal answered: the trainers of the jobs still held get the new deadline; the
    /// jobs of this node it did not renew are lost, and their trainers stop.
    fn renewed(
        &mut self,
        held: Vec<JobId>,
        asked_at: std::time::Instant,
        until: std::time::Instant,
    ) {
        let Some(cluster) = self.cluster.as_ref() else {
            return;
        };
        let held: std::collections::HashSet<JobId> = held.into_iter().collect();
        let asked_at = Instant::from_std(asked_at);
        let grace = self.executor.lease_grace(cluster.lease);
        let window = until
            .saturating_duration_since(std::time::Instant::now())
            .saturating_sub(grace + LEASE_SLACK);
        let mut lost = Vec::new();
        for (id, run) in self.running.iter_mut() {
            if held.contains(id) {
                run.execution.renew(window, grace);
                continue;
            }
            let claimed = cluster.claimed.get(id).copied();
            if claimed.is_some_and(|at| at < asked_at) && run.stop_reason.is_none() {
                lost.push(*id);
            }
        }
        for id in lost {
            warn!(job_id = %id, "this node's lease on the job was not renewed (it lapsed, or another node changed the job); its trainer stops");
            if let Some(run) = self.running.get_mut(&id) {
                run.stop_reason = Some(StopReason::Lost);
                run.execution.stop();
            }
            self.reload_later(id);
        }
    }

    /// Reads a job's row again in a moment and applies it.
    pub(super) fn reload_later(&self, id: JobId) {
        let Some(cluster) = self.cluster.as_ref() else {
            return;
        };
        let store = self.store.clone();
        let tx = cluster.reload_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(Ok(rows)) = store.reload(vec![id]).await {
                let _ = tx.send(rows);
            }
        });
    }

    /// A row as the database holds it, newer than this node's copy or not.
    pub(super) fn apply_remote(&mut self, remote: Remote) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        let id = remote.job.id;
        let known = cluster.versions.get(&id).copied().unwrap_or(0);
        if remote.version <= known {
            return;
        }
        cluster.versions.insert(id, remote.version);
        let running_here = matches!(remote.placement, Placement::Running(_))
            && remote.owner.as_deref() == Some(cluster.node_id.as_str());
        if !running_here {
            cluster.claimed.remove(&id);
            if let Some(run) = self.running.get_mut(&id)
                && run.stop_reason.is_none()
            {
                warn!(job_id = %id, status = %remote.job.status, owner = remote.owner.as_deref().unwrap_or("none"), "the job changed on another node while its trainer ran here; the trainer stops");
                run.stop_reason = Some(StopReason::Lost);
                run.execution.stop();
            }
        }
        match remote.placement {
            Placement::Running(_) if !running_here => {
                self.queue.remove(id);
                cluster.elsewhere.insert(
                    id,
                    remote
                        .owner
                        .clone()
                        .unwrap_or_else(|| "another node".into()),
                );
            }
            Placement::Running(_) => {}
            Placement::Queued(rank) => {
                cluster.elsewhere.remove(&id);
                if !self.running.contains_key(&id) {
                    let needs = super::plan::needs(&self.config, &remote.job);
                    self.queue.insert_queued(rank, id, needs);
                }
            }
            Placement::Off => {
                cluster.elsewhere.remove(&id);
                if !self.running.contains_key(&id) {
                    self.queue.remove(id);
                }
            }
        }
        if remote.job.status.is_finished() && !self.running.contains_key(&id) {
            tokio::spawn(self.executor.forget_job(id));
        }
        self.put(remote.job);
        self.changed();
    }

    /// A running job whose owner's lease has lapsed: recovered as a boot recovers a
    /// crash's, unless this node still runs its trainer (then the trainer stops first,
    /// and the next turn takes it over).
    pub(super) fn take_over(&mut self, remote: Remote) {
        let id = remote.job.id;
        self.apply_remote(remote.clone());
        if self.running.contains_key(&id) {
            if let Some(run) = self.running.get_mut(&id)
                && run.stop_reason.is_none()
            {
                run.stop_reason = Some(StopReason::Lost);
                run.execution.stop();
            }
            return;
        }
        let Some(cluster) = self.cluster.as_ref() else {
            return;
        };
        if cluster.versions.get(&id).copied() != Some(remote.version)
            || remote.job.status != Status::Running
        {
            return;
        }
        let mut job = remote.job;
        let owner = remote.owner.unwrap_or_else(|| "a node".into());
        let rank = match remote.placement {
            Placement::Running(rank) => rank,
            _ => crate::store::FIRST_QUEUED_RANK,
        };
        let now = self.clock.now();
        if job.attempts >= self.config.max_attempts {
            let reason = format!(
                "not started again: started {} times, the last start cut short when node {owner} stopped renewing its lease (max_attempts = {})",
                job.attempts, self.config.max_attempts
            );
            warn!(job_id = %id, %owner, attempts = job.attempts, "a lapsed job is out of attempts; marked failed");
            job.finish(Status::Failed, Some(reason), now);
            self.write(Pending::Recover {
                job,
                placement: Placement::Off,
            });
            return;
        }
        info!(job_id = %id, %owner, attempts = job.attempts, "the lease of a running job lapsed; taken over, to run again first");
        job.requeue_interrupted(true, now);
        self.write(Pending::Recover {
            job,
            placement: Placement::Queued(rank),
        });
    }

    /// A write met another node's change (or a claim that no longer holds): nothing of it
    /// was stored. Its waiter is answered from the row as it is now, and the worker goes on
    /// from that row.
    pub(super) fn conflicted(&mut self, pending: Pending, current: Option<Box<Remote>>) {
        let id = pending.job_id();
        if current.is_none() {
            self.reload_later(id);
        }
        let current = current.map(|c| *c);
        if let Some(remote) = current.clone() {
            self.apply_remote(remote);
        }
        let conflict = || StoreError::Conflict { current: None };
        match pending {
            Pending::Submit {
                job, respond_to, ..
            } => {
                self.settle_claim(id, false);
                let answer = match &current {
                    Some(existing) if existing.job.same_request(&job) => {
                        Ok(super::Submitted::Existing(existing.job.clone()))
                    }
                    Some(_) => Err(WorkerError::Conflict { id }),
                    None => Err(conflict().into()),
                };
                let _ = respond_to.send(answer);
            }
            Pending::Start { respond_to, .. } => {
                info!(job_id = %id, "another node claimed the job first");
                self.starting -= 1;
                self.gpus_in_use.remove(&id);
                self.probe_answered(id);
                if current.is_none() {
                    // Until the row is read again, the job is not this node's to start.
                    self.queue.remove(id);
                }
                if let Some(respond_to) = respond_to {
                    let _ = respond_to.send(Err(conflict().into()));
                }
            }
            Pending::Finish { job } => {
                warn!(job_id = %id, status = %job.status, "the job's end is not recorded: this node no longer holds it (its lease lapsed, or another node changed it)");
                self.unrecorded.remove(&id);
            }
            Pending::Cancel { respond_to, .. } => {
                // Decided again on the record as it is now.
                if current.is_some() {
                    self.cancel(id, respond_to);
                } else {
                    let _ = respond_to.send(Err(conflict().into()));
                }
            }
            Pending::Retry { respond_to, .. } => {
                if current.is_some() {
                    self.retry(id, respond_to);
                } else {
                    let _ = respond_to.send(Err(conflict().into()));
                }
            }
            Pending::StageDone { stage, .. } => {
                // The dropped acknowledgement stops the pipeline.
                warn!(job_id = %id, %stage, "the stage is not recorded: this node no longer holds the job; its trainer stops");
                if let Some(run) = self.running.get_mut(&id) {
                    run.stop_reason = Some(StopReason::Lost);
                    run.execution.stop();
                }
            }
            Pending::Requeue { .. } | Pending::Wandb { .. } | Pending::Recover { .. } => {}
        }
    }
}
