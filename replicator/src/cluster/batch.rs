//! A node's requests to etcd about its volumes' records, sent together: each volume's
//! compare-and-swap of its `grants/NAME` record stays its own (nested) transaction, with its own
//! compares and its own outcome, and each volume's reads stay its own, but the requests queued
//! while one batch is in flight go to etcd as one request: one transaction, one raft proposal if
//! it writes, one linearizable read if it only reads.
//!
//! Why: when a node is lost, every volume that shared a link with it reads and changes its record
//! at once (a survivor asking to acknowledge alone, a secondary taking over). In the control-plane
//! simulation at 1,000 nodes that was up to 67,000 etcd writes a second, one per volume, all in the
//! second after the link timeout; batched, it is one write per node per round trip
//! (docs/cluster.md, "Past one machine"). A lone request goes out at once, as before: batching
//! adds no wait, only what queues behind the batch in flight waits for it. A batch that takes
//! longer than [`BATCH_STALL`] (a request hung on a frozen etcd member, until the client's 5 s
//! timeout) does not hold the others: the next request starts another batch beside it, up to
//! [`BATCHES_IN_FLIGHT_MAX`].
//!
//! Needs etcd 3.3 or later (nested transactions); Debian's etcd-server is 3.4.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use etcd_client::{Txn, TxnOp, TxnOpResponse};
use tokio::sync::oneshot;

/// The compares [`Batcher::put_if`] takes.
pub use etcd_client::{Compare, CompareOp};

use super::Cluster;
use crate::{ReplError, Result};

/// Operations one batch carries at most: 128, etcd's default `--max-txn-ops`, the most
/// operations it accepts in one transaction (a nested transaction counts as one operation of the
/// outer one, a read of one key as one). A larger burst goes out as several batches, one after the
/// other.
pub const BATCH_TXNS_MAX: usize = 128;

/// Batches one node has in flight at once: 4, of which more than one only while a batch is stalled
/// ([`BATCH_STALL`]). One batch in flight batches the most, but a request that hangs (an etcd
/// member that froze, until the client's 5 s timeout or its keep-alive ends it) would then hold
/// every other volume's request behind it; beside it, the others go on through the members that
/// answer.
pub const BATCHES_IN_FLIGHT_MAX: usize = 4;

/// How long the batches in flight may go without an answer before a new request starts another
/// batch beside them: 50 ms, some fifty etcd round trips on a local network and a hundredth of
/// the client's request timeout. On a 4-node failover, one batch in flight took 5 etcd writes
/// where four at once from the start took 17.
pub const BATCH_STALL: std::time::Duration = std::time::Duration::from_millis(50);

/// A key's value and the revision that last changed it.
pub type Read = Option<(Vec<u8>, i64)>;

enum Op {
    /// Put `value` at `key` if every compare holds.
    PutIf { key: String, when: Vec<Compare>, value: Vec<u8> },
    /// Read these keys.
    Get { keys: Vec<String> },
}

impl Op {
    fn ops(&self) -> usize {
        match self {
            Op::PutIf { .. } => 1,
            Op::Get { keys } => keys.len(),
        }
    }
}

enum Answer {
    Held(bool),
    Got(Vec<Read>),
}

struct Queued {
    op: Op,
    reply: oneshot::Sender<Result<Answer>>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Queued>,
    /// Tasks sending batches (each sends until the queue is empty).
    senders: usize,
    /// When a sender last took a batch or had one answered.
    progress: Option<std::time::Instant>,
}

impl Queue {
    /// Whether a request queued `now` starts a sender (and counts it): if none is sending, or if
    /// those sending have had no answer for [`BATCH_STALL`] and fewer than
    /// [`BATCHES_IN_FLIGHT_MAX`] are.
    fn start_sender(&mut self, now: std::time::Instant) -> bool {
        let stalled = self.progress.is_some_and(|t| now.saturating_duration_since(t) >= BATCH_STALL);
        let start = self.senders == 0 || (stalled && self.senders < BATCHES_IN_FLIGHT_MAX);
        if start {
            self.senders += 1;
            self.progress = Some(now);
        }
        start
    }
}

