//! The inference worker pool: plain OS threads fed by a bounded queue, so the async side only
//! moves bytes and a slow upload never holds a worker. A full queue is refused at once
//! ([`Pool::submit`] returns [`Full`]) instead of piling up; a task whose client has gone is
//! skipped; a panic in a task is caught, answered as [`Outcome::Panicked`], logged with the
//! request id, and its worker thread is replaced by a fresh one.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::oneshot;

/// How a task ended.
#[derive(Debug)]
pub enum Outcome<R> {
    /// The handler returned.
    Done(R),
    /// The handler panicked with this message; its worker was replaced.
    Panicked(String),
}

/// The queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// Counters of the pool, shared with the metrics.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Tasks waiting in the queue.
    pub queued: AtomicUsize,
    /// Tasks being handled.
    pub running: AtomicUsize,
    /// Handler panics caught (each replaced its worker).
    pub panics: AtomicU64,
    /// Tasks skipped because their client had stopped waiting.
    pub abandoned: AtomicU64,
    /// Live worker threads.
    pub workers: AtomicUsize,
}

struct Task<J, R> {
    id: String,
    job: J,
    reply: oneshot::Sender<Outcome<R>>,
}

type Handler<J, R> = Arc<dyn Fn(&str, J) -> R + Send + Sync>;

/// A fixed number of worker threads behind a bounded queue.
pub struct Pool<J, R> {
    tx: crossbeam_channel::Sender<Task<J, R>>,
    stats: Arc<PoolStats>,
}

impl<J, R> std::fmt::Debug for Pool<J, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<J: Send + 'static, R: Send + 'static> Pool<J, R> {
    /// Start `workers` threads (at least 1) sharing a queue of `capacity` waiting tasks (at
    /// least 1); `handler(request_id, job)` runs on a worker thread.
    pub fn new(
        workers: usize,
        capacity: usize,
        handler: impl Fn(&str, J) -> R + Send + Sync + 'static,
    ) -> Pool<J, R> {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        let stats = Arc::new(PoolStats::default());
        let handler: Handler<J, R> = Arc::new(handler);
        for _ in 0..workers.max(1) {
            spawn_worker(rx.clone(), handler.clone(), stats.clone());
        }
        Pool { tx, stats }
    }

    /// Queue a task; the receiver gets its outcome. [`Full`] when the queue is full.
    pub fn submit(&self, id: &str, job: J) -> Result<oneshot::Receiver<Outcome<R>>, Full> {
        let (reply, rx) = oneshot::channel();
        // Counted before the send so a worker never sees the count below zero.
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        let task = Task {
            id: id.to_string(),
            job,
            reply,
        };
        match self.tx.try_send(task) {
            Ok(()) => Ok(rx),
            Err(_) => {
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                Err(Full)
            }
        }
    }

    /// The pool's counters.
    pub fn stats(&self) -> &Arc<PoolStats> {
        &self.stats
    }
}

fn spawn_worker<J: Send + 'static, R: Send + 'static>(
    rx: crossbeam_channel::Receiver<Task<J, R>>,
    handler: Handler<J, R>,
    stats: Arc<PoolStats>,
) {
    stats.workers.fetch_add(1, Ordering::SeqCst);
    let on_fail = stats.clone();
    let spawned = std::thread::Builder::new()
        .name("evl-serve-worker".into())
        .spawn(move || {
            // Ends when the pool (every sender) is dropped and the queue is drained.
            while let Ok(task) = rx.recv() {
                stats.queued.fetch_sub(1, Ordering::SeqCst);
                if task.reply.is_closed() {
                    stats.abandoned.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                stats.running.fetch_add(1, Ordering::SeqCst);
                let Task { id, job, reply } = task;
                let result = catch_unwind(AssertUnwindSafe(|| handler(&id, job)));
                stats.running.fetch_sub(1, Ordering::SeqCst);
                match result {
                    Ok(r) => {
                        let _ = reply.send(Outcome::Done(r));
                    }
                    Err(payload) => {
                        let what = payload
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| payload.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic without a message".into());
                        tracing::error!(request_id = %id, panic = %what, "worker panicked; replacing it");
                        stats.panics.fetch_add(1, Ordering::Relaxed);
                        let _ = reply.send(Outcome::Panicked(what));
                        // A fresh thread takes over; this one ends (whatever state the panic
                        // left on its stack goes with it).
                        spawn_worker(rx.clone(), handler.clone(), stats.clone());
                        break;
                    }
                }
            }
            stats.workers.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        on_fail.workers.fetch_sub(1, Ordering::SeqCst);
        tracing::error!(error = %e, "cannot start a worker thread");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    fn block<T>(rx: oneshot::Receiver<T>) -> T {
        rx.blocking_recv().unwrap()
    }

    #[test]
    fn a_panic_is_answered_and_its_worker_replaced() {
        let pool = Pool::new(1, 4, |_id: &str, x: i32| {
            if x < 0 {
                panic!("negative input {x}");
            }
            x * 2
        });
        assert!(matches!(
            block(pool.submit("a", 3).unwrap()),
            Outcome::Done(6)
        ));
        match block(pool.submit("b", -1).unwrap()) {
            Outcome::Panicked(m) => assert!(m.contains("negative input -1"), "{m}"),
            Outcome::Done(v) => panic!("expected a panic, got {v}"),
        }
        // The only worker panicked: a replacement must answer the next task.
        assert!(matches!(
            block(pool.submit("c", 5).unwrap()),
            Outcome::Done(10)
        ));
        assert_eq!(pool.stats().panics.load(Ordering::Relaxed), 1);
        assert_eq!(pool.stats().workers.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_full_queue_is_refused_not_piled_up() {
        let (gate_tx, gate_rx) = crossbeam_channel::bounded::<()>(0);
        let pool = Pool::new(1, 2, move |_id: &str, _x: i32| {
            let _ = gate_rx.recv_timeout(Duration::from_secs(10));
        });
        // One task held by the worker, two waiting: the fourth is refused.
        let first = pool.submit("1", 0).unwrap();
        while pool.stats().running.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        let waiting = [pool.submit("2", 0).unwrap(), pool.submit("3", 0).unwrap()];
        assert_eq!(pool.submit("4", 0).unwrap_err(), Full);
        assert_eq!(pool.stats().queued.load(Ordering::SeqCst), 2);
        for _ in 0..3 {
            gate_tx.send(()).unwrap();
        }
        block(first);
        for w in waiting {
            block(w);
        }
        assert_eq!(pool.stats().queued.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_task_whose_client_left_is_skipped() {
        let (gate_tx, gate_rx) = crossbeam_channel::bounded::<()>(0);
        let ran = Arc::new(AtomicUsize::new(0));
        let ran2 = ran.clone();
        let pool = Pool::new(1, 4, move |_id: &str, x: i32| {
            if x == 0 {
                let _ = gate_rx.recv_timeout(Duration::from_secs(10));
            }
            ran2.fetch_add(1, Ordering::SeqCst);
        });
        let first = pool.submit("1", 0).unwrap();
        while pool.stats().running.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        drop(pool.submit("gone", 1).unwrap());
        let last = pool.submit("3", 1).unwrap();
        gate_tx.send(()).unwrap();
        block(first);
        block(last);
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        assert_eq!(pool.stats().abandoned.load(Ordering::Relaxed), 1);
    }
}
