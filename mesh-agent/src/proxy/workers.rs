//! Connection workers: a few threads, each running a single-threaded tokio runtime, that serve
//! the captured connections the outbound listener accepted. A connection is handed to the
//! worker with the fewest open connections and stays there for its whole life, with the tasks
//! it spawns (upstream connections, upgrades); the upstream pool keeps its idle connections per
//! worker. A request therefore crosses no thread: no work stealing, no futex wake-ups between
//! workers, the client's and the upstream's sockets polled by the same epoll loop. This module
//! owns the threads, the hand-off and the per-worker drain.

use std::{
    cell::Cell,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures_util::FutureExt;
use tokio::{net::TcpStream, sync::mpsc, sync::oneshot, task::JoinSet};
use tracing::{debug, info, warn};

/// Most worker threads (a larger setting is cut to this).
pub const MAX_WORKERS: usize = 64;

thread_local! {
    /// Which worker this thread is (1-based), 0 on any other thread.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The worker the calling thread is: 1 to [`MAX_WORKERS`], or 0 on a thread that is not a
/// connection worker (the main runtime, tests).
pub fn current_worker() -> usize {
    WORKER.with(Cell::get)
}

/// What a worker runs for one connection.
type ConnectionTask = Box<dyn FnOnce(TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start connection worker {index}: {source}")]
    Start {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

enum Job {
    Serve {
        stream: std::net::TcpStream,
        peer: SocketAddr,
        task: ConnectionTask,
    },
    /// Stop taking connections, wait up to the timeout for the open ones, then end.
    Drain {
        timeout: Duration,
        done: oneshot::Sender<()>,
    },
}

struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
    open: Arc<AtomicUsize>,
}

/// The worker threads. Dropping this value closes their queues: each ends once its open
/// connections have (use [`ConnectionWorkers::drain`] to bound that).
pub struct ConnectionWorkers {
    workers: Vec<Worker>,
}

impl std::fmt::Debug for ConnectionWorkers {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ConnectionWorkers")
            .field("workers", &self.workers.len())
            .field("open", &self.open())
            .finish()
    }
}

/// Counts a worker's open connections down when one ends, however it ends.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionWorkers {
    /// Starts `count` workers (at least one, at most [`MAX_WORKERS`]).
    pub fn start(count: usize) -> Result<Self, WorkerError> {
        let count = count.clamp(1, MAX_WORKERS);
        let mut workers = Vec::with_capacity(count);
        for index in 1..=count {
            let (jobs, queue) = mpsc::unbounded_channel();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| WorkerError::Start { index, source })?;
            std::thread::Builder::new()
                .name(format!("mesh-conn-{index}"))
                .spawn(move || {
                    WORKER.with(|worker| worker.set(index));
                    runtime.block_on(run(index, queue));
                    // Dropping the runtime here cancels what the connections left running
                    // (detached upgrade pipes), as the process's end would.
                })
                .map_err(|source| WorkerError::Start { index, source })?;
            workers.push(Worker {
                jobs,
                open: Arc::new(AtomicUsize::new(0)),
            });
        }
        Ok(Self { workers })
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether there is no worker (never, once started).
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Open connections over all workers.
    pub fn open(&self) -> usize {
        self.workers
            .iter()
            .map(|worker| worker.open.load(Ordering::Relaxed))
            .sum()
    }

    /// Hands an accepted connection to the worker with the fewest open connections, which
    /// runs `task` on it. A connection that cannot be handed over (the workers have ended) is
    /// closed.
    pub fn dispatch<F, Fut>(&self, stream: TcpStream, peer: SocketAddr, task: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(worker) = self
            .workers
            .iter()
            .min_by_key(|worker| worker.open.load(Ordering::Relaxed))
        else {
            return;
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                warn!(%peer, %error, "cannot hand the connection to a worker; closing it");
                return;
            }
        };
        worker.open.fetch_add(1, Ordering::Relaxed);
        // Counted from here: a job dropped unserved (the worker ended) counts itself out.
        let guard = OpenGuard(Arc::clone(&worker.open));
        let job = Job::Serve {
            stream,
            peer,
            task: Box::new(move |stream| -> Pin<Box<dyn Future<Output = ()> + Send>> {
                // The guard rides beside the connection's future (`map`), not in an async
                // block: a block keeps its captures and its awaited future side by side, and
                // an idle connection's task would carry that for its whole life.
                Box::pin(task(stream).map(move |()| drop(guard)))
            }),
        };
        if worker.jobs.send(job).is_err() {
            warn!(%peer, "connection workers have stopped; closing the connection");
        }
    }

    /// Stops every worker: each waits up to `timeout` for its open connections, then closes
    /// the rest. Returns when all have ended.
    pub async fn drain(&self, timeout: Duration) {
        let mut waiting = Vec::with_capacity(self.workers.len());
        for worker in &self.workers {
            let (done, finished) = oneshot::channel();
            if worker.jobs.send(Job::Drain { timeout, done }).is_ok() {
                waiting.push(finished);
            }
        }
        for finished in waiting {
            // An error means the worker had already ended.
            let _ = finished.await;
        }
    }
}

