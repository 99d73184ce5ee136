//! Per-recipient queues: streaming delivery, acknowledgement, redelivery, negative acknowledgement, dead letters and
//! acknowledgement deadlines.
//!
//! Each recipient agency has one actor task ([`RecipientActor`]) that owns that agency's queue in memory: the copies
//! ready to send (in sequence order, so order is kept per sender-recipient pair when the agent acknowledges in
//! order), the copies waiting out a retry delay, and the copies sent but not yet acknowledged. The durable truth is
//! in the store (`q/` entries with their copies attached, `d/` records, and `c/` keys for copies an older broker
//! queued; see [`crate::records`]); the actor rebuilds its memory from it on start.
//! Once a copy's send is durable, the actor is the only writer of its delivery record, so it needs no locks, and it
//! batches: all commands waiting in its mailbox are handled together and their changes go to the store in one
//! commit.
//!
//! The actor does not wait for the commits of deliveries and acknowledgements: it submits them ([`Store::submit`])
//! and goes on (a copy queued while an acknowledgement's commit is under way goes out without waiting for it, and
//! the two commits can share one `fdatasync`); it handles their outcomes in the order it submitted them, which is
//! the order the store makes them durable. A copy whose "delivered" commit is under way is in `delivering`, one
//! whose acknowledgement's commit is under way in `acking`.
//! INVARIANT: a delivery record is read only when no commit of the actor's that changes it is under way. Commits
//! that read records of copies that may have one (negative acknowledgements, escalations, an acknowledgement of a
//! copy being delivered again) first wait for every commit under way ([`RecipientActor::settle`]); a copy being
//! acknowledged never goes back to the ready queue, and its acknowledgement wait does not run out (if the commit
//! fails, the copy goes back where it was: in flight, ready, or waiting out a retry delay).
//!
//! A send to a recipient whose actor is idle, with its agent connected, records the copy's first delivery attempt
//! (record and audit entry) in the send's own commit ([`Deliveries::reserve_direct`]), and the actor hands the copy
//! to the stream as soon as it hears of it, with no commit of its own: one `fdatasync` fewer per copy, and one fewer
//! on the way to the agent. The actor publishes how many such places its window has after each pass, and when the
//! agent's stream ends (none while anything is ready or being delivered, while loading, or with no stream open); a
//! copy recorded by its send that finds copies ahead of it all the same (a race with that publication) waits behind
//! them and goes out in order on that stream, still without another commit. If that stream has ended meanwhile,
//! the record's attempt never reached the agent, and the hand-off to its next stream is recorded as an attempt of its
//! own ("redelivered").
//!
//! INVARIANT: a copy is handed to a stream only after the audit entry of that delivery attempt is durable, and it
//! leaves the queue only when the recipient acknowledges it (or it is dead-lettered after `max_attempts`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesOrdered};
use prost::Message;
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};

use crate::{
    audit::{Actor, AuditEntry, EventType},
    metrics::metrics,
    records::{self, DeliveryRecord, DeliveryState},
    store::{Commit, Store, StoreError, Write},
};
use proto::pb;

/// Settings of the delivery engine.
#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    /// How long an agent has to acknowledge a delivered copy before it is delivered again.
    pub ack_wait: Duration,
    /// Attempts before a copy is dead-lettered.
    pub max_attempts: u32,
    /// Retry delay after a negative acknowledgement that names none.
    pub default_retry_delay: Duration,
    /// Copies sent to one agency and not yet acknowledged, at most.
    pub max_in_flight: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            ack_wait: Duration::from_secs(30),
            max_attempts: 5,
            default_retry_delay: Duration::from_secs(5),
            max_in_flight: 256,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("no delivery `{0}` is waiting for this agency")]
    UnknownDelivery(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the broker is shutting down")]
    ShuttingDown,
}

/// What a stream receives.
pub type StreamItem = Result<pb::Delivery, tonic::Status>;

/// A copy newly queued by a send.
#[derive(Clone, Debug)]
pub struct Enqueued {
    pub recipient: String,
    pub seq: u64,
    pub delivery_id: String,
    pub acknowledge_by_micros: Option<i64>,
    /// The copy (an encoded `pb::Delivery`) when its first delivery attempt was recorded in the send's own commit
    /// ([`Deliveries::reserve_direct`], [`record_attempt`]): the actor hands it to the stream without a commit of its
    /// own.
    pub recorded: Option<Vec<u8>>,
}

enum Command {
    Enqueue(Enqueued),
    Subscribe {
        stream: mpsc::Sender<StreamItem>,
        /// What the stream has read from its buffer since the actor last looked ([`DeliveryReceiver`]).
        reads: Reads,
    },
    Ack {
        delivery_id: String,
        actor: Actor,
        reply: oneshot::Sender<Result<(), DeliveryError>>,
    },
    Nack {
        delivery_id: String,
        actor: Actor,
        delay: Duration,
        reason: String,
        reply: oneshot::Sender<Result<bool, DeliveryError>>,
    },
    /// Every copy queued for the agency at start with a sequence number up to this one has been handed to its
    /// actor (see [`Deliveries::start`]). The actor answers once it has taken them in, and the loader waits for that,
    /// so that the copies waiting in the actor's mailbox never number more than [`LOAD_PROGRESS_EVERY`].
    LoadedUpTo(u64, oneshot::Sender<()>),
    /// Every copy queued for the agency at start has been handed to its actor.
    Loaded,
    /// The agent's stream read copies from its buffer ([`DeliveryReceiver`]): they are in its [`Reads`].
    Read,
}

/// The copies a stream has read from its buffer, for its actor to start their acknowledgement waits; the receiver
/// wakes the actor (`Command::Read`) only when the list was empty, so a stream read quickly wakes it once for many.
type Reads = Arc<Mutex<Vec<String>>>;

/// The receiving end of an agency's delivery stream. Reading a copy tells the recipient's actor, which starts the
/// copy's acknowledgement wait then: copies that wait unread in the buffer (an agent slower than the copies coming)
/// do not run out of time there, get sent again and use up their attempts while the agent is healthy.
pub struct DeliveryReceiver {
    inner: mpsc::Receiver<StreamItem>,
    /// Who to tell of each copy read: the engine, the recipient and the stream's reads; `None` for a receiver made in
    /// a test.
    read: Option<(Deliveries, String, Reads)>,
}

impl DeliveryReceiver {
    /// A receiver of a bare channel, which tells nobody what it reads (tests of the stream around it).
    pub fn detached(inner: mpsc::Receiver<StreamItem>) -> Self {
        Self { inner, read: None }
    }

    pub fn poll_recv(&mut self, context: &mut std::task::Context<'_>) -> std::task::Poll<Option<StreamItem>> {
        let polled = self.inner.poll_recv(context);
        if let std::task::Poll::Ready(Some(Ok(delivery))) = &polled {
            self.tell_read(&delivery.delivery_id);
        }
        polled
    }

    fn tell_read(&self, delivery_id: &str) {
        let Some((deliveries, recipient, reads)) = &self.read else { return };
        let was_empty = match reads.lock() {
            Ok(mut reads) => {
                reads.push(delivery_id.to_owned());
                reads.len() == 1
            }
            Err(_) => return,
        };
        if was_empty {
            deliveries.send_if_running(recipient, Command::Read);
        }
    }

    pub async fn recv(&mut self) -> Option<StreamItem> {
        std::future::poll_fn(|context| self.poll_recv(context)).await
    }

    pub fn try_recv(&mut self) -> Result<StreamItem, mpsc::error::TryRecvError> {
        let item = self.inner.try_recv()?;
        if let Ok(delivery) = &item {
            self.tell_read(&delivery.delivery_id);
        }
        Ok(item)
    }

    /// Stops the stream: the actor sees it closed.
    pub fn close(&mut self) {
        self.inner.close();
    }
}

/// Handle to the delivery engine. Cheap to clone.
#[derive(Clone)]
pub struct Deliveries {
    shared: Arc<Shared>,
}

struct Shared {
    store: Store,
    config: DeliveryConfig,
    actors: Mutex<HashMap<String, ActorHandle>>,
    next_seq: AtomicU64,
    /// The highest queue sequence number stored at start: the loader hands over copies up to it, and sends meanwhile
    /// take higher ones.
    stored_up_to: AtomicU64,
    shutdown: watch::Receiver<bool>,
    /// Called when a copy's acknowledgement deadline passes (escalation notices are sent through it).
    on_escalation: Mutex<Option<EscalationHook>>,
    /// Set by [`Deliveries::shutdown`] (under the `actors` lock): no actor starts after it, so none runs against a
    /// store that has closed, and none outlives the wait for them.
    stopped: std::sync::atomic::AtomicBool,
    /// The actor tasks, awaited on shutdown so that nothing holds the store afterwards.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Called with a delivery record whose acknowledgement deadline has passed (`escalated`), or whose copy was
/// dead-lettered (state [`DeliveryState::DeadLettered`]), once that is durable: the sender and the rule's escalation
/// agency are told ([`crate::exchange::Exchange::send_escalation_notices`]).
pub type EscalationHook = Arc<dyn Fn(DeliveryRecord) + Send + Sync>;

impl Deliveries {
    /// Starts the delivery engine: finds which agencies have queued copies and the highest queue sequence number
    /// (two seeks per agency), starts those agencies' actors in loading mode, and rebuilds their queues from the
    /// store in a background task, so that the broker serves without waiting for long queues to load (1.8–2.0 s
    /// with a million queued, PERFORMANCE.md).
    ///
    /// INVARIANT: while its agency's stored queue loads, an actor delivers only copies up to where the load has got
    /// ([`Command::LoadedUpTo`]), and holds back acknowledgements of copies not in flight until the load ends
    /// ([`Command::Loaded`]): copies still go out in queue order, and an acknowledgement never misses a copy that is
    /// not loaded yet. Copies queued by sends meanwhile take sequence numbers above every stored one, so they wait
    /// for the whole load, and the loader (which loads only up to the highest stored one) and the sends never hand
    /// the actor the same copy twice.
    pub fn start(store: Store, config: DeliveryConfig, shutdown: watch::Receiver<bool>) -> Result<Self, StoreError> {
        let deliveries = Self {
            shared: Arc::new(Shared {
                store: store.clone(),
                config,
                actors: Mutex::new(HashMap::new()),
                next_seq: AtomicU64::new(1),
                stored_up_to: AtomicU64::new(0),
                shutdown: shutdown.clone(),
                on_escalation: Mutex::new(None),
                tasks: Mutex::new(Vec::new()),
                stopped: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        let loading = queued_agencies(&store)?;
        metrics().queues_loading.set(loading.len() as i64);
        let max_seq = loading.iter().map(|(_, seq)| *seq).max().unwrap_or(0);
        // Nothing else has asked for a sequence number yet: the server starts after this returns.
        deliveries.shared.next_seq.store(max_seq + 1, Ordering::Relaxed);
        deliveries.shared.stored_up_to.store(max_seq, Ordering::Relaxed);
        if let Ok(mut actors) = deliveries.shared.actors.lock() {
            for (recipient, _) in &loading {
                deliveries.actor(&mut actors, recipient, true);
            }
        }
        let loader = deliveries.clone();
        // A task on the runtime (it reads a page of the queues, hands it over, and waits for the actor to take it in),
        // so nothing outlives the runtime at shutdown.
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let agencies: Vec<String> = loading.into_iter().map(|(recipient, _)| recipient).collect();
            match loader.load_queues(max_seq, &shutdown).await {
                Ok(queued) => {
                    let millis = started.elapsed().as_millis() as u64;
                    tracing::info!(queued, agencies = agencies.len(), millis, "queues rebuilt");
                    for recipient in &agencies {
                        loader.send_if_running(recipient, Command::Loaded);
                    }
                    metrics().queues_loading.set(0);
                }
                // The agencies not yet loaded stay held (nothing delivered out of order); a restart retries.
                Err(error) => {
                    tracing::error!(error = %error, "could not rebuild the queues; deliveries to agencies not yet loaded wait for a restart")
                }
            }
        });
        Ok(deliveries)
    }

    /// Hands every copy queued at start (sequence numbers up to `max_seq`) to its agency's actor, in key order, and
    /// tells each actor once the load has moved past its agency. Returns how many copies were queued.
    async fn load_queues(&self, max_seq: u64, shutdown: &watch::Receiver<bool>) -> Result<usize, StoreError> {
        let store = &self.shared.store;
        let mut queued = 0usize;
        let mut current: Option<(String, u64)> = None;
        let mut after: Option<Vec<u8>> = None;
        loop {
            if *shutdown.borrow() {
                return Ok(queued);
            }
            let page = store.scan_page(records::QUEUE_PREFIX, after.as_deref(), LOAD_PROGRESS_EVERY)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, value) in page {
                let Some((recipient, seq)) = records::parse_queue_key(&key) else { continue };
                if seq > max_seq {
                    // Queued by a send since start: its actor already has it.
                    continue;
                }
                if current.as_ref().is_none_or(|(agency, _)| *agency != recipient)
                    && let Some((done, _)) = current.replace((recipient.clone(), seq))
                {
                    self.send_if_running(&done, Command::Loaded);
                    metrics().queues_loading.dec();
                }
                let (delivery_id, deadline) = records::parse_queue_value(&value)
                    .ok_or_else(|| StoreError::Decode(format!("undecodable queue entry for {recipient}")))?;
                let acknowledge_by_micros = match deadline {
                    Some(deadline) => deadline,
                    // Written by an older broker: the deadline is in the delivery record.
                    None => match store.get(&records::delivery_key(&delivery_id))? {
                        Some(bytes) => {
                            let record: DeliveryRecord = records::decode(&bytes)?;
                            pending_deadline(&record)
                        }
                        None => None,
                    },
                };
                queued += 1;
                if let Some((_, loaded)) = current.as_mut() {
                    *loaded = seq;
                }
                let entry =
                    Enqueued { recipient: recipient.clone(), seq, delivery_id, acknowledge_by_micros, recorded: None };
                self.send_if_running(&recipient, Command::Enqueue(entry));
            }
            if let Some((recipient, loaded)) = &current {
                let (taken, taken_in) = oneshot::channel();
                self.send_if_running(recipient, Command::LoadedUpTo(*loaded, taken));
                // An error means the actor has stopped (shutdown): nothing to wait for.
                let _ = taken_in.await;
            }
        }
        // The last agency (and any whose copies all went meanwhile) is told by the caller, which tells them all.
        Ok(queued)
    }

    /// Sets what happens after an escalation is recorded.
    pub fn set_escalation_hook(&self, hook: EscalationHook) {
        if let Ok(mut slot) = self.shared.on_escalation.lock() {
            *slot = Some(hook);
        }
    }