/// The record requests of one node's volumes (one per [`super::authority::Etcd`]).
#[derive(Clone)]
pub struct Batcher {
    cluster: Cluster,
    queue: Arc<Mutex<Queue>>,
}

impl Batcher {
    pub fn new(cluster: Cluster) -> Batcher {
        Batcher { cluster, queue: Arc::default() }
    }

    /// Puts `value` at `key` if every compare of `when` holds, in the next batch; answers whether
    /// they held. A batch that fails in transport fails each of its requests with that error
    /// (none of them, or all, may have been applied, as with a lone transaction whose answer was
    /// lost).
    pub async fn put_if(&self, when: Vec<Compare>, key: String, value: Vec<u8>) -> Result<bool> {
        match self.ask(Op::PutIf { key, when, value }).await? {
            Answer::Held(held) => Ok(held),
            Answer::Got(_) => unreachable!("a put answered as a read"),
        }
    }

    /// Reads `keys` (at most [`BATCH_TXNS_MAX`]), all at one revision, in the next batch.
    pub async fn get(&self, keys: Vec<String>) -> Result<Vec<Read>> {
        assert!(!keys.is_empty() && keys.len() <= BATCH_TXNS_MAX, "{} keys in one read", keys.len());
        match self.ask(Op::Get { keys }).await? {
            Answer::Got(values) => Ok(values),
            Answer::Held(_) => unreachable!("a read answered as a put"),
        }
    }

    async fn ask(&self, op: Op) -> Result<Answer> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut q = self.queue.lock().expect("batch queue");
            q.waiting.push_back(Queued { op, reply });
            q.start_sender(std::time::Instant::now())
        };
        if start {
            // On a task of its own: a caller that gives up (its request timed out) must not stop
            // the batches of the others.
            tokio::spawn(send_all(self.cluster.clone(), self.queue.clone()));
        }
        answer.await.unwrap_or_else(|_| Err(ReplError::Stopped("the etcd batch was dropped".into())))
    }
}

/// Sends batches until the queue is empty.
async fn send_all(cluster: Cluster, queue: Arc<Mutex<Queue>>) {
    loop {
        let batch = {
            let mut q = queue.lock().expect("batch queue");
            let batch = take_batch(&mut q.waiting);
            if batch.is_empty() {
                q.senders -= 1;
                return;
            }
            q.progress = Some(std::time::Instant::now());
            batch
        };
        let mut shapes = Vec::with_capacity(batch.len());
        let mut ops = Vec::new();
        for q in batch {
            match q.op {
                Op::PutIf { key, when, value } => {
                    let put = TxnOp::put(key, value, None);
                    ops.push(TxnOp::txn(Txn::new().when(when).and_then(vec![put])));
                    shapes.push((q.reply, None));
                }
                Op::Get { keys } => {
                    shapes.push((q.reply, Some(keys.len())));
                    ops.extend(keys.into_iter().map(|k| TxnOp::get(k, None)));
                }
            }
        }
        let answer = cluster.client().kv_client().txn(Txn::new().and_then(ops)).await;
        queue.lock().expect("batch queue").progress = Some(std::time::Instant::now());
        match answer {
            Ok(resp) => {
                let mut outcomes = resp.op_responses().into_iter();
                for (reply, shape) in shapes {
                    let answer = match shape {
                        None => match outcomes.next() {
                            Some(TxnOpResponse::Txn(t)) => Ok(Answer::Held(t.succeeded())),
                            other => Err(unexpected(other)),
                        },
                        Some(n) => (0..n)
                            .map(|_| match outcomes.next() {
                                Some(TxnOpResponse::Get(g)) => {
                                    Ok(g.kvs().first().map(|kv| (kv.value().to_vec(), kv.mod_revision())))
                                }
                                other => Err(unexpected(other)),
                            })
                            .collect::<Result<Vec<Read>>>()
                            .map(Answer::Got),
                    };
                    let _ = reply.send(answer);
                }
            }
            Err(e) => {
                let why = cluster.err(e).to_string();
                for (reply, _) in shapes {
                    let _ = reply.send(Err(ReplError::Stopped(why.clone())));
                }
            }
        }
    }
}