/// One worker's loop: serves handed-over connections until drained or its queue closes.
async fn run(index: usize, mut queue: mpsc::UnboundedReceiver<Job>) {
    let mut connections = JoinSet::new();
    let drain = loop {
        tokio::select! {
            job = queue.recv() => match job {
                Some(Job::Serve { stream, peer, task }) => match TcpStream::from_std(stream) {
                    Ok(stream) => {
                        connections.spawn(task(stream));
                    }
                    Err(error) => warn!(worker = index, %peer, %error, "cannot register a handed-over connection; closing it"),
                },
                Some(Job::Drain { timeout, done }) => break Some((timeout, done)),
                None => break None,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    };
    // Nothing more is taken; connections handed over meanwhile are closed.
    queue.close();
    while queue.try_recv().is_ok() {}
    let Some((timeout, done)) = drain else {
        while connections.join_next().await.is_some() {}
        return;
    };
    let open = connections.len();
    if open > 0 {
        info!(worker = index, open, "draining open connections");
        let drained = tokio::time::timeout(timeout, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                worker = index,
                remaining = connections.len(),
                "drain timeout; closing connections"
            );
            connections.abort_all();
            while connections.join_next().await.is_some() {}
        }
    }
    debug!(worker = index, "connection worker stopped");
    let _ = done.send(());
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo task that records the worker it ran on in its reply.
    async fn echo(mut stream: TcpStream) {
        let mut buffer = [0u8; 16];
        while let Ok(read) = stream.read(&mut buffer).await {
            if read == 0 {
                break;
            }
            let reply = format!("{}:{}", current_worker(), read);
            if stream.write_all(reply.as_bytes()).await.is_err() {
                break;
            }
        }
    }

    #[tokio::test]
    async fn connections_are_spread_over_the_workers_and_served_there() {
        let workers = ConnectionWorkers::start(2).unwrap();
        assert_eq!(current_worker(), 0, "the test's own thread is no worker");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            let mut client = TcpStream::connect(address).await.unwrap();
            let (accepted, peer) = listener.accept().await.unwrap();
            workers.dispatch(accepted, peer, echo);
            client.write_all(b"ping").await.unwrap();
            let mut reply = [0u8; 8];
            let read = client.read(&mut reply).await.unwrap();
            let reply = std::str::from_utf8(&reply[..read]).unwrap().to_owned();
            let (worker, count) = reply.split_once(':').unwrap();
            assert_eq!(count, "4");
            seen.insert(worker.parse::<usize>().unwrap());
            clients.push(client);
        }
        // Fewest open connections first: four open connections, two on each worker.
        assert_eq!(seen, [1, 2].into_iter().collect());
        assert_eq!(workers.open(), 4);
        drop(clients);
        workers.drain(Duration::from_secs(5)).await;
        assert_eq!(workers.open(), 0);
    }

    #[tokio::test]
    async fn drain_closes_connections_left_open_past_the_timeout() {
        let workers = ConnectionWorkers::start(1).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        workers.dispatch(accepted, peer, echo);
        client.write_all(b"x").await.unwrap();
        let mut reply = [0u8; 8];
        assert!(client.read(&mut reply).await.unwrap() > 0);
        // The client never closes: the drain's timeout ends the connection.
        workers.drain(Duration::from_millis(50)).await;
        assert_eq!(workers.open(), 0);
        assert_eq!(client.read(&mut reply).await.unwrap_or(0), 0);
        // Stopped workers take no more connections: a late one is closed.
        let mut late = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        workers.dispatch(accepted, peer, echo);
        let _ = late.write_all(b"x").await;
        assert_eq!(late.read(&mut reply).await.unwrap_or(0), 0);
    }
}