    /// A fresh queue sequence number (global and increasing, so per-recipient order follows acceptance order).
    pub fn next_seq(&self) -> u64 {
        self.shared.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether a send may record the first delivery attempt of its copy for `recipient` in its own commit, so that the
    /// copy goes to the agent's stream as soon as that commit is durable, without a second commit (one `fdatasync`
    /// fewer per copy, and one fewer on the way to the agent): yes while the recipient's actor is idle with its agent
    /// connected and room in its in-flight window, each yes taking one place of those the actor last published. The
    /// count is advisory (the actor publishes afresh after each pass, not knowing of yeses whose copies have not
    /// reached it yet): the actor keeps order and the window whatever the answer was, and a recorded copy that finds
    /// copies ahead of it waits behind them ([`RecipientActor::publish_direct_room`]). The send must pass the copy in
    /// [`Enqueued::recorded`].
    pub fn reserve_direct(&self, recipient: &str) -> bool {
        let Ok(actors) = self.shared.actors.lock() else { return false };
        let Some(actor) = actors.get(recipient) else { return false };
        actor.direct_room.fetch_update(Ordering::AcqRel, Ordering::Acquire, |room| room.checked_sub(1)).is_ok()
    }

    /// The places sends may take now for `recipient` (tests).
    #[cfg(test)]
    pub(crate) fn direct_room(&self, recipient: &str) -> usize {
        self.shared.actors.lock().unwrap().get(recipient).map_or(0, |actor| actor.direct_room.load(Ordering::Acquire))
    }

    /// Tells the recipient's actor about a copy that is now durable in the store.
    pub fn enqueued(&self, entry: Enqueued) {
        let recipient = entry.recipient.clone();
        self.send(&recipient, Command::Enqueue(entry));
    }

    /// Opens `recipient`'s delivery stream. A newer stream for the same agency replaces an older one. Its buffer holds
    /// the whole in-flight window; a copy's acknowledgement wait starts when the stream reads it from there
    /// ([`DeliveryReceiver`]), not when it is put there.
    pub fn subscribe(&self, recipient: &str) -> DeliveryReceiver {
        let (stream, receiver) = mpsc::channel(self.shared.config.max_in_flight.max(1) + 1);
        let reads = Reads::default();
        self.send(recipient, Command::Subscribe { stream, reads: reads.clone() });
        DeliveryReceiver { inner: receiver, read: Some((self.clone(), recipient.to_owned(), reads)) }
    }

    pub async fn acknowledge(&self, recipient: &str, delivery_id: &str, actor: Actor) -> Result<(), DeliveryError> {
        let (reply, answer) = oneshot::channel();
        self.send(recipient, Command::Ack { delivery_id: delivery_id.to_owned(), actor, reply });
        answer.await.map_err(|_| DeliveryError::ShuttingDown)?
    }

    /// Returns whether the copy is now dead-lettered.
    pub async fn negative_acknowledge(
        &self,
        recipient: &str,
        delivery_id: &str,
        actor: Actor,
        delay: Option<Duration>,
        reason: String,
    ) -> Result<bool, DeliveryError> {
        let (reply, answer) = oneshot::channel();
        let delay = delay.unwrap_or(self.shared.config.default_retry_delay);
        self.send(recipient, Command::Nack { delivery_id: delivery_id.to_owned(), actor, delay, reason, reply });
        answer.await.map_err(|_| DeliveryError::ShuttingDown)?
    }

    /// Per recipient agency: copies waiting for acknowledgement (queued or in flight) and when the oldest of them
    /// was queued (microseconds since the epoch), for metrics.
    ///
    /// The depth is each actor's own count; the oldest copy is the first of the recipient's `q/` keys (they sort by
    /// sequence number), so a scrape reads two records per recipient, however long the queues. (It scanned every
    /// `q/` key, which with a million queued took seconds of every scrape.)
    pub fn queue_stats(&self) -> Result<BTreeMap<String, (u64, Option<i64>)>, StoreError> {
        let depths: Vec<(String, u64)> = match self.shared.actors.lock() {
            Ok(actors) => actors
                .iter()
                .map(|(recipient, actor)| (recipient.clone(), actor.depth.load(Ordering::Relaxed)))
                .collect(),
            Err(_) => return Err(StoreError::Stopped),
        };
        let mut stats = BTreeMap::new();
        for (recipient, depth) in depths.into_iter().filter(|(_, depth)| *depth > 0) {
            let mut oldest = None;
            let prefix = records::queue_prefix(&recipient);
            if let Some(item) = self.shared.store.scan_prefix(&prefix).next() {
                let (key, value) = item?;
                if records::parse_queue_key(&key).is_some_and(|(owner, _)| owner == recipient)
                    && let Some((delivery_id, _)) = records::parse_queue_value(&value)
                    && let Some(bytes) = self.shared.store.get(&records::delivery_key(&delivery_id))?
                {
                    let record: DeliveryRecord = records::decode(&bytes)?;
                    oldest = Some(record.queued_at_micros);
                }
            }
            stats.insert(recipient, (depth, oldest));
        }
        Ok(stats)
    }

    /// Stops every actor after the commands already in its mailbox, and waits for them. Called once the server has
    /// stopped taking requests.
    pub async fn shutdown(&self) {
        if let Ok(mut actors) = self.shared.actors.lock() {
            self.shared.stopped.store(true, Ordering::Release);
            actors.clear();
        }
        if let Ok(mut hook) = self.shared.on_escalation.lock() {
            hook.take();
        }
        let tasks = match self.shared.tasks.lock() {
            Ok(mut tasks) => std::mem::take(&mut *tasks),
            Err(_) => Vec::new(),
        };
        for task in tasks {
            let _ = task.await;
        }
    }

    /// The handle of `recipient`'s actor, starting the actor (in loading mode if `loading`) if it has none.
    fn actor<'a>(
        &self,
        actors: &'a mut HashMap<String, ActorHandle>,
        recipient: &str,
        loading: bool,
    ) -> &'a mut ActorHandle {
        actors.entry(recipient.to_owned()).or_insert_with(|| {
            let (mailbox, receiver) = mpsc::unbounded_channel();
            let depth = Arc::new(AtomicU64::new(0));
            let actor = RecipientActor::new(recipient.to_owned(), self.shared.clone(), depth.clone(), loading);
            let direct_room = actor.direct_room.clone();
            let task = tokio::spawn(actor.run(receiver));
            if let Ok(mut tasks) = self.shared.tasks.lock() {
                tasks.push(task);
            }
            ActorHandle { mailbox, depth, direct_room }
        })
    }

    fn send(&self, recipient: &str, command: Command) {
        self.send_to(recipient, command, true);
    }

    /// As [`Self::send`], but only to an actor that is running (after shutdown there are none): for the queue loader,
    /// whose agencies' actors were all started before it.
    fn send_if_running(&self, recipient: &str, command: Command) {
        self.send_to(recipient, command, false);
    }

    fn send_to(&self, recipient: &str, command: Command, start: bool) {
        let Ok(mut actors) = self.shared.actors.lock() else { return };
        // No actor to take it and none may start: the loader's agencies all had one, and after shutdown none starts.
        // A queued copy stays in the store for the next start.
        if !actors.contains_key(recipient) && (!start || self.shared.stopped.load(Ordering::Acquire)) {
            refuse(command);
            return;
        }
        let actor = self.actor(&mut actors, recipient, false);
        if matches!(command, Command::Enqueue(_)) {
            actor.depth.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(mpsc::error::SendError(command)) = actor.mailbox.send(command) {
            refuse(command);
        }
    }
}

/// Answers a command no actor will take (the broker is stopping) rather than leave its caller waiting.
fn refuse(command: Command) {
    match command {
        Command::Ack { reply, .. } => {
            let _ = reply.send(Err(DeliveryError::ShuttingDown));
        }
        Command::Nack { reply, .. } => {
            let _ = reply.send(Err(DeliveryError::ShuttingDown));
        }
        Command::Enqueue(_) | Command::Subscribe { .. } | Command::LoadedUpTo(..) | Command::Loaded | Command::Read => {
        }
    }
}

/// How often the queue loader tells an actor how far its agency's queue has loaded: the actor may deliver the copies
/// loaded so far, so an agency with a long backlog gets its first copies at once rather than after the whole load.
/// The loader reads the queues a page of this many at a time and, after each, waits for the actor to take them in, so
/// that the copies waiting in an actor's mailbox stay few however long the queue.
const LOAD_PROGRESS_EVERY: usize = 1024;

/// The agencies with queued copies, each with its highest queue sequence number: two seeks per agency, however
/// long the queues. (Agency ids are lowercase letters, digits and hyphens, so `q/<id>/` then 0xFF sorts after every
/// key of that agency and before the next agency's.)
fn queued_agencies(store: &Store) -> Result<Vec<(String, u64)>, StoreError> {
    let mut agencies = Vec::new();
    let mut after = records::QUEUE_PREFIX.to_vec();
    while let Some((key, _)) = store.next_after(&after)? {
        if !key.starts_with(records::QUEUE_PREFIX) {
            break;
        }
        let Some((recipient, _)) = records::parse_queue_key(&key) else {
            return Err(StoreError::Decode("an undecodable queue key".to_owned()));
        };
        let prefix = records::queue_prefix(&recipient);
        let last = store.last_under(&prefix)?.and_then(|(key, _)| records::parse_queue_key(&key));
        agencies.push((recipient, last.map_or(0, |(_, seq)| seq)));
        after = prefix;
        after.push(0xff);
    }
    Ok(agencies)
}

/// An acknowledgement waiting for the actor's next commit: delivery id, who acknowledged, where to answer.
type PendingAck = (String, Actor, oneshot::Sender<Result<(), DeliveryError>>);
/// A negative acknowledgement waiting for the actor's next commit, with its retry delay and reason.
type PendingNack = (String, Actor, Duration, String, oneshot::Sender<Result<bool, DeliveryError>>);

struct InFlight {
    seq: u64,
    deadline: Instant,
    /// Its acknowledgement's commit is under way: its wait does not run out meanwhile (see [`InFlightCopies::pause`]).
    paused: bool,
    /// In the stream's buffer, not read by it yet: its wait has not started ([`InFlightCopies::start_wait`]).
    buffered: bool,
}

/// Copies sent and not yet acknowledged, by delivery id, with the acknowledgement waits of those not being
/// acknowledged in the order they run out: the actor's next wake-up and the waits that ran out are found without a
/// scan of the window (up to `max_in_flight` copies, and the actor asks after every batch of commands).
#[derive(Default)]
struct InFlightCopies {
    by_id: HashMap<String, InFlight>,
    /// (wait ends, seq) -> delivery id, for every copy in `by_id` that is neither paused nor buffered.
    waits: BTreeMap<(Instant, u64), String>,
}

impl InFlightCopies {
    /// In flight with its wait running, to end at `deadline`.
    fn insert(&mut self, delivery_id: String, seq: u64, deadline: Instant) {
        self.remove(&delivery_id);
        self.waits.insert((deadline, seq), delivery_id.clone());
        self.by_id.insert(delivery_id, InFlight { seq, deadline, paused: false, buffered: false });
    }

    /// In flight, in the stream's buffer: its wait starts when the stream reads it ([`Self::start_wait`]).
    fn insert_buffered(&mut self, delivery_id: String, seq: u64, deadline: Instant) {
        self.remove(&delivery_id);
        self.by_id.insert(delivery_id, InFlight { seq, deadline, paused: false, buffered: true });
    }

    /// The stream read this copy: its wait runs from now until `deadline`.
    fn start_wait(&mut self, delivery_id: &str, deadline: Instant) {
        if let Some(entry) = self.by_id.get_mut(delivery_id)
            && entry.buffered
        {
            entry.buffered = false;
            entry.deadline = deadline;
            if !entry.paused {
                self.waits.insert((deadline, entry.seq), delivery_id.to_owned());
            }
        }
    }

    fn remove(&mut self, delivery_id: &str) -> Option<InFlight> {
        let entry = self.by_id.remove(delivery_id)?;
        if !entry.paused && !entry.buffered {
            self.waits.remove(&(entry.deadline, entry.seq));
        }
        Some(entry)
    }

    fn get(&self, delivery_id: &str) -> Option<&InFlight> {
        self.by_id.get(delivery_id)
    }

    fn contains_key(&self, delivery_id: &str) -> bool {
        self.by_id.contains_key(delivery_id)
    }

    fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Its acknowledgement's commit has begun: its wait cannot run out (waking for it would spin) until
    /// [`Self::resume`] (the commit failed) or [`Self::remove`].
    fn pause(&mut self, delivery_id: &str) {
        if let Some(entry) = self.by_id.get_mut(delivery_id)
            && !entry.paused
        {
            entry.paused = true;
            if !entry.buffered {
                self.waits.remove(&(entry.deadline, entry.seq));
            }
        }
    }

    fn resume(&mut self, delivery_id: &str) {
        if let Some(entry) = self.by_id.get_mut(delivery_id)
            && entry.paused
        {
            entry.paused = false;
            if !entry.buffered {
                self.waits.insert((entry.deadline, entry.seq), delivery_id.to_owned());
            }
        }
    }

    /// When the first wait runs out.
    fn next_wait_end(&self) -> Option<Instant> {
        self.waits.keys().next().map(|(when, _)| *when)
    }