fn unexpected(got: Option<TxnOpResponse>) -> ReplError {
    ReplError::Stopped(format!("etcd answered a batch with {got:?}"))
}

/// The next batch: up to [`BATCH_TXNS_MAX`] operations in the order they came, at most one put per
/// key (etcd refuses a transaction that puts one key twice; a second put of a key waits for the
/// next batch, and decides from what the first left). Those whose caller gave up are dropped
/// unsent.
fn take_batch(waiting: &mut VecDeque<Queued>) -> Vec<Queued> {
    let mut batch = Vec::new();
    let (mut ops, mut keys) = (0, HashSet::new());
    let mut later = VecDeque::new();
    while let Some(q) = waiting.pop_front() {
        if q.reply.is_closed() {
            continue;
        }
        let put_key = match &q.op {
            Op::PutIf { key, .. } => Some(key.clone()),
            Op::Get { .. } => None,
        };
        if ops + q.op.ops() > BATCH_TXNS_MAX || put_key.as_ref().is_some_and(|k| keys.contains(k)) {
            later.push_back(q);
            continue;
        }
        ops += q.op.ops();
        keys.extend(put_key);
        batch.push(q);
    }
    *waiting = later;
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(op: Op) -> (Queued, oneshot::Receiver<Result<Answer>>) {
        let (reply, rx) = oneshot::channel();
        (Queued { op, reply }, rx)
    }

    fn put(key: &str) -> Op {
        Op::PutIf { key: key.into(), when: vec![], value: vec![] }
    }

    fn what(b: &[Queued]) -> Vec<String> {
        b.iter()
            .map(|q| match &q.op {
                Op::PutIf { key, .. } => format!("put {key}"),
                Op::Get { keys } => format!("get {}", keys.join(" ")),
            })
            .collect()
    }

    #[test]
    fn one_batch_is_in_flight_unless_it_stalls() {
        let t0 = std::time::Instant::now();
        let mut q = Queue::default();
        assert!(q.start_sender(t0), "nothing in flight: a request goes at once");
        assert!(!q.start_sender(t0 + BATCH_STALL / 2), "a batch in flight: the next waits for it");
        // Stalled: another batch goes beside it, and so on up to the bound.
        let mut at = t0;
        for _ in 1..BATCHES_IN_FLIGHT_MAX {
            at += BATCH_STALL;
            assert!(q.start_sender(at));
        }
        assert!(!q.start_sender(at + BATCH_STALL * 10), "more than {BATCHES_IN_FLIGHT_MAX} in flight");
        assert_eq!(q.senders, BATCHES_IN_FLIGHT_MAX);
    }

    #[test]
    fn a_batch_puts_each_key_once_in_order_up_to_the_bound_and_drops_the_abandoned() {
        let mut waiting = VecDeque::new();
        let mut answers = Vec::new();
        for op in [put("a"), put("b"), Op::Get { keys: vec!["a".into(), "c".into()] }, put("a"), put("c")] {
            let (q, rx) = queued(op);
            waiting.push_back(q);
            answers.push(rx);
        }
        drop(answers.remove(4)); // c's caller gave up
        assert_eq!(what(&take_batch(&mut waiting)), ["put a", "put b", "get a c"]);
        assert_eq!(what(&take_batch(&mut waiting)), ["put a"]);
        assert!(take_batch(&mut waiting).is_empty());

        // The bound counts operations: a read of two keys is two.
        for i in 0..BATCH_TXNS_MAX - 1 {
            let (q, rx) = queued(put(&format!("k{i}")));
            waiting.push_back(q);
            answers.push(rx);
        }
        for op in [Op::Get { keys: vec!["x".into(), "y".into()] }, put("z")] {
            let (q, rx) = queued(op);
            waiting.push_back(q);
            answers.push(rx);
        }
        let first = take_batch(&mut waiting);
        assert_eq!(first.len(), BATCH_TXNS_MAX);
        assert_eq!(what(&first).last().unwrap(), "put z");
        assert_eq!(what(&take_batch(&mut waiting)), ["get x y"]);
    }
}
