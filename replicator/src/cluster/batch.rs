//! A node's grant transactions, sent to etcd together: each volume's compare-and-swap of its
//! `grants/NAME` record stays its own (nested) transaction, with its own compares and its own
//! outcome, but those queued while one batch is in flight go to etcd as one request, one raft
//! proposal.
//!
//! Why: when a node is lost, every volume that shared a link with it changes its record at once
//! (a survivor asking to acknowledge alone, a secondary taking over). In the control-plane
//! simulation at 1,000 nodes that was up to 67,000 etcd writes a second, one per volume, all in
//! the second after the link timeout; batched, it is one write per node per round trip
//! (docs/cluster.md, "Past one machine"). A lone request goes out at once, as before: batching
//! adds no wait, only what queues behind a batch in flight waits for it.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

/// The compares [`Batcher::put_if`] takes.
pub use etcd_client::{Compare, CompareOp};
use etcd_client::{Txn, TxnOp, TxnOpResponse};
use tokio::sync::oneshot;

use super::Cluster;
use crate::{ReplError, Result};

/// Transactions one batch carries at most: 128, etcd's default `--max-txn-ops`, the most
/// operations it accepts in one transaction (it counts each nested transaction as one operation
/// of the outer one). A larger burst goes out as several batches, one after the other.
pub const BATCH_TXNS_MAX: usize = 128;

/// One volume's transaction: put `value` at `key` if every compare holds.
struct Queued {
    key: String,
    when: Vec<Compare>,
    value: Vec<u8>,
    reply: oneshot::Sender<Result<bool>>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Queued>,
    /// A task is sending batches (it sends until the queue is empty).
    sending: bool,
}

/// The grant transactions of one node's volumes (one per [`super::authority::Etcd`]).
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
    /// they held. A batch that fails in transport fails each of its transactions with that error
    /// (none of them, or all, may have been applied, as with a lone transaction whose answer was
    /// lost).
    pub async fn put_if(&self, when: Vec<Compare>, key: String, value: Vec<u8>) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut q = self.queue.lock().expect("batch queue");
            q.waiting.push_back(Queued { key, when, value, reply });
            !std::mem::replace(&mut q.sending, true)
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
                q.sending = false;
                return;
            }
            batch
        };
        let mut replies = Vec::with_capacity(batch.len());
        let mut ops = Vec::with_capacity(batch.len());
        for q in batch {
            let put = TxnOp::put(q.key, q.value, None);
            ops.push(TxnOp::txn(Txn::new().when(q.when).and_then(vec![put])));
            replies.push(q.reply);
        }
        match cluster.client().kv_client().txn(Txn::new().and_then(ops)).await {
            Ok(resp) => {
                let outcomes = resp.op_responses();
                for (i, reply) in replies.into_iter().enumerate() {
                    let held = match outcomes.get(i) {
                        Some(TxnOpResponse::Txn(t)) => Ok(t.succeeded()),
                        other => Err(ReplError::Stopped(format!("etcd answered a batch with {other:?}"))),
                    };
                    let _ = reply.send(held);
                }
            }
            Err(e) => {
                let why = cluster.err(e).to_string();
                for reply in replies {
                    let _ = reply.send(Err(ReplError::Stopped(why.clone())));
                }
            }
        }
    }
}

/// The next batch: up to [`BATCH_TXNS_MAX`] transactions in the order they came, at most one per
/// key (etcd refuses a transaction that puts one key twice; a second request for a key waits for
/// the next batch, and decides from what the first left). Those whose caller gave up are dropped
/// unsent.
fn take_batch(waiting: &mut VecDeque<Queued>) -> Vec<Queued> {
    let mut batch = Vec::new();
    let mut keys = HashSet::new();
    let mut later = VecDeque::new();
    while let Some(q) = waiting.pop_front() {
        if q.reply.is_closed() {
            continue;
        }
        if batch.len() == BATCH_TXNS_MAX || keys.contains(&q.key) {
            later.push_back(q);
            continue;
        }
        keys.insert(q.key.clone());
        batch.push(q);
    }
    *waiting = later;
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(key: &str) -> (Queued, oneshot::Receiver<Result<bool>>) {
        let (reply, rx) = oneshot::channel();
        (Queued { key: key.into(), when: vec![], value: vec![], reply }, rx)
    }

    #[test]
    fn a_batch_takes_each_key_once_in_order_up_to_the_bound_and_drops_the_abandoned() {
        let mut waiting = VecDeque::new();
        let mut answers = Vec::new();
        for k in ["a", "b", "a", "c"] {
            let (q, rx) = queued(k);
            waiting.push_back(q);
            answers.push(rx);
        }
        drop(answers.remove(3)); // c's caller gave up
        let keys = |b: &[Queued]| b.iter().map(|q| q.key.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&take_batch(&mut waiting)), ["a", "b"]);
        assert_eq!(keys(&take_batch(&mut waiting)), ["a"]);
        assert!(take_batch(&mut waiting).is_empty());

        for i in 0..BATCH_TXNS_MAX + 3 {
            let (q, rx) = queued(&format!("k{i}"));
            waiting.push_back(q);
            answers.push(rx);
        }
        assert_eq!(take_batch(&mut waiting).len(), BATCH_TXNS_MAX);
        assert_eq!(keys(&take_batch(&mut waiting)), ["k128", "k129", "k130"]);
    }
}