    /// The copies whose wait has run out by `now`, taken out of flight with their sequence numbers.
    fn take_expired(&mut self, now: Instant) -> Vec<(String, u64)> {
        let mut expired = Vec::new();
        while let Some(entry) = self.waits.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, seq), delivery_id) = entry.remove_entry();
            self.by_id.remove(&delivery_id);
            expired.push((delivery_id, seq));
        }
        expired
    }

    /// Takes out every copy not being acknowledged (read by the stream or still in its buffer).
    fn take_unpaused(&mut self) -> Vec<(String, u64)> {
        self.waits.clear();
        let mut taken = Vec::new();
        self.by_id.retain(|delivery_id, entry| {
            if entry.paused {
                return true;
            }
            taken.push((delivery_id.clone(), entry.seq));
            false
        });
        taken
    }

    /// The delivery id of the copy with this sequence number (a scan: at most `max_in_flight`).
    fn id_for_seq(&self, seq: u64) -> Option<String> {
        self.by_id.iter().find(|(_, entry)| entry.seq == seq).map(|(id, _)| id.clone())
    }

    #[cfg(test)]
    fn set_deadline(&mut self, delivery_id: &str, deadline: Instant) {
        if let Some(entry) = self.remove(delivery_id) {
            self.insert(delivery_id.to_owned(), entry.seq, deadline);
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// A copy going out.
struct Outgoing {
    seq: u64,
    delivery_id: String,
    attempt: u32,
    /// The encoded `pb::Delivery`.
    copy: Vec<u8>,
    /// Its attempt was recorded by its send's commit (see [`Enqueued::recorded`]), not by this one.
    recorded_by_send: bool,
}

/// The outcome of a commit the actor submitted and did not wait for.
enum Submitted {
    /// Delivery attempts recorded: on success the copies go to the stream.
    Delivered { outgoing: Vec<Outgoing>, result: Result<(), StoreError> },
    /// Acknowledgements recorded.
    Acknowledged { done: Vec<Acknowledging>, result: Result<(), StoreError> },
}

/// A copy whose acknowledgement's commit is under way.
struct Acknowledging {
    delivery_id: String,
    seq: u64,
    /// Its record's pending acknowledgement deadline, taken out of the deadlines once the commit is durable.
    deadline: Option<i64>,
    reply: oneshot::Sender<Result<(), DeliveryError>>,
    /// Where the copy was, if not in flight (a late acknowledgement, or one of a copy delivered before a restart):
    /// it was taken out of that queue, and goes back to it if the commit fails.
    taken_from: Option<Waiting>,
}

/// A queue a copy not in flight waits in.
enum Waiting {
    Ready,
    /// Waiting out a retry delay until then.
    Delayed(Instant),
}

/// How the engine reaches a recipient's actor.
struct ActorHandle {
    mailbox: mpsc::UnboundedSender<Command>,
    /// How many copies the actor holds (ready, waiting out a retry delay, being delivered, in flight or being
    /// acknowledged), for metrics: counted up here
    /// when an enqueue is sent (so a scrape right after a send already counts its copy), down by the actor when it
    /// lets a copy go for good ([`RecipientActor::depth`]).
    depth: Arc<AtomicU64>,
    /// See [`RecipientActor::publish_direct_room`].
    direct_room: Arc<std::sync::atomic::AtomicUsize>,
}

/// A recipient's ready copies, in sequence order, holding each delivery id compactly: a delivery id is
/// `<message id>.<recipient>` (`records::delivery_id`) and the broker's message ids are UUIDs, so for those only the
/// UUID's 16 bytes are kept, beside the sequence number in one sorted deque (24 bytes a copy, plus the deque's spare
/// room). Any other id is kept whole in `others`, by sequence number (its place in the deque holds zeros).
///
/// A deque, not a map: copies come in almost always at the back (sends, in sequence order give or take the order
/// their commits finished) or near the front (copies put back from flight or a retry delay), go out at the front,
/// and a long queue held ~61 bytes a copy in a `BTreeMap`'s half-full nodes (~130 as `String`s before that).
/// Inserting elsewhere moves the shorter side, and removing from the middle (a late acknowledgement) is rare. The
/// one bulk insertion that would not be cheap, the start-up load in front of copies sent meanwhile, does not happen:
/// those wait beside the deque until the load ends ([`RecipientActor::sent_while_loading`]).
struct Ready {
    recipient: String,
    ids: VecDeque<(u64, [u8; 16])>,
    others: HashMap<u64, Box<str>>,
}

impl Ready {
    fn new(recipient: String) -> Self {
        Self { recipient, ids: VecDeque::new(), others: HashMap::new() }
    }

    /// The UUID's bytes if `delivery_id` is `<UUID>.<recipient>` with the UUID as it prints, so it reads back the same.
    fn uuid_of(&self, delivery_id: &str) -> Option<[u8; 16]> {
        let message_id = delivery_id.strip_suffix(self.recipient.as_str())?.strip_suffix('.')?;
        let uuid = uuid::Uuid::try_parse(message_id).ok()?;
        (uuid.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()) == message_id).then(|| uuid.into_bytes())
    }

    fn read(&self, seq: u64, bytes: &[u8; 16]) -> String {
        match self.others.get(&seq) {
            Some(id) => id.to_string(),
            None => records::delivery_id(&uuid::Uuid::from_bytes(*bytes).hyphenated().to_string(), &self.recipient),
        }
    }

    fn position(&self, seq: u64) -> Result<usize, usize> {
        self.ids.binary_search_by_key(&seq, |(held, _)| *held)
    }

    /// Adds the copy (replacing the id of a copy already held under `seq`).
    fn insert(&mut self, seq: u64, delivery_id: String) {
        let bytes = match self.uuid_of(&delivery_id) {
            Some(bytes) => {
                self.others.remove(&seq);
                bytes
            }
            None => {
                self.others.insert(seq, delivery_id.into_boxed_str());
                [0; 16]
            }
        };
        if self.ids.back().is_none_or(|(last, _)| *last < seq) {
            self.ids.push_back((seq, bytes));
            return;
        }
        match self.position(seq) {
            Ok(at) => self.ids[at].1 = bytes,
            Err(at) => self.ids.insert(at, (seq, bytes)),
        }
    }

    fn remove(&mut self, seq: u64) {
        let removed = if self.ids.front().is_some_and(|(first, _)| *first == seq) {
            self.ids.pop_front().is_some()
        } else {
            self.position(seq).is_ok_and(|at| self.ids.remove(at).is_some())
        };
        if removed {
            self.others.remove(&seq);
            // A drained long queue gives back its room.
            if self.ids.capacity() > 4096 && self.ids.len() < self.ids.capacity() / 4 {
                self.ids.shrink_to(self.ids.len() * 2);
            }
        }
    }

    fn get(&self, seq: u64) -> Option<String> {
        let at = self.position(seq).ok()?;
        let (seq, bytes) = &self.ids[at];
        Some(self.read(*seq, bytes))
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The first `count` copies with sequence numbers up to `up_to`, in order.
    fn first(&self, count: usize, up_to: u64) -> Vec<(u64, String)> {
        self.ids
            .iter()
            .take_while(|(seq, _)| *seq <= up_to)
            .take(count)
            .map(|(seq, bytes)| (*seq, self.read(*seq, bytes)))
            .collect()
    }

    /// The sequence number of `delivery_id`, by a scan (for rare late acknowledgements).
    fn find(&self, delivery_id: &str) -> Option<u64> {
        match self.uuid_of(delivery_id) {
            Some(wanted) => self
                .ids
                .iter()
                .find(|(seq, bytes)| *bytes == wanted && !self.others.contains_key(seq))
                .map(|(seq, _)| *seq),
            None => self.others.iter().find(|(_, id)| id.as_ref() == delivery_id).map(|(seq, _)| *seq),
        }
    }
}

/// The owner of one recipient agency's queue.
struct RecipientActor {
    recipient: String,
    shared: Arc<Shared>,
    /// Copies ready to send, by sequence number.
    ready: Ready,
    /// Copies waiting out a retry delay: (when, seq) -> delivery id.
    delayed: BTreeMap<(Instant, u64), String>,
    /// Copies sent and not yet acknowledged.
    in_flight: InFlightCopies,
    /// What the current stream has read from its buffer since the actor last looked.
    reads: Option<Reads>,
    /// Acknowledgement deadlines from policy obligations, as (when, seq), when in microseconds since the Unix epoch
    /// (the obligation's own terms, and half the size of an `Instant`: every queued copy of a flow with a deadline
    /// has one); the delivery id is looked up when one is due ([`Self::id_for_seq`]), so that a long queue holds
    /// each id once (in `ready`), not twice. A copy let go for good takes its entry out by the deadline its record
    /// holds ([`pending_deadline`]), so no map from seq to deadline is kept (~30 bytes a queued copy); an entry
    /// that outlives its copy all the same (one re-added for a retried escalation) is dropped when it falls due,
    /// as the copy is no longer held.
    deadlines: BTreeSet<(i64, u64)>,
    /// When each delayed entry is due, by seq, so an acknowledgement can remove it without a scan.
    delayed_at: HashMap<u64, Instant>,
    stream: Option<mpsc::Sender<StreamItem>>,
    /// Commits submitted and not yet handled, in the order submitted (see the module documentation).
    submitted: FuturesOrdered<BoxFuture<'static, Submitted>>,
    /// Copies whose "delivered" commit is under way: delivery id -> seq. They count against the in-flight window.
    delivering: HashMap<String, u64>,
    /// Ready copies whose first attempt their sends' commits recorded (see [`Enqueued::recorded`]), by seq: the copy.
    recorded: HashMap<u64, Vec<u8>>,
    /// How many copies sends may record as delivered in their own commits (see [`Self::publish_direct_room`]).
    direct_room: Arc<std::sync::atomic::AtomicUsize>,
    /// Copies whose acknowledgement's commit is under way, each with repeated acknowledgements waiting for its
    /// outcome.
    acking: HashMap<String, Vec<oneshot::Sender<Result<(), DeliveryError>>>>,
    /// How many copies this actor holds (ready, delayed, being delivered, in flight or being acknowledged), for
    /// metrics ([`Deliveries::queue_stats`]):
    /// counted up when an enqueue is sent to the actor (so a scrape right after a send already counts its copy),
    /// down when the actor lets a copy go for good.
    depth: Arc<AtomicU64>,
    /// True until every copy queued for the agency at start is loaded ([`Command::Loaded`]). Meanwhile only copies
    /// up to `loaded_up_to` are delivered, and acknowledgements of copies not in flight wait in `deferred` (see
    /// [`Deliveries::start`]).
    loading: bool,
    loaded_up_to: u64,
    deferred: Vec<Command>,
    /// Copies sent while the stored queue loads (sequence numbers above every stored one): they join `ready` at
    /// [`Command::Loaded`], behind the whole stored queue. In `ready` meanwhile, each loaded copy would go in
    /// front of them and move them all (a million loaded past a few thousand sent is tens of GB moved).
    sent_while_loading: Vec<(u64, String)>,
}

impl RecipientActor {
    fn new(recipient: String, shared: Arc<Shared>, depth: Arc<AtomicU64>, loading: bool) -> Self {
        let ready = Ready::new(recipient.clone());
        Self {
            depth,
            loading,
            loaded_up_to: 0,
            deferred: Vec::new(),
            sent_while_loading: Vec::new(),
            recipient,
            shared,
            ready,
            delayed: BTreeMap::new(),
            in_flight: InFlightCopies::default(),
            reads: None,
            deadlines: BTreeSet::new(),
            delayed_at: HashMap::new(),
            stream: None,
            submitted: FuturesOrdered::new(),
            delivering: HashMap::new(),
            recorded: HashMap::new(),
            direct_room: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            acking: HashMap::new(),
        }
    }

    async fn run(mut self, mut mailbox: mpsc::UnboundedReceiver<Command>) {
        let mut shutdown = self.shared.shutdown.clone();
        let mut stopping = *shutdown.borrow();
        loop {
            let wake = self.next_wake();
            let mut commands = Vec::new();
            let waiting_for_commits = !self.submitted.is_empty();
            let mut outcome = None;
            // Woken when the agent's stream ends, so that sends stop recording deliveries to it at once.
            let stream = self.stream.clone();
            tokio::select! {
                command = mailbox.recv() => match command {
                    Some(command) => commands.push(command),
                    None => break,
                },
                done = self.submitted.next(), if waiting_for_commits => outcome = done,
                () = stream_closed(stream.as_ref()), if stream.as_ref().is_some_and(|stream| !stream.is_closed()) => {}
                () = sleep_until_option(wake) => {}
                changed = shutdown.changed(), if !stopping => {
                    if changed.is_err() || *shutdown.borrow() {
                        stopping = true;
                        // Ending the stream lets the server finish its graceful shutdown; acknowledgements still work.
                        self.stream = None;
                    }
                }
            }
            if let Some(outcome) = outcome {
                self.handle_outcome(outcome);
            }
            // Every other outcome already in is handled now too, in order.
            while let Some(Some(outcome)) = self.submitted.next().now_or_never() {
                self.handle_outcome(outcome);
            }
            while commands.len() < 1024 {
                match mailbox.try_recv() {
                    Ok(command) => commands.push(command),
                    Err(_) => break,
                }
            }
            self.handle(commands, stopping).await;
            self.expire_timers().await;
            if !stopping {
                self.pump();
            }
            self.publish_direct_room(stopping);
        }
        // Answer every acknowledgement under way before the store closes.
        self.settle().await;
    }

    /// Waits for every commit under way and handles its outcome.
    async fn settle(&mut self) {
        while let Some(outcome) = self.submitted.next().await {
            self.handle_outcome(outcome);
        }
    }

    fn handle_outcome(&mut self, outcome: Submitted) {
        match outcome {
            Submitted::Delivered { outgoing, result } => {
                for copy in &outgoing {
                    self.delivering.remove(&copy.delivery_id);
                }
                if let Err(error) = result {
                    tracing::error!(error = %error, recipient = %self.recipient, "could not record deliveries; will retry");
                    let retry = Instant::now() + Duration::from_secs(1);
                    let stream_open = self.stream_open();
                    for copy in outgoing {
                        // Still recorded only for the stream it was recorded for (see `requeue_in_flight`).
                        if copy.recorded_by_send && stream_open {
                            self.recorded.insert(copy.seq, copy.copy);
                        }
                        self.add_delayed(retry, copy.seq, copy.delivery_id);
                    }
                    return;
                }
                for copy in outgoing {
                    self.send_copy(copy);
                }
            }
            Submitted::Acknowledged { done, result } => match result {
                Ok(()) => {
                    for Acknowledging { delivery_id, seq, deadline, reply, .. } in done {
                        let repeated = self.acking.remove(&delivery_id).unwrap_or_default();
                        self.forget(&delivery_id, seq, deadline);
                        for reply in std::iter::once(reply).chain(repeated) {
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
                Err(error) => {
                    let message = error.to_string();
                    for Acknowledging { delivery_id, seq, reply, taken_from, .. } in done {
                        let repeated = self.acking.remove(&delivery_id).unwrap_or_default();
                        match taken_from {
                            Some(Waiting::Ready) => self.ready.insert(seq, delivery_id),
                            Some(Waiting::Delayed(when)) => self.add_delayed(when, seq, delivery_id),
                            // Still in flight: its wait runs again.
                            None => self.in_flight.resume(&delivery_id),
                        }
                        for reply in std::iter::once(reply).chain(repeated) {
                            let _ = reply.send(Err(StoreError::CommitFailed {
                                message: message.clone(),
                                disk_full: error.is_disk_full(),
                            }
                            .into()));
                        }
                    }
                }
            },
        }
    }

    /// Puts a copy whose attempt is durably recorded in flight and hands it to the stream.
    fn send_copy(&mut self, outgoing: Outgoing) {
        let Outgoing { seq, delivery_id, attempt, copy, .. } = outgoing;
        if attempt == 1 {
            metrics().deliveries.inc();
        } else {
            metrics().redeliveries.inc();
        }
        // Its wait starts when the stream reads it (`Command::Read`); until then it cannot run out.
        let deadline = Instant::now() + self.shared.config.ack_wait;
        self.in_flight.insert_buffered(delivery_id.clone(), seq, deadline);
        // With no stream (the broker is stopping, or the stream was seen closed), the copy stays in flight, unread,
        // until the agent's next stream puts it back at the front of the queue; a stream closed since puts it back
        // at the next pump.
        let Some(stream) = &self.stream else { return };
        match pb::Delivery::decode(copy.as_slice()) {
            Ok(mut delivery) => {
                delivery.attempt = attempt;
                match stream.try_send(Ok(delivery)) {
                    Ok(()) => {}
                    // The pump sends no more than the buffer's room; a copy a send recorded for an idle stream may
                    // still find it full (the room sends are offered is advisory): it waits in the queue instead.
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!(%delivery_id, "the agent's stream buffer is full: the copy waits in the queue");
                        self.in_flight.remove(&delivery_id);
                        self.ready.insert(seq, delivery_id);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        tracing::debug!(%delivery_id, "delivery stream closed; the copy stays in flight until redelivery");
                    }
                }
            }
            Err(error) => {
                tracing::error!(%delivery_id, error = %error, "a stored copy does not decode");
            }
        }
    }

    /// Starts the acknowledgement waits of the copies the stream has read since the last look.
    fn take_reads(&mut self) {
        let read = match self.reads.as_ref().map(|reads| reads.lock()) {
            Some(Ok(mut reads)) => std::mem::take(&mut *reads),
            _ => return,
        };
        let deadline = Instant::now() + self.shared.config.ack_wait;
        for delivery_id in read {
            self.in_flight.start_wait(&delivery_id, deadline);
        }
    }

    fn stream_open(&self) -> bool {
        self.stream.as_ref().is_some_and(|stream| !stream.is_closed())
    }

    /// Whether a copy may go to the stream now, ahead of nothing: the agent is connected, no copy is waiting or
    /// being delivered (so order is kept), and the in-flight window has room.
    fn idle_with_room(&self) -> bool {
        self.stream_open()
            && !self.loading
            && self.ready.is_empty()
            && self.delivering.is_empty()
            && self.in_flight.len() < self.shared.config.max_in_flight
    }

    /// Tells sends how many copies they may record as delivered in their own commits ([`Deliveries::reserve_direct`]):
    /// the room left in the window while the actor is idle, none otherwise.
    fn publish_direct_room(&self, stopping: bool) {
        let room = if !stopping && self.idle_with_room() {
            let buffer = self.stream.as_ref().map_or(0, |stream| stream.capacity());
            (self.shared.config.max_in_flight - self.in_flight.len()).min(buffer)
        } else {
            0
        };
        self.direct_room.store(room, Ordering::Release);
    }

    /// Puts the copies in flight back at the front of the ready queue (the stream has ended or been replaced), but
    /// not those being acknowledged.
    fn requeue_in_flight(&mut self) {
        // Copies recorded as delivered by their sends but not handed to the old stream get an attempt of their own.
        self.recorded.clear();
        for (delivery_id, seq) in self.in_flight.take_unpaused() {
            self.ready.insert(seq, delivery_id);
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        // A copy being acknowledged does not run out of time (see `InFlightCopies::pause`): waking for it would spin.
        let in_flight = self.in_flight.next_wait_end();
        let delayed = self.delayed.keys().next().map(|(when, _)| *when);
        let deadline = self.deadlines.first().map(|(micros, _)| instant_for_micros(*micros));
        [in_flight, delayed, deadline].into_iter().flatten().min()
    }

    async fn handle(&mut self, commands: Vec<Command>, stopping: bool) {
        let mut acks = Vec::new();
        let mut nacks = Vec::new();
        let mut commands = std::collections::VecDeque::from(commands);
        while let Some(command) = commands.pop_front() {
            match command {
                Command::Enqueue(entry) => {
                    if let Some(micros) = entry.acknowledge_by_micros {
                        self.add_deadline(micros, entry.seq);
                    }
                    match entry.recorded {
                        // Recorded as delivered by its send's commit (now durable): straight to the stream when
                        // nothing is ahead of it, otherwise in order with the rest, without another commit.
                        Some(copy) if self.idle_with_room() => self.send_copy(Outgoing {
                            seq: entry.seq,
                            delivery_id: entry.delivery_id,
                            attempt: 1,
                            copy,
                            recorded_by_send: true,
                        }),
                        // Copies ahead of it on the open stream it was recorded for: it follows them shortly.
                        Some(copy) if self.stream_open() => {
                            self.recorded.insert(entry.seq, copy);
                            self.make_ready(entry.seq, entry.delivery_id);
                        }
                        // Not recorded, or the stream it was recorded for has gone (that attempt never reached the
                        // agent, and the hand-off to its next stream is recorded as an attempt of its own).
                        _ => self.make_ready(entry.seq, entry.delivery_id),
                    }
                }
                Command::Subscribe { stream, reads } => {
                    if stopping {
                        continue;
                    }
                    // A new stream replaces the old one; copies sent on the old one and not yet acknowledged go
                    // back to the front of the queue (the agent recognises a copy it already has by its id). Copies
                    // being delivered are let into flight first, so they go back in order with the rest (otherwise
                    // they would reach the new stream ahead of earlier copies).
                    if !self.delivering.is_empty() {
                        self.settle().await;
                    }
                    self.reads = Some(reads);
                    if let Some(replaced) = self.stream.replace(stream) {
                        // Said to the agent whose stream this was (it would otherwise see a clean end and reconnect
                        // at once, taking the stream back: two agents of one agency replace each other's streams).
                        let _ = replaced.try_send(Err(crate::transport::status::status(
                            tonic::Code::Aborted,
                            "stream-replaced",
                            "another connection of this agency opened its delivery stream, which replaces this one: \
                             run one agent per agency",
                            std::collections::HashMap::new(),
                        )));
                    }
                    self.requeue_in_flight();
                }
                // While loading, an acknowledgement of a copy not in flight may be of one not loaded yet.
                Command::Ack { ref delivery_id, .. } | Command::Nack { ref delivery_id, .. }
                    if self.loading
                        && !self.in_flight.contains_key(delivery_id)
                        && !self.delivering.contains_key(delivery_id) =>
                {
                    self.deferred.push(command)
                }
                Command::Read => self.take_reads(),
                Command::Ack { delivery_id, actor, reply } => acks.push((delivery_id, actor, reply)),
                Command::Nack { delivery_id, actor, delay, reason, reply } => {
                    nacks.push((delivery_id, actor, delay, reason, reply))
                }
                Command::LoadedUpTo(seq, taken) => {
                    self.loaded_up_to = self.loaded_up_to.max(seq);
                    let _ = taken.send(());
                }
                Command::Loaded => {
                    self.loading = false;
                    for (seq, delivery_id) in std::mem::take(&mut self.sent_while_loading) {
                        self.ready.insert(seq, delivery_id);
                    }
                    // What was held back while the queue loaded is handled next, before the rest of this batch.
                    for held in std::mem::take(&mut self.deferred).into_iter().rev() {
                        commands.push_front(held);
                    }
                }
            }
        }
        if !acks.is_empty() {
            self.acknowledge(acks).await;
        }
        if !nacks.is_empty() {
            // They read the records of copies that may have commits under way (see the module documentation).
            self.settle().await;
            self.negative_acknowledge(nacks).await;
        }
    }

    /// Puts a copy just queued in the ready queue (see `sent_while_loading`).
    fn make_ready(&mut self, seq: u64, delivery_id: String) {
        if self.loading && seq > self.shared.stored_up_to.load(Ordering::Relaxed) {
            self.sent_while_loading.push((seq, delivery_id));
        } else {
            self.ready.insert(seq, delivery_id);
        }
    }

    fn seq_of(&self, delivery_id: &str) -> Option<u64> {
        if let Some(entry) = self.in_flight.get(delivery_id) {
            return Some(entry.seq);
        }
        // Not in flight: a late acknowledgement of a copy whose wait ran out, or of a delayed one. Rare, so a scan.
        self.ready
            .find(delivery_id)
            .or_else(|| self.delayed.iter().find(|(_, id)| id.as_str() == delivery_id).map(|((_, seq), _)| *seq))
    }

    /// Lets a copy go for good; `deadline` is its record's pending acknowledgement deadline ([`pending_deadline`]).
    fn forget(&mut self, delivery_id: &str, seq: u64, deadline: Option<i64>) {
        self.one_fewer();
        self.in_flight.remove(delivery_id);
        self.ready.remove(seq);
        self.recorded.remove(&seq);
        if let Some(when) = self.delayed_at.remove(&seq) {
            self.delayed.remove(&(when, seq));
        }
        if let Some(when) = deadline {
            self.deadlines.remove(&(when, seq));
        }
    }

    /// Lets go of a copy whose delivery record is missing (it cannot be delivered, acknowledged or escalated): its
    /// deadline, if any, is found by a scan (this never happens unless the store lost the record).
    fn drop_lost(&mut self, seq: u64) {
        self.one_fewer();
        self.deadlines.retain(|(_, held)| *held != seq);
    }

    /// A copy has left this queue for good (see [`RecipientActor::depth`]).
    fn one_fewer(&self) {
        let _ = self.depth.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |depth| Some(depth.saturating_sub(1)));
    }

    /// Puts a copy to wait out a retry delay until `when`, replacing any wait it already had (a copy negatively
    /// acknowledged twice would otherwise keep its first timer too, which later put it back in the queue while it
    /// was in flight).
    fn add_delayed(&mut self, when: Instant, seq: u64, delivery_id: String) {
        if let Some(earlier) = self.delayed_at.insert(seq, when) {
            self.delayed.remove(&(earlier, seq));
        }
        self.delayed.insert((when, seq), delivery_id);
    }

    fn add_deadline(&mut self, when: i64, seq: u64) {
        self.deadlines.insert((when, seq));
    }

    /// The delivery id of a copy this actor holds: ready, waiting out a retry delay, sent while the stored queue
    /// loads (a scan, only then), or in flight (at most `max_in_flight`, so a scan).
    fn id_for_seq(&self, seq: u64) -> Option<String> {
        if let Some(id) = self.ready.get(seq) {
            return Some(id);
        }
        if let Some(id) = self.delayed_at.get(&seq).and_then(|when| self.delayed.get(&(*when, seq))) {
            return Some(id.clone());
        }
        if let Some((_, id)) = self.sent_while_loading.iter().find(|(held, _)| *held == seq) {
            return Some(id.clone());
        }
        self.in_flight.id_for_seq(seq)
    }

    fn load(&self, delivery_id: &str) -> Result<Option<DeliveryRecord>, StoreError> {
        match self.shared.store.get(&records::delivery_key(delivery_id))? {
            Some(bytes) => Ok(Some(records::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// The record of one of this recipient's copies; another agency's delivery id is as unknown as a made-up one.
    fn load_own(&self, delivery_id: &str) -> Result<DeliveryRecord, DeliveryError> {
        match self.load(delivery_id)? {
            Some(record) if record.recipient == self.recipient => Ok(record),
            _ => Err(DeliveryError::UnknownDelivery(delivery_id.to_owned())),
        }
    }

    async fn acknowledge(&mut self, acks: Vec<PendingAck>) {
        if acks.iter().any(|(delivery_id, ..)| self.delivering.contains_key(delivery_id)) {
            // An earlier attempt acknowledged while the copy is being delivered again: its record is being written.
            self.settle().await;
        }
        let now = AuditEntry::now_micros();
        let mut commit = Commit::default();
        let mut done = Vec::new();
        for (delivery_id, actor, reply) in acks {
            if let Some(repeated) = self.acking.get_mut(&delivery_id) {
                // Already being acknowledged: answered with that commit's outcome.
                repeated.push(reply);
                continue;
            }
            let record = match self.load_own(&delivery_id) {
                Ok(record) => record,
                Err(error) => {
                    let _ = reply.send(Err(error));
                    continue;
                }
            };
            if record.state == DeliveryState::Acknowledged {
                // A repeated acknowledgement changes nothing.
                let _ = reply.send(Ok(()));
                continue;
            }
            let Some(seq) = self.seq_of(&delivery_id) else {
                let _ = reply.send(Err(DeliveryError::UnknownDelivery(delivery_id)));
                continue;
            };
            let mut record = record;
            let deadline = pending_deadline(&record);
            if let Some(delivered) = record.last_delivered_at_micros {
                metrics().acknowledgement_seconds.observe((now - delivered).max(0) as f64 / 1_000_000.0);
            }
            record.state = DeliveryState::Acknowledged;
            record.acknowledged_at_micros = Some(now);
            record.push_event(now, "acknowledged", "");
            commit.audit.push(entry_for(&record, EventType::Acknowledgement, actor, now, String::new()));
            push_final_writes(&mut commit, &record, seq);
            // Not sent (again) while its acknowledgement is recorded.
            let taken_from = if self.in_flight.contains_key(&delivery_id) {
                None
            } else if let Some(when) = self.delayed_at.remove(&seq) {
                self.delayed.remove(&(when, seq));
                Some(Waiting::Delayed(when))
            } else {
                self.ready.remove(seq);
                Some(Waiting::Ready)
            };
            self.acking.insert(delivery_id.clone(), Vec::new());
            self.in_flight.pause(&delivery_id);
            done.push(Acknowledging { delivery_id, seq, deadline, reply, taken_from });
        }
        if done.is_empty() {
            return;
        }
        self.submit(commit, move |result| Submitted::Acknowledged { done, result });
    }

    /// Submits `commit` without waiting for it; its outcome (made by `outcome` from the commit's result) is handled in
    /// the order submitted ([`Self::handle_outcome`]).
    fn submit(&mut self, commit: Commit, outcome: impl FnOnce(Result<(), StoreError>) -> Submitted + Send + 'static) {
        let committed = self.shared.store.submit(commit);
        self.submitted.push_back(async move { outcome(committed.await.map(|_| ())) }.boxed());
    }

    async fn negative_acknowledge(&mut self, nacks: Vec<PendingNack>) {
        let now = AuditEntry::now_micros();
        let mut commit = Commit::default();
        let mut done = Vec::new();
        for (delivery_id, actor, delay, reason, reply) in nacks {
            let record = match self.load_own(&delivery_id) {
                Ok(record) => record,
                Err(error) => {
                    let _ = reply.send(Err(error));
                    continue;
                }
            };
            let Some(seq) = self.seq_of(&delivery_id) else {
                let _ = reply.send(Err(DeliveryError::UnknownDelivery(delivery_id)));
                continue;
            };
            let mut record = record;
            let deadline = pending_deadline(&record);
            let reason = sanitise_reason(&reason);
            record.push_event(now, "negatively-acknowledged", reason.clone());
            commit.audit.push(entry_for(&record, EventType::NegativeAcknowledgement, actor, now, reason));
            let dead = record.attempts >= self.shared.config.max_attempts;
            if dead {
                self.dead_letter(&mut commit, &mut record, seq, now);
            } else {
                record.state = DeliveryState::Queued;
                commit.writes.push(Write::PutBlob(records::delivery_key(&delivery_id), encode_or_empty(&record)));
            }
            let dead = dead.then_some(record);
            done.push((delivery_id, seq, deadline, delay, dead, reply));
        }
        if done.is_empty() {
            return;
        }
        match self.shared.store.commit(commit).await {
            Ok(_) => {
                for (delivery_id, seq, deadline, delay, dead, reply) in done {
                    let given_up = dead.is_some();
                    if let Some(record) = dead {
                        self.forget(&delivery_id, seq, deadline);
                        self.report_dead_letter(record);
                    } else {
                        self.in_flight.remove(&delivery_id);
                        self.ready.remove(seq);
                        self.add_delayed(Instant::now() + delay, seq, delivery_id);
                    }
                    let _ = reply.send(Ok(given_up));
                }
            }
            Err(error) => {
                let message = error.to_string();
                for (.., reply) in done {
                    let _ = reply.send(Err(StoreError::CommitFailed {
                        message: message.clone(),
                        disk_full: error.is_disk_full(),
                    }
                    .into()));
                }
            }
        }
    }

    /// Tells the sender (and the rule's escalation agency) of a dead letter now durable, through the escalation hook;
    /// not for the broker's own notices (nobody to tell).
    fn report_dead_letter(&self, record: DeliveryRecord) {
        tracing::warn!(delivery_id = %record.delivery_id, recipient = %self.recipient, "copy dead-lettered after its last attempt");
        if record.sender == "broker" {
            return;
        }
        if let Some(hook) = self.shared.on_escalation.lock().ok().and_then(|slot| slot.clone()) {
            hook(record);
        }
    }

    fn dead_letter(&self, commit: &mut Commit, record: &mut DeliveryRecord, seq: u64, now: i64) {
        metrics().dead_letters.inc();
        if record.sender != "broker" {
            // Owed until the notices are stored (see `records::notice_key`).
            commit.writes.push(Write::Put(records::notice_key(&record.delivery_id), Vec::new()));
        }
        record.state = DeliveryState::DeadLettered;
        record.push_event(now, "dead-lettered", format!("after {} attempts", record.attempts));
        commit.audit.push(entry_for(
            record,
            EventType::DeadLetter,
            broker_actor(),
            now,
            format!("attempts={}", record.attempts),
        ));
        push_final_writes(commit, record, seq);
    }

    /// Moves due retries to the ready queue, redelivers or dead-letters copies whose acknowledgement wait ran out,
    /// and records escalations for passed acknowledgement deadlines.
    async fn expire_timers(&mut self) {
        let now = Instant::now();
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((when, seq), delivery_id) = entry.remove_entry();
            if self.delayed_at.get(&seq) == Some(&when) {
                self.delayed_at.remove(&seq);
                self.ready.insert(seq, delivery_id);
            }
        }
        let expired = self.in_flight.take_expired(now);
        if !expired.is_empty() {
            self.expire_in_flight(expired).await;
        }
        let mut due = Vec::new();
        let now_micros = AuditEntry::now_micros();
        if self.deadlines.first().is_some_and(|(when, _)| *when <= now_micros) {
            // Escalations read the records of copies that may have commits under way (see the module
            // documentation), and a copy being delivered or acknowledged must be found (or be gone) once they end.
            self.settle().await;
        }
        while let Some(&(when, seq)) = self.deadlines.first() {
            if when > now_micros {
                break;
            }
            self.deadlines.remove(&(when, seq));
            // A copy the actor no longer holds has been acknowledged or dead-lettered: nothing to escalate.
            if let Some(delivery_id) = self.id_for_seq(seq) {
                due.push(((when, seq), delivery_id));
            }
        }
        if !due.is_empty() {
            self.escalate(due).await;
        }
    }

    async fn expire_in_flight(&mut self, expired: Vec<(String, u64)>) {
        let now_micros = AuditEntry::now_micros();
        let mut commit = Commit::default();
        let mut dead = Vec::new();
        for (delivery_id, seq) in expired {
            let record = match self.load(&delivery_id) {
                Ok(Some(record)) => record,
                Ok(None) => {
                    tracing::error!(%delivery_id, "a copy in flight has no stored record: dropped from the queue");
                    self.drop_lost(seq);
                    continue;
                }
                // Still in flight, its wait run out again in a second (it was lost from memory before).
                Err(error) => {
                    tracing::error!(error = %error, %delivery_id, "could not read a delivery record; will retry");
                    let retry = Instant::now() + Duration::from_secs(1);
                    self.in_flight.insert(delivery_id, seq, retry);
                    continue;
                }
            };
            if record.attempts >= self.shared.config.max_attempts {
                let mut record = record;
                let deadline = pending_deadline(&record);
                self.dead_letter(&mut commit, &mut record, seq, now_micros);
                dead.push((delivery_id, seq, deadline, record));
            } else {
                // Redelivered by the next pump, which records the attempt.
                self.ready.insert(seq, delivery_id);
            }
        }
        if dead.is_empty() {
            return;
        }
        match self.shared.store.commit(commit).await {
            Ok(_) => {
                for (delivery_id, seq, deadline, record) in dead {
                    self.forget(&delivery_id, seq, deadline);
                    self.report_dead_letter(record);
                }
            }
            Err(error) => {
                tracing::error!(error = %error, recipient = %self.recipient, "could not record dead letters; will retry");
                for (delivery_id, seq, ..) in dead {
                    self.in_flight.insert(delivery_id, seq, Instant::now() + Duration::from_secs(1));
                }
            }
        }
    }

    async fn escalate(&mut self, due: Vec<((i64, u64), String)>) {
        let now = AuditEntry::now_micros();
        let mut commit = Commit::default();
        let mut escalated = Vec::new();
        for ((_, seq), delivery_id) in &due {
            let mut record = match self.load(delivery_id) {
                Ok(Some(record)) => record,
                Ok(None) => continue,
                // Its deadline was taken out when it fell due: put back, so the escalation is retried (it was lost
                // until a restart before).
                Err(error) => {
                    tracing::error!(error = %error, %delivery_id, "could not read a delivery record; will retry its escalation");
                    self.add_deadline(now + 1_000_000, *seq);
                    continue;
                }
            };
            if record.escalated || matches!(record.state, DeliveryState::Acknowledged) {
                continue;
            }
            record.escalated = true;
            record.push_event(now, "escalated", "acknowledgement deadline passed");
            // Owed until the notices are stored (see `records::notice_key`).
            commit.writes.push(Write::Put(records::notice_key(delivery_id), Vec::new()));
            commit.audit.push(entry_for(
                &record,
                EventType::Escalation,
                broker_actor(),
                now,
                "acknowledgement deadline passed".to_owned(),
            ));
            commit.writes.push(Write::PutBlob(records::delivery_key(delivery_id), encode_or_empty(&record)));
            // The queue entry forgets the deadline, so a restart does not wait for it (and `escalate` would skip the
            // copy anyway: its record says escalated). The entry keeps its copy: written again with it (escalations
            // are rare), or left as it is if the copy cannot be read now.
            let key = records::queue_key(&self.recipient, *seq);
            let head = records::queue_value(delivery_id, None);
            match self.shared.store.get_attached(&key) {
                Ok(Some((_, Some(copy)))) => commit.writes.push(Write::PutAttached(key, head, copy)),
                // Queued by an older broker: the copy has a key of its own.
                Ok(Some((_, None))) => commit.writes.push(Write::Put(key, head)),
                // Gone: not written back (it would name a copy no longer queued).
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(error = %error, %delivery_id, "could not read a queued copy; its queue entry keeps its deadline");
                }
            }
            escalated.push(record);
        }
        if escalated.is_empty() {
            return;
        }
        match self.shared.store.commit(commit).await {
            Ok(_) => {
                let hook = self.shared.on_escalation.lock().ok().and_then(|slot| slot.clone());
                for record in escalated {
                    metrics().escalations.inc();
                    tracing::warn!(delivery_id = %record.delivery_id, recipient = %self.recipient, "acknowledgement deadline passed: escalated");
                    if let Some(hook) = &hook {
                        hook(record);
                    }
                }
            }
            Err(error) => {
                tracing::error!(error = %error, "could not record an escalation; will retry");
                let retry = AuditEntry::now_micros() + 1_000_000;
                for ((_, seq), _) in due {
                    self.add_deadline(retry, seq);
                }
            }
        }
    }

    /// Records delivery attempts of ready copies while the agent is connected and the in-flight window has room; the
    /// copies go to the stream once their commit is durable ([`Self::handle_outcome`]).
    fn pump(&mut self) {
        loop {
            let Some(stream) = &self.stream else { return };
            if stream.is_closed() {
                self.stream = None;
                self.requeue_in_flight();
                return;
            }
            // The window's room, and no more than the stream's buffer can take now (copies being delivered take their
            // places when their commit is done).
            let room = self
                .shared
                .config
                .max_in_flight
                .saturating_sub(self.in_flight.len() + self.delivering.len())
                .min(stream.capacity().saturating_sub(self.delivering.len()));
            if room == 0 || self.ready.is_empty() {
                return;
            }
            // While the stored queue loads, only copies up to where it has loaded may go: order is kept.
            let up_to = if self.loading { self.loaded_up_to } else { u64::MAX };
            let batch = self.ready.first(room.min(256), up_to);
            if batch.is_empty() {
                return;
            }
            let now = AuditEntry::now_micros();
            let mut commit = Commit::default();
            let mut outgoing = Vec::new();
            for (seq, delivery_id) in &batch {
                self.ready.remove(*seq);
                if self.in_flight.contains_key(delivery_id)
                    || self.delivering.contains_key(delivery_id)
                    || self.acking.contains_key(delivery_id)
                {
                    // Already on its way, or being acknowledged: never a second attempt of the same copy at once.
                    tracing::warn!(%delivery_id, "a copy already in flight was queued again: skipped");
                    continue;
                }
                if let Some(copy) = self.recorded.remove(seq) {
                    // Its attempt is already recorded (by its send's commit): it goes out in order with the rest.
                    outgoing.push(Outgoing {
                        seq: *seq,
                        delivery_id: delivery_id.clone(),
                        attempt: 1,
                        copy,
                        recorded_by_send: true,
                    });
                    continue;
                }
                let (record, copy) =
                    match (self.load(delivery_id), read_copy(&self.shared.store, &self.recipient, *seq, delivery_id)) {
                        (Ok(Some(record)), Ok(Some(copy))) => (record, copy),
                        (Err(error), _) | (_, Err(error)) => {
                            tracing::error!(error = %error, %delivery_id, "could not read a queued copy; will retry");
                            self.add_delayed(Instant::now() + Duration::from_secs(1), *seq, delivery_id.clone());
                            continue;
                        }
                        _ => {
                            tracing::error!(%delivery_id, "a queued copy has no stored record: dropped from the queue");
                            self.drop_lost(*seq);
                            continue;
                        }
                    };
                let mut record = record;
                commit.audit.push(record_attempt(&mut record, now));
                commit.writes.push(Write::PutBlob(records::delivery_key(delivery_id), encode_or_empty(&record)));
                outgoing.push(Outgoing {
                    seq: *seq,
                    delivery_id: delivery_id.clone(),
                    attempt: record.attempts,
                    copy,
                    recorded_by_send: false,
                });
            }
            if outgoing.is_empty() {
                continue;
            }
            for copy in &outgoing {
                self.delivering.insert(copy.delivery_id.clone(), copy.seq);
            }
            if commit.audit.is_empty() && commit.writes.is_empty() {
                // Only copies whose attempts their sends recorded: nothing to commit, but their outcome is handled
                // in order after the commits before it.
                self.submitted
                    .push_back(futures::future::ready(Submitted::Delivered { outgoing, result: Ok(()) }).boxed());
                continue;
            }
            self.submit(commit, move |result| Submitted::Delivered { outgoing, result });
        }
    }
}

/// The acknowledgement deadline a copy's record still waits for: none once it has escalated. The actor's deadlines
/// hold this for every copy it holds (from its send, or from its `q/` entry on start, which says the same).
fn pending_deadline(record: &DeliveryRecord) -> Option<i64> {
    if record.escalated { None } else { record.acknowledge_by_micros }
}

/// Records a delivery attempt of `record`'s copy at `now`: the attempt, the state, the event; returns its audit entry.
pub(crate) fn record_attempt(record: &mut DeliveryRecord, now: i64) -> AuditEntry {
    record.attempts += 1;
    record.state = DeliveryState::Delivered;
    record.last_delivered_at_micros = Some(now);
    let (event, name) =
        if record.attempts == 1 { (EventType::Delivery, "delivered") } else { (EventType::Redelivery, "redelivered") };
    record.push_event(now, name, "");
    entry_for(record, event, broker_actor(), now, String::new())
}

fn push_final_writes(commit: &mut Commit, record: &DeliveryRecord, seq: u64) {
    commit.writes.push(Write::PutBlob(records::delivery_key(&record.delivery_id), encode_or_empty(record)));
    // The queue entry holds the copy; a copy queued by an older broker has a key of its own (deleting a key that
    // is not there writes nothing).
    commit.writes.push(Write::Delete(records::queue_key(&record.recipient, seq)));
    commit.writes.push(Write::Delete(records::copy_key(&record.delivery_id)));
}

/// A queued copy (the encoded `pb::Delivery`): attached to its queue entry, or under a key of its own if an older
/// broker queued it.
fn read_copy(store: &Store, recipient: &str, seq: u64, delivery_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
    match store.get_attachment(&records::queue_key(recipient, seq))? {
        Some(copy) => Ok(Some(copy)),
        None => store.get(&records::copy_key(delivery_id)),
    }
}

/// postcard cannot fail to encode these plain records; an empty value would only ever be read back as "missing".
fn encode_or_empty(record: &DeliveryRecord) -> Vec<u8> {
    records::encode(record).unwrap_or_default()
}

pub fn broker_actor() -> Actor {
    Actor { agency: "broker".to_owned(), practitioner: String::new(), role: String::new() }
}

fn entry_for(record: &DeliveryRecord, event: EventType, actor: Actor, now: i64, detail: String) -> AuditEntry {
    AuditEntry {
        time_micros: now,
        event: Some(event),
        actor,
        subject: record.subject.clone(),
        message_id: record.message_id.clone(),
        recipient: record.recipient.clone(),
        rule_ids: record.rule_ids.clone(),
        policy_set_hash: record.policy_set_hash.clone(),
        attempt: record.attempts,
        detail,
        ..AuditEntry::default()
    }
}

/// Negative-acknowledgement reasons come from agencies' systems; keep them short and plain so they cannot carry a
/// record's content into the audit log.
fn sanitise_reason(reason: &str) -> String {
    reason.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(120).collect()
}

fn instant_for_micros(micros: i64) -> Instant {
    let now_micros = AuditEntry::now_micros();
    let ahead = u64::try_from(micros.saturating_sub(now_micros)).unwrap_or(0);
    Instant::now() + Duration::from_micros(ahead)
}

/// Resolves when the stream's receiver is gone (never without a stream).
async fn stream_closed(stream: Option<&mpsc::Sender<StreamItem>>) {
    match stream {
        Some(stream) => stream.closed().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_option(when: Option<Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(when).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHOOL: &str = "luton-oakwood-primary";

    /// A new store in a temporary folder and a delivery engine started over it (kept running while `_stop` lives).
    struct Engine {
        _dir: tempfile::TempDir,
        _stop: watch::Sender<bool>,
        store: Store,
        deliveries: Deliveries,
    }

    fn engine(config: DeliveryConfig) -> Engine {
        let dir = tempfile::tempdir().unwrap();
        let audit = crate::audit::AuditLog::open(&dir.path().join("audit")).unwrap();
        let (store, _) = Store::open(dir.path(), audit, crate::store::StoreOptions::for_tests()).unwrap();
        let (stop, stopping) = watch::channel(false);
        let deliveries = Deliveries::start(store.clone(), config, stopping).unwrap();
        Engine { _dir: dir, _stop: stop, store, deliveries }
    }

    /// Stores a queued copy for the school under `seq` (its record, and its `q/` entry with the copy attached), as a
    /// send does.
    async fn store_copy(store: &Store, seq: u64) -> String {
        store_copy_laid_out(store, seq, false).await
    }

    /// [`store_copy`], or with `own_key` as a broker from before attached copies stored it: the copy under a `c/`
    /// key of its own, the `q/` entry without it.
    async fn store_copy_laid_out(store: &Store, seq: u64, own_key: bool) -> String {
        let message_id = uuid::Uuid::now_v7().to_string();
        let delivery_id = records::delivery_id(&message_id, SCHOOL);
        let record = DeliveryRecord {
            delivery_id: delivery_id.clone(),
            message_id: message_id.clone(),
            recipient: SCHOOL.to_owned(),
            sender: "beds-police".to_owned(),
            seq,
            state: DeliveryState::Queued,
            attempts: 0,
            queued_at_micros: AuditEntry::now_micros(),
            last_delivered_at_micros: None,
            acknowledged_at_micros: None,
            acknowledge_by_micros: None,
            escalated: false,
            escalate_to: None,
            subject: None,
            rule_ids: Vec::new(),
            policy_set_hash: String::new(),
            events: Vec::new(),
        };
        let copy = pb::Delivery { delivery_id: delivery_id.clone(), message_id, ..Default::default() };
        let mut writes = vec![Write::PutBlob(records::delivery_key(&delivery_id), records::encode(&record).unwrap())];
        let (key, head) = (records::queue_key(SCHOOL, seq), records::queue_value(&delivery_id, None));
        if own_key {
            writes.push(Write::PutBlob(records::copy_key(&delivery_id), copy.encode_to_vec()));
            writes.push(Write::Put(key, head));
        } else {
            writes.push(Write::PutAttached(key, head, copy.encode_to_vec()));
        }
        store.commit(Commit { audit: Vec::new(), writes }).await.unwrap();
        delivery_id
    }

    /// While an agency's stored queue loads (after a restart), its actor delivers only copies up to where the load
    /// has got (not a copy sent since the start, whose sequence number is higher), acknowledges copies in flight at
    /// once, and holds back acknowledgements of copies not in flight (they may not be loaded yet) until the load
    /// ends; then the rest goes out in queue order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_loading_queue_delivers_in_order_up_to_where_it_has_loaded() {
        let Engine { _dir, _stop, store, deliveries } = engine(DeliveryConfig::default());
        // Copies 1, 2 and 3 were stored before the "restart"; copy 4 comes from a send after it.
        let mut stored = Vec::new();
        for seq in 1..=3 {
            stored.push(store_copy(&store, seq).await);
        }
        let sent = store_copy(&store, 4).await;
        // What `Deliveries::start` would have found stored.
        deliveries.shared.stored_up_to.store(3, Ordering::Relaxed);
        {
            let mut actors = deliveries.shared.actors.lock().unwrap();
            deliveries.actor(&mut actors, SCHOOL, true);
        }
        let enqueue = |seq: u64, delivery_id: &String| {
            Command::Enqueue(Enqueued {
                recipient: SCHOOL.into(),
                seq,
                delivery_id: delivery_id.clone(),
                acknowledge_by_micros: None,
                recorded: None,
            })
        };
        deliveries.enqueued(Enqueued {
            recipient: SCHOOL.into(),
            seq: 4,
            delivery_id: sent.clone(),
            acknowledge_by_micros: None,
            recorded: None,
        });
        let mut stream = deliveries.subscribe(SCHOOL);
        let school = Actor { agency: SCHOOL.into(), ..Actor::default() };
        let acknowledge = |delivery_id: &String| {
            let (deliveries, id, school) = (deliveries.clone(), delivery_id.clone(), school.clone());
            tokio::spawn(async move { deliveries.acknowledge(SCHOOL, &id, school).await })
        };
        // Copy 3 was delivered before the restart; its acknowledgement arrives before it is loaded.
        let acknowledging_third = acknowledge(&stored[2]);
        let quiet = Duration::from_millis(300);
        let early = tokio::time::timeout(quiet, stream.recv()).await;
        assert!(early.is_err(), "nothing is delivered before any of the queue is loaded: {early:?}");
        assert!(!acknowledging_third.is_finished(), "an acknowledgement of a copy not loaded yet waits");

        // The loader has handed over copies 1 and 2 (of 1 to 3): those go out, in order; copy 4 waits.
        deliveries.send_if_running(SCHOOL, enqueue(1, &stored[0]));
        deliveries.send_if_running(SCHOOL, enqueue(2, &stored[1]));
        let (taken, taken_in) = oneshot::channel();
        deliveries.send_if_running(SCHOOL, Command::LoadedUpTo(2, taken));
        taken_in.await.unwrap();
        let mut order = Vec::new();
        for _ in 0..2 {
            let copy = tokio::time::timeout(Duration::from_secs(10), stream.recv()).await.unwrap().unwrap().unwrap();
            order.push(copy.delivery_id);
        }
        assert_eq!(order, vec![stored[0].clone(), stored[1].clone()]);
        // A copy in flight is acknowledged at once, while the load goes on.
        tokio::time::timeout(Duration::from_secs(10), acknowledge(&stored[0])).await.unwrap().unwrap().unwrap();
        let later = tokio::time::timeout(quiet, stream.recv()).await;
        assert!(later.is_err(), "a copy sent since the start waits for the whole queue: {later:?}");
        assert!(!acknowledging_third.is_finished());

        deliveries.send_if_running(SCHOOL, enqueue(3, &stored[2]));
        deliveries.send_if_running(SCHOOL, Command::Loaded);
        tokio::time::timeout(Duration::from_secs(10), acknowledging_third).await.unwrap().unwrap().unwrap();
        let copy = tokio::time::timeout(Duration::from_secs(10), stream.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!(copy.delivery_id, sent, "the acknowledged copy 3 is not sent again; copy 4 follows");
        let states = [
            (&stored[0], DeliveryState::Acknowledged),
            (&stored[1], DeliveryState::Delivered),
            (&stored[2], DeliveryState::Acknowledged),
        ];
        for (delivery_id, state) in states {
            let record: DeliveryRecord =
                records::decode(&store.get(&records::delivery_key(delivery_id)).unwrap().unwrap()).unwrap();
            assert_eq!(record.state, state);
        }
    }

    /// A started delivery engine over a new store, with one copy stored and queued for the school, and the school's
    /// stream, from which the copy has been received.
    struct OneCopyDelivered {
        _dir: tempfile::TempDir,
        _stop: watch::Sender<bool>,
        store: Store,
        deliveries: Deliveries,
        stream: DeliveryReceiver,
        delivery_id: String,
    }

    async fn one_copy_delivered() -> OneCopyDelivered {
        one_copy_delivered_with(DeliveryConfig::default()).await
    }

    async fn one_copy_delivered_with(config: DeliveryConfig) -> OneCopyDelivered {
        let Engine { _dir: dir, _stop: stop, store, deliveries } = engine(config);
        let delivery_id = store_copy(&store, 1).await;
        deliveries.enqueued(Enqueued {
            recipient: SCHOOL.into(),
            seq: 1,
            delivery_id: delivery_id.clone(),
            acknowledge_by_micros: None,
            recorded: None,
        });
        let mut stream = deliveries.subscribe(SCHOOL);
        let copy = tokio::time::timeout(Duration::from_secs(10), stream.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!(copy.delivery_id, delivery_id);
        OneCopyDelivered { _dir: dir, _stop: stop, store, deliveries, stream, delivery_id }
    }

    /// Copies an agent has not read yet (slower than the copies coming) do not run out of time in its stream's
    /// buffer: each one's acknowledgement wait starts when the stream reads it. Before, the wait started when the
    /// copy went into the buffer, so copies that waited there unread were sent again, and a healthy but slow agent's
    /// copies used up their attempts and were dead-lettered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copies_waiting_unread_in_the_stream_do_not_run_out_of_time() {
        let Engine { _dir, _stop, store, deliveries } =
            engine(DeliveryConfig { ack_wait: Duration::from_millis(300), ..DeliveryConfig::default() });
        let mut ids = Vec::new();
        for seq in 1..=5 {
            let delivery_id = store_copy(&store, seq).await;
            deliveries.enqueued(Enqueued {
                recipient: SCHOOL.into(),
                seq,
                delivery_id: delivery_id.clone(),
                acknowledge_by_micros: None,
                recorded: None,
            });
            ids.push(delivery_id);
        }
        let mut stream = deliveries.subscribe(SCHOOL);
        // Unread for more than three acknowledgement waits.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let school = Actor { agency: SCHOOL.into(), ..Actor::default() };
        for id in &ids {
            let copy = tokio::time::timeout(Duration::from_secs(5), stream.recv()).await.unwrap().unwrap().unwrap();
            assert_eq!((&copy.delivery_id, copy.attempt), (id, 1), "each once, in order, at its first attempt");
            deliveries.acknowledge(SCHOOL, &copy.delivery_id, school.clone()).await.unwrap();
        }
        let more = tokio::time::timeout(Duration::from_millis(700), stream.recv()).await;
        assert!(more.is_err(), "nothing sent again: {more:?}");
        // Read but not acknowledged: sent again once its wait, counted from the read, runs out.
        let late = store_copy(&store, 6).await;
        deliveries.enqueued(Enqueued {
            recipient: SCHOOL.into(),
            seq: 6,
            delivery_id: late.clone(),
            acknowledge_by_micros: None,
            recorded: None,
        });
        let first = tokio::time::timeout(Duration::from_secs(5), stream.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!((first.delivery_id.as_str(), first.attempt), (late.as_str(), 1));
        let again = tokio::time::timeout(Duration::from_secs(5), stream.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!((again.delivery_id.as_str(), again.attempt), (late.as_str(), 2));
    }

    /// A newer stream of the same agency replaces the older, which is told why (ABORTED, `stream-replaced`) rather
    /// than seeing a clean end and reconnecting at once; the copy in flight on it goes to the newer stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replaced_stream_is_told_why() {
        let OneCopyDelivered { store: _store, deliveries, mut stream, delivery_id, _dir, _stop } =
            one_copy_delivered().await;
        let mut newer = deliveries.subscribe(SCHOOL);
        let ended = tokio::time::timeout(Duration::from_secs(5), stream.recv()).await.unwrap().unwrap().unwrap_err();
        assert_eq!(ended.code(), tonic::Code::Aborted);
        assert!(ended.message().contains("one agent per agency"), "{}", ended.message());
        assert!(stream.recv().await.is_none());
        let copy = tokio::time::timeout(Duration::from_secs(5), newer.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!(copy.delivery_id, delivery_id);
    }

    /// A copy negatively acknowledged twice waits out the second delay only: the first delay's timer does not put it
    /// back in the queue (before, it did, while the copy was in flight again, and it was sent and counted twice).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_negative_acknowledgement_replaces_the_first_delay() {
        let OneCopyDelivered { store, deliveries, mut stream, delivery_id, _dir, _stop } = one_copy_delivered().await;
        let school = Actor { agency: SCHOOL.into(), ..Actor::default() };
        let nack =
            |delay| deliveries.negative_acknowledge(SCHOOL, &delivery_id, school.clone(), Some(delay), "busy".into());
        assert!(!nack(Duration::from_millis(300)).await.unwrap());
        assert!(!nack(Duration::from_millis(1500)).await.unwrap());
        let early = tokio::time::timeout(Duration::from_millis(1000), stream.recv()).await;
        assert!(early.is_err(), "not after the first delay: {early:?}");
        let again = tokio::time::timeout(Duration::from_secs(5), stream.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!(again.attempt, 2);
        deliveries.acknowledge(SCHOOL, &delivery_id, school.clone()).await.unwrap();
        let late = tokio::time::timeout(Duration::from_millis(700), stream.recv()).await;
        assert!(late.is_err(), "and never again: {late:?}");
        assert_eq!(state_of(&store, &delivery_id), DeliveryState::Acknowledged);
    }

    /// A copy whose acknowledgement wait runs out after its last attempt is dead-lettered, and once that is durable
    /// the escalation hook hears of it (so the sender is told), with the record saying dead-lettered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_dead_lettered_when_its_last_wait_runs_out_is_reported() {
        let config =
            DeliveryConfig { ack_wait: Duration::from_millis(200), max_attempts: 1, ..DeliveryConfig::default() };
        let OneCopyDelivered { store, deliveries, stream: _stream, delivery_id, _dir, _stop } =
            one_copy_delivered_with(config).await;
        // Set within the copy's 200 ms acknowledgement wait, which started when it was read.
        let (reported, mut reports) = tokio::sync::mpsc::unbounded_channel();
        deliveries.set_escalation_hook(Arc::new(move |record| {
            let _ = reported.send(record);
        }));
        let record = tokio::time::timeout(Duration::from_secs(10), reports.recv()).await.unwrap().unwrap();
        assert_eq!((record.delivery_id.as_str(), record.state), (delivery_id.as_str(), DeliveryState::DeadLettered));
        assert_eq!(state_of(&store, &delivery_id), DeliveryState::DeadLettered, "durable before it is reported");
        assert!(
            store.get(&records::notice_key(&delivery_id)).unwrap().is_some(),
            "its notices owed, in the same commit"
        );
        assert!(tokio::time::timeout(Duration::from_millis(300), reports.recv()).await.is_err(), "reported once");
    }

    fn state_of(store: &Store, delivery_id: &str) -> DeliveryState {
        let record: DeliveryRecord =
            records::decode(&store.get(&records::delivery_key(delivery_id)).unwrap().unwrap()).unwrap();
        record.state
    }

    /// An actor of the school's built in the test (not started), over a new store and engine, and its copies,
    /// stored and queued as sends do: the test drives it step by step, so what reaches it in one batch is certain.
    struct Standalone {
        _dir: tempfile::TempDir,
        _stop: watch::Sender<bool>,
        store: Store,
        actor: RecipientActor,
        ids: Vec<String>,
    }

    async fn standalone(copies: u64, max_in_flight: usize) -> Standalone {
        let Engine { _dir: dir, _stop: stop, store, deliveries } =
            engine(DeliveryConfig { max_in_flight, ..DeliveryConfig::default() });
        let actor =
            RecipientActor::new(SCHOOL.to_owned(), deliveries.shared.clone(), Arc::new(AtomicU64::new(0)), false);
        let mut ids = Vec::new();
        for seq in 1..=copies {
            ids.push(store_copy(&store, seq).await);
        }
        Standalone { _dir: dir, _stop: stop, store, actor, ids }
    }

    impl Standalone {
        fn enqueue(&self, seqs: std::ops::RangeInclusive<u64>) -> Vec<Command> {
            seqs.map(|seq| {
                Command::Enqueue(Enqueued {
                    recipient: SCHOOL.into(),
                    seq,
                    delivery_id: self.ids[seq as usize - 1].clone(),
                    acknowledge_by_micros: None,
                    recorded: None,
                })
            })
            .collect()
        }

        /// Queues the first `copies` copies and connects the agent with a new stream, in one pass of the actor;
        /// returns the agent's end of the stream.
        async fn connect(&mut self, copies: u64) -> mpsc::Receiver<StreamItem> {
            let (stream, agent) = mpsc::channel(16);
            let mut commands = self.enqueue(1..=copies);
            commands.push(Command::Subscribe { stream, reads: Reads::default() });
            self.step(commands).await;
            agent
        }

        /// One pass of the actor's loop over `commands`, then waits for every commit it submitted.
        async fn step(&mut self, commands: Vec<Command>) {
            self.actor.handle(commands, false).await;
            self.actor.pump();
            self.actor.settle().await;
            self.actor.publish_direct_room(false);
        }

        /// Copy `seq` as its send passes it when the send's commit recorded its first delivery attempt (recorded in
        /// the store here, as the send's commit does).
        async fn recorded(&self, seq: u64) -> Command {
            let delivery_id = self.ids[seq as usize - 1].clone();
            let copy = read_copy(&self.store, SCHOOL, seq, &delivery_id).unwrap().unwrap();
            let mut record: DeliveryRecord =
                records::decode(&self.store.get(&records::delivery_key(&delivery_id)).unwrap().unwrap()).unwrap();
            let entry = record_attempt(&mut record, AuditEntry::now_micros());
            let write = Write::PutBlob(records::delivery_key(&delivery_id), encode_or_empty(&record));
            self.store.commit(Commit { audit: vec![entry], writes: vec![write] }).await.unwrap();
            Command::Enqueue(Enqueued {
                recipient: SCHOOL.into(),
                seq,
                delivery_id,
                acknowledge_by_micros: None,
                recorded: Some(copy),
            })
        }

        fn audit_entries(&self) -> u64 {
            self.store.audit_index().read().unwrap().len()
        }
    }

    fn ack(delivery_id: &str) -> (Command, oneshot::Receiver<Result<(), DeliveryError>>) {
        let (reply, answer) = oneshot::channel();
        let actor = Actor { agency: SCHOOL.into(), ..Actor::default() };
        (Command::Ack { delivery_id: delivery_id.to_owned(), actor, reply }, answer)
    }

    fn received(stream: &mut mpsc::Receiver<StreamItem>) -> Vec<(String, u32)> {
        let mut copies = Vec::new();
        while let Ok(item) = stream.try_recv() {
            let copy = item.unwrap();
            copies.push((copy.delivery_id, copy.attempt));
        }
        copies
    }

    /// A copy queued by an older broker (under a `c/` key of its own) is delivered like the others, and its
    /// acknowledgement deletes that key with its queue entry; a copy attached to its queue entry leaves no key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copies_queued_by_an_older_broker_are_delivered_and_forgotten() {
        let mut test = standalone(1, 8).await;
        test.ids.push(store_copy_laid_out(&test.store, 2, true).await);
        let mut stream = test.connect(2).await;
        let copies = received(&mut stream);
        assert_eq!(copies, [(test.ids[0].clone(), 1), (test.ids[1].clone(), 1)]);
        assert!(test.store.get(&records::copy_key(&test.ids[1])).unwrap().is_some());
        assert!(test.store.get(&records::copy_key(&test.ids[0])).unwrap().is_none(), "attached: no key of its own");

        let (acks, answers): (Vec<_>, Vec<_>) = test.ids.iter().map(|id| ack(id)).unzip();
        test.step(acks).await;
        for answer in answers {
            answer.await.unwrap().unwrap();
        }
        for (seq, id) in (1..).zip(&test.ids) {
            assert_eq!(state_of(&test.store, id), DeliveryState::Acknowledged);
            assert!(test.store.get(&records::queue_key(SCHOOL, seq)).unwrap().is_none());
            assert!(test.store.get(&records::copy_key(id)).unwrap().is_none());
        }
    }

    /// An escalation clears the deadline in each copy's queue entry and leaves the copy where it is: attached to
    /// the entry (written again with it), under its own key (an older broker's), and an entry that is gone is not
    /// written back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_escalation_keeps_each_copy_where_it_is() {
        let mut test = standalone(1, 8).await;
        test.ids.push(store_copy_laid_out(&test.store, 2, true).await);
        test.ids.push(store_copy(&test.store, 3).await);
        let gone = Write::Delete(records::queue_key(SCHOOL, 3));
        test.store.commit(Commit { audit: Vec::new(), writes: vec![gone] }).await.unwrap();

        let due = (1..).zip(&test.ids).map(|(seq, id)| ((0, seq), id.clone())).collect();
        test.actor.escalate(due).await;
        let head = |seq| {
            let value = test.store.get(&records::queue_key(SCHOOL, seq)).unwrap()?;
            records::parse_queue_value(&value)
        };
        assert_eq!(head(1), Some((test.ids[0].clone(), Some(None))), "the deadline is cleared");
        let copy = test.store.get_attachment(&records::queue_key(SCHOOL, 1)).unwrap().unwrap();
        assert_eq!(pb::Delivery::decode(copy.as_slice()).unwrap().delivery_id, test.ids[0]);
        assert_eq!(head(2), Some((test.ids[1].clone(), Some(None))));
        assert!(
            test.store.get(&records::copy_key(&test.ids[1])).unwrap().is_some(),
            "an older copy stays under its key"
        );
        assert_eq!(head(3), None, "an entry that is gone stays gone");
        for id in &test.ids {
            let record: DeliveryRecord =
                records::decode(&test.store.get(&records::delivery_key(id)).unwrap().unwrap()).unwrap();
            assert!(record.escalated);
        }
    }

    /// Acknowledgements of one copy that reach the actor in one batch are all answered with one commit's outcome,
    /// and the acknowledgement is recorded once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repeated_acknowledgements_are_recorded_once() {
        let mut test = standalone(1, 8).await;
        let mut first = test.connect(1).await;
        assert_eq!(received(&mut first).len(), 1);
        let entries_before = test.store.audit_index().read().unwrap().len();
        let (acks, answers): (Vec<_>, Vec<_>) = (0..3).map(|_| ack(&test.ids[0])).unzip();
        test.step(acks).await;
        for answer in answers {
            answer.await.unwrap().unwrap();
        }
        assert_eq!(test.store.audit_index().read().unwrap().len(), entries_before + 1, "one acknowledgement entry");
        assert_eq!(state_of(&test.store, &test.ids[0]), DeliveryState::Acknowledged);
    }

    /// An acknowledgement whose commit fails is answered with the failure and leaves the copy in flight (not sent
    /// again at once, not forgotten); the agent's retry is recorded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_acknowledgement_leaves_the_copy_in_flight() {
        let OneCopyDelivered { store, deliveries, mut stream, delivery_id, _dir, _stop } = one_copy_delivered().await;
        let school = Actor { agency: SCHOOL.into(), ..Actor::default() };
        store.fail_next_journal_write();
        let failed = deliveries.acknowledge(SCHOOL, &delivery_id, school.clone()).await;
        assert!(
            matches!(failed, Err(DeliveryError::Store(StoreError::CommitFailed { .. }))),
            "the failure is reported: {failed:?}"
        );
        assert_eq!(state_of(&store, &delivery_id), DeliveryState::Delivered);
        let again = tokio::time::timeout(Duration::from_millis(300), stream.recv()).await;
        assert!(again.is_err(), "the copy is still in flight, not sent again: {again:?}");
        deliveries.acknowledge(SCHOOL, &delivery_id, school).await.unwrap();
        assert_eq!(state_of(&store, &delivery_id), DeliveryState::Acknowledged);
        assert_eq!(deliveries.queue_stats().unwrap().get(SCHOOL), None, "the copy has left the queue");
    }

    /// A copy acknowledged as its agent reconnects (the acknowledgement and the new stream in one batch: the new
    /// stream puts the copy back in the ready queue first) is not sent on the new stream while its acknowledgement is
    /// recorded; if that commit fails, the copy goes back to the ready queue and out on the new stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_being_acknowledged_is_not_sent_on_a_new_stream() {
        let mut test = standalone(2, 8).await;
        let mut first = test.connect(2).await;
        assert_eq!(received(&mut first).len(), 2);

        let (acknowledging, answer) = ack(&test.ids[0]);
        let (stream, mut second) = mpsc::channel(16);
        test.step(vec![acknowledging, Command::Subscribe { stream, reads: Reads::default() }]).await;
        answer.await.unwrap().unwrap();
        assert_eq!(received(&mut second), vec![(test.ids[1].clone(), 2)], "only the copy not acknowledged");
        assert_eq!(state_of(&test.store, &test.ids[0]), DeliveryState::Acknowledged);

        test.store.fail_next_journal_write();
        let (acknowledging, answer) = ack(&test.ids[1]);
        let (stream, mut third) = mpsc::channel(16);
        test.step(vec![acknowledging, Command::Subscribe { stream, reads: Reads::default() }]).await;
        assert!(answer.await.unwrap().is_err(), "the failed commit is reported");
        test.step(Vec::new()).await;
        assert_eq!(received(&mut third), vec![(test.ids[1].clone(), 3)], "the copy went back to the ready queue");
    }

    /// A copy whose first attempt its send recorded goes to the stream with no commit of the actor's when nothing is
    /// ahead of it, and behind the copies ahead of it otherwise, still without a commit of its own; sends may record
    /// attempts only while the actor is idle with its agent connected, as many as its window has room for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copies_recorded_by_their_sends_keep_order_without_another_commit() {
        let mut test = standalone(3, 8).await;
        test.actor.publish_direct_room(false);
        assert_eq!(test.actor.direct_room.load(Ordering::Acquire), 0, "no stream: no room");
        let mut agent = test.connect(0).await;
        assert_eq!(test.actor.direct_room.load(Ordering::Acquire), 8, "idle and connected: the whole window");

        let first = test.recorded(1).await;
        let third = test.recorded(3).await;
        let entries = test.audit_entries();
        test.step(vec![first]).await;
        assert_eq!(received(&mut agent), vec![(test.ids[0].clone(), 1)]);
        assert_eq!(test.audit_entries(), entries, "no commit of the actor's");
        assert_eq!(test.actor.direct_room.load(Ordering::Acquire), 7);

        // Copy 2 (not recorded) arrives first: copy 3 waits behind it, and only copy 2's attempt is committed.
        let mut commands = test.enqueue(2..=2);
        commands.push(third);
        test.actor.handle(commands, false).await;
        test.actor.pump();
        test.actor.publish_direct_room(false);
        assert_eq!(test.actor.direct_room.load(Ordering::Acquire), 0, "busy: sends record nothing");
        test.actor.settle().await;
        assert_eq!(received(&mut agent), vec![(test.ids[1].clone(), 1), (test.ids[2].clone(), 1)]);
        assert_eq!(test.audit_entries(), entries + 1, "copy 2's delivery only");
    }

    /// Sends may record first attempts for a connected, idle recipient, one place in its window each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sends_reserve_places_in_an_idle_window() {
        let Engine { _dir, _stop, deliveries, .. } =
            engine(DeliveryConfig { max_in_flight: 2, ..DeliveryConfig::default() });
        assert!(!deliveries.reserve_direct(SCHOOL), "no actor, no agent");
        let _stream = deliveries.subscribe(SCHOOL);
        let started = std::time::Instant::now();
        while !deliveries.reserve_direct(SCHOOL) {
            assert!(started.elapsed() < Duration::from_secs(10), "the actor publishes its room once it has the stream");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(deliveries.reserve_direct(SCHOOL));
        assert!(!deliveries.reserve_direct(SCHOOL), "the places published are taken");
    }

    /// When the agent's stream ends, its actor wakes and sends stop recording deliveries to it at once (they would
    /// record copies as delivered while the agent is offline).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sends_stop_recording_deliveries_when_the_stream_ends() {
        let Engine { _dir, _stop, deliveries, .. } = engine(DeliveryConfig::default());
        let stream = deliveries.subscribe(SCHOOL);
        let until = |room: fn(usize) -> bool| {
            let deliveries = deliveries.clone();
            async move {
                let started = std::time::Instant::now();
                while !room(deliveries.direct_room(SCHOOL)) {
                    assert!(started.elapsed() < Duration::from_secs(10), "the actor did not publish");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        until(|room| room > 0).await;
        drop(stream);
        until(|room| room == 0).await;
        assert!(!deliveries.reserve_direct(SCHOOL));
    }

    /// A copy recorded as delivered by its send, for a stream that has ended before the copy reached it, goes to the
    /// agent's next stream as an attempt recorded of its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_recorded_for_a_stream_that_ended_is_recorded_again_when_handed_over() {
        let mut test = standalone(1, 8).await;
        let first = test.connect(0).await;
        drop(first);
        let recorded = test.recorded(1).await;
        let entries = test.audit_entries();
        test.step(vec![recorded]).await;
        let mut second = test.connect(0).await;
        assert_eq!(received(&mut second), vec![(test.ids[0].clone(), 2)]);
        assert_eq!(test.audit_entries(), entries + 1, "the hand-off is audited");
    }

    /// A late acknowledgement of a copy waiting out a retry delay takes it out of that wait; if its commit fails, the
    /// copy goes back to the same wait (not to the ready queue, which would send it again at once).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_late_acknowledgement_puts_the_copy_back_in_its_retry_delay() {
        let mut test = standalone(1, 8).await;
        let mut agent = test.connect(1).await;
        assert_eq!(received(&mut agent).len(), 1);
        let (reply, answer) = oneshot::channel();
        let school = Actor { agency: SCHOOL.into(), ..Actor::default() };
        let delay = Duration::from_secs(60);
        let nack =
            Command::Nack { delivery_id: test.ids[0].clone(), actor: school, delay, reason: "busy".into(), reply };
        test.step(vec![nack]).await;
        answer.await.unwrap().unwrap();
        assert!(test.actor.delayed_at.contains_key(&1), "waiting out its retry delay");

        test.store.fail_next_journal_write();
        let (acknowledging, answer) = ack(&test.ids[0]);
        test.step(vec![acknowledging]).await;
        assert!(answer.await.unwrap().is_err(), "the failed commit is reported");
        assert!(test.actor.delayed_at.contains_key(&1), "back in its retry delay");
        assert!(test.actor.ready.is_empty());
        assert_eq!(received(&mut agent), Vec::new(), "not sent again before its delay");
    }

    /// A copy whose acknowledgement is being recorded does not wake the actor when its wait runs out (it would wake
    /// it at once, over and over, until the commit ends).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_being_acknowledged_does_not_wake_the_actor() {
        let mut test = standalone(1, 8).await;
        let _agent = test.connect(1).await;
        let passed = Instant::now() - Duration::from_secs(1);
        test.actor.in_flight.set_deadline(&test.ids[0], passed);
        assert_eq!(test.actor.next_wake(), Some(passed), "a copy whose wait ran out wakes the actor");
        // Its acknowledgement's commit is submitted and its outcome not yet handled.
        test.store.fail_next_journal_write();
        let (acknowledging, answer) = ack(&test.ids[0]);
        test.actor.handle(vec![acknowledging], false).await;
        assert_eq!(test.actor.next_wake(), None);
        test.actor.expire_timers().await;
        assert!(test.actor.in_flight.contains_key(&test.ids[0]), "its wait does not run out meanwhile");
        // The commit failed: the copy is still in flight, and its wait runs again.
        test.actor.settle().await;
        assert!(answer.await.unwrap().is_err(), "the failed commit is reported");
        assert_eq!(test.actor.next_wake(), Some(passed));
        test.actor.expire_timers().await;
        assert!(!test.actor.in_flight.contains_key(&test.ids[0]), "its wait ran out");
        assert_eq!(test.actor.ready.first(9, u64::MAX), vec![(1, test.ids[0].clone())], "put back for redelivery");
    }

    /// Copies whose "delivered" commit is under way when the agent reconnects reach the new stream in queue order
    /// with the copies put back from flight (not ahead of them).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copies_being_delivered_when_the_agent_reconnects_go_out_in_order() {
        let mut test = standalone(8, 8).await;
        let mut first = test.connect(4).await;
        assert_eq!(received(&mut first).len(), 4);
        // Copies 5 to 8 are being delivered (their commit submitted, its outcome not handled) when the agent
        // reconnects.
        test.actor.handle(test.enqueue(5..=8), false).await;
        test.actor.pump();
        assert_eq!(test.actor.delivering.len(), 4);
        let mut second = test.connect(0).await;
        let order: Vec<String> = received(&mut second).into_iter().map(|(id, _)| id).collect();
        assert_eq!(order, test.ids, "in queue order on the new stream");
    }

    /// The agencies with queued copies, and each one's highest sequence number, are found by seeking, for any mix
    /// of agency ids (one a prefix of another).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_agencies_are_found_by_seeking() {
        let dir = tempfile::tempdir().unwrap();
        let audit = crate::audit::AuditLog::open(&dir.path().join("audit")).unwrap();
        let (store, _) = Store::open(dir.path(), audit, crate::store::StoreOptions::for_tests()).unwrap();
        assert!(queued_agencies(&store).unwrap().is_empty());
        let mut writes = Vec::new();
        for (agency, seq) in [("a", 5), ("a", 12), ("a-b", 3), ("ab", 40), ("ab", 7), ("b9", 100_000_000_000)] {
            writes.push(Write::Put(records::queue_key(agency, seq), records::queue_value("x", None)));
        }
        writes.push(Write::Put(b"r/after-the-queues".to_vec(), Vec::new()));
        store.commit(Commit { audit: Vec::new(), writes }).await.unwrap();
        // In key order: `q/a-b/` sorts before `q/a/` ('-' before '/').
        assert_eq!(
            queued_agencies(&store).unwrap(),
            vec![("a-b".into(), 3), ("a".into(), 12), ("ab".into(), 40), ("b9".into(), 100_000_000_000)]
        );
    }

    /// After shutdown no actor starts (none would be waited for, and its commits would meet a closed store): an
    /// acknowledgement is answered at once, and a copy queued then stays in the store for the next start.
    #[tokio::test]
    async fn no_actor_starts_after_shutdown() {
        let Engine { _dir, _stop, store, deliveries } = engine(DeliveryConfig::default());
        let queued = store_copy(&store, 1).await;
        deliveries.shutdown().await;
        let school = Actor { agency: SCHOOL.into(), ..Actor::default() };
        let answer = tokio::time::timeout(Duration::from_secs(10), deliveries.acknowledge(SCHOOL, &queued, school));
        assert!(matches!(answer.await.unwrap(), Err(DeliveryError::ShuttingDown)));
        deliveries.enqueued(Enqueued {
            recipient: SCHOOL.into(),
            seq: 1,
            delivery_id: queued.clone(),
            acknowledge_by_micros: None,
            recorded: None,
        });
        assert!(deliveries.shared.actors.lock().unwrap().is_empty());
        assert!(deliveries.shared.tasks.lock().unwrap().is_empty());
        assert!(read_copy(&store, SCHOOL, 1, &queued).unwrap().is_some());
    }

    /// A due escalation whose delivery record cannot be read is put back and retried a second later (it was lost
    /// until a restart), and escalates once the record reads again.
    #[tokio::test]
    async fn an_escalation_whose_record_cannot_be_read_is_retried() {
        let mut school = standalone(1, 16).await;
        let delivery_id = school.ids[0].clone();
        school.actor.depth.fetch_add(1, Ordering::Relaxed);
        let passed = AuditEntry::now_micros() - 1_000;
        school
            .step(vec![Command::Enqueue(Enqueued {
                recipient: SCHOOL.into(),
                seq: 1,
                delivery_id: delivery_id.clone(),
                acknowledge_by_micros: Some(passed),
                recorded: None,
            })])
            .await;
        school.store.fail_reads_under(&records::delivery_key(&delivery_id));
        school.actor.expire_timers().await;
        let (when, seq) = *school.actor.deadlines.first().expect("put back");
        assert_eq!(seq, 1);
        assert!(when > AuditEntry::now_micros(), "retried later, not at once");
        school.store.mend_reads();
        assert!(!state_of_record(&school.store, &delivery_id).escalated);
        // The retry falls due (brought forward here rather than waited for).
        school.actor.deadlines = BTreeSet::from([(AuditEntry::now_micros() - 1, 1)]);
        school.actor.expire_timers().await;
        assert!(state_of_record(&school.store, &delivery_id).escalated);
        assert!(school.actor.deadlines.is_empty());
    }

    /// A copy whose acknowledgement wait ran out and whose record cannot be read stays in flight, its wait running
    /// out again a second later (it was lost from the actor until a restart); once the record reads, it is put back
    /// for redelivery.
    #[tokio::test]
    async fn a_copy_whose_wait_ran_out_and_whose_record_cannot_be_read_stays_in_flight() {
        let mut school = standalone(1, 16).await;
        let delivery_id = school.ids[0].clone();
        let mut agent = school.connect(1).await;
        assert_eq!(received(&mut agent), vec![(delivery_id.clone(), 1)]);
        let passed = Instant::now() - Duration::from_millis(1);
        school.actor.in_flight.set_deadline(&delivery_id, passed);
        school.store.fail_reads_under(&records::delivery_key(&delivery_id));
        school.actor.expire_timers().await;
        let entry = school.actor.in_flight.get(&delivery_id).expect("still in flight");
        assert!(entry.deadline > Instant::now());
        school.store.mend_reads();
        school.actor.in_flight.set_deadline(&delivery_id, passed);
        school.actor.expire_timers().await;
        assert!(school.actor.in_flight.is_empty());
        assert_eq!(school.actor.ready.first(9, u64::MAX), vec![(1, delivery_id)]);
    }

    fn state_of_record(store: &Store, delivery_id: &str) -> DeliveryRecord {
        records::decode(&store.get(&records::delivery_key(delivery_id)).unwrap().unwrap()).unwrap()
    }

    /// A queued copy whose delivery record is missing is dropped from the queue with its deadline (which stayed until
    /// it fell due before), and the rest still go out.
    #[tokio::test]
    async fn a_copy_without_its_record_is_dropped_with_its_deadline() {
        let mut school = standalone(2, 16).await;
        let lost = school.ids[0].clone();
        school
            .store
            .commit(Commit { audit: Vec::new(), writes: vec![Write::Delete(records::delivery_key(&lost))] })
            .await
            .unwrap();
        let far = AuditEntry::now_micros() + 3_600_000_000;
        let mut commands = Vec::new();
        for (seq, delivery_id) in [(1, lost.clone()), (2, school.ids[1].clone())] {
            school.actor.depth.fetch_add(1, Ordering::Relaxed);
            commands.push(Command::Enqueue(Enqueued {
                recipient: SCHOOL.into(),
                seq,
                delivery_id,
                acknowledge_by_micros: Some(far + seq as i64),
                recorded: None,
            }));
        }
        let (stream, mut agent) = mpsc::channel(16);
        commands.push(Command::Subscribe { stream, reads: Reads::default() });
        school.step(commands).await;
        assert_eq!(received(&mut agent), vec![(school.ids[1].clone(), 1)]);
        assert_eq!(school.actor.deadlines.iter().map(|(_, seq)| *seq).collect::<Vec<_>>(), vec![2]);
        assert_eq!(school.actor.depth.load(Ordering::Relaxed), 1);
    }

    /// Copies sent while the stored queue loads wait beside the ready queue, not in it (each loaded copy would go in
    /// front of them and move them all), are found there when a deadline falls due, and join it behind the whole
    /// stored queue, in order, when the load ends.
    #[tokio::test]
    async fn copies_sent_while_loading_wait_behind_the_whole_stored_queue() {
        let mut school = standalone(6, 16).await;
        school.actor.shared.stored_up_to.store(4, Ordering::Relaxed);
        school.actor.loading = true;
        // Sends of copies 6 and 5 (their commits finished in that order), then the loader's 1 to 4.
        let mut commands = school.enqueue(6..=6);
        commands.extend(school.enqueue(5..=5));
        commands.extend(school.enqueue(1..=4));
        school.actor.handle(commands, false).await;
        let ready: Vec<u64> = school.actor.ready.first(usize::MAX, u64::MAX).into_iter().map(|(seq, _)| seq).collect();
        assert_eq!(ready, vec![1, 2, 3, 4]);
        assert_eq!(school.actor.sent_while_loading.len(), 2);
        assert_eq!(school.actor.id_for_seq(5).as_deref(), Some(school.ids[4].as_str()));
        school.actor.handle(vec![Command::Loaded], false).await;
        assert!(school.actor.sent_while_loading.is_empty());
        let ready: Vec<(u64, String)> = school.actor.ready.first(usize::MAX, u64::MAX);
        let expected: Vec<(u64, String)> = (1..=6).map(|seq| (seq, school.ids[seq as usize - 1].clone())).collect();
        assert_eq!(ready, expected);
        // Once loaded, a send goes straight into the ready queue.
        school.actor.handle(school.enqueue(6..=6), false).await;
        assert!(school.actor.sent_while_loading.is_empty());
    }

    /// Whatever form a delivery id has, the ready queue gives back exactly the id it was given, finds it by id, and
    /// keeps the broker's own (UUID message ids) in 16 bytes.
    #[test]
    fn ready_copies_give_back_their_ids_exactly() {
        let mut ready = Ready::new("luton-oakwood-primary".to_owned());
        let uuid = uuid::Uuid::now_v7().to_string();
        let ids = [
            records::delivery_id(&uuid, "luton-oakwood-primary"),
            records::delivery_id(&uuid.to_uppercase(), "luton-oakwood-primary"),
            records::delivery_id(&uuid, "another-agency"),
            records::delivery_id("not-a-uuid", "luton-oakwood-primary"),
            "luton-oakwood-primary".to_owned(),
        ];
        for (seq, id) in ids.iter().enumerate() {
            ready.insert(seq as u64, id.clone());
        }
        assert!(!ready.others.contains_key(&0));
        assert_eq!(ready.others.len(), ids.len() - 1);
        for (seq, id) in ids.iter().enumerate() {
            assert_eq!(ready.get(seq as u64).as_deref(), Some(id.as_str()));
            assert_eq!(ready.find(id), Some(seq as u64));
        }
        assert_eq!(ready.first(2, u64::MAX), vec![(0, ids[0].clone()), (1, ids[1].clone())]);
        assert_eq!(ready.first(9, 0), vec![(0, ids[0].clone())]);
        assert_eq!(ready.find(&records::delivery_id(&uuid::Uuid::now_v7().to_string(), "luton-oakwood-primary")), None);
        ready.remove(0);
        assert_eq!(ready.get(0), None);
        assert_eq!(ready.find(&ids[0]), None);
        // A UUID id replacing another id under the same sequence number is not read as the old one.
        ready.insert(3, ids[0].clone());
        assert_eq!(ready.get(3).as_deref(), Some(ids[0].as_str()));
        assert_eq!(ready.find(&ids[3]), None);
        assert_eq!(ready.others.len(), ids.len() - 2);
    }

    /// Copies inserted in any order come out in sequence order, wherever they are removed from.
    #[test]
    fn ready_copies_keep_sequence_order() {
        let mut ready = Ready::new(SCHOOL.to_owned());
        let id = |seq: u64| records::delivery_id(&uuid::Uuid::from_u128(u128::from(seq) << 64 | 7).to_string(), SCHOOL);
        // At the back, at the front, in the middle, and one repeated.
        for seq in [50, 60, 70, 10, 20, 65, 15, 80, 55, 65] {
            ready.insert(seq, id(seq));
        }
        ready.insert(30, "an-older-id".to_owned());
        let order: Vec<u64> = ready.first(usize::MAX, u64::MAX).into_iter().map(|(seq, _)| seq).collect();
        assert_eq!(order, vec![10, 15, 20, 30, 50, 55, 60, 65, 70, 80]);
        for (seq, delivery_id) in ready.first(usize::MAX, u64::MAX) {
            let expected = if seq == 30 { "an-older-id".to_owned() } else { id(seq) };
            assert_eq!(delivery_id, expected);
        }
        assert_eq!(ready.first(3, 55).len(), 3);
        assert_eq!(ready.first(9, 55).last().map(|(seq, _)| *seq), Some(55));
        for seq in [10, 65, 80, 30, 999] {
            ready.remove(seq);
        }
        let order: Vec<u64> = ready.first(usize::MAX, u64::MAX).into_iter().map(|(seq, _)| seq).collect();
        assert_eq!(order, vec![15, 20, 50, 55, 60, 70]);
        assert!(ready.others.is_empty());
        assert_eq!(ready.find(&id(55)), Some(55));
        // A long queue drained gives back its room.
        for seq in 1_000..21_000 {
            ready.insert(seq, id(seq));
        }
        let full = ready.ids.capacity();
        for seq in 1_000..20_990 {
            ready.remove(seq);
        }
        assert!(ready.ids.capacity() < full / 4, "{} of {full}", ready.ids.capacity());
        assert_eq!(ready.first(usize::MAX, u64::MAX).len(), 16);
    }
}
