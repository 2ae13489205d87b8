//! Deduplication of identical requests: the first of a set of identical requests (the leader)
//! goes upstream; the others (followers) wait for its response and get the same status,
//! headers, body and trailers. The leader's body streams to its caller as it arrives and is
//! recorded up to a bound; followers replay the recording and then follow it live, so a
//! streamed answer (SSE) reaches every caller without added buffering. A finished response
//! keeps answering duplicates for the policy's window. Keys are made by the caller (same
//! `Idempotency-Key`, or the same JSON-RPC request of the same source and session).

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::watch;

use super::http::{BodyError, ProxyBody};

/// How often expired entries are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(1);
/// Entries kept at most (oldest purged first beyond it); bounds memory under floods of keys.
const MAX_ENTRIES: usize = 65_536;

/// The identity of a request for deduplication, from the parts that make two requests the
/// same.
pub fn key(parts: &[&[u8]]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for part in parts {
        part.len().hash(&mut hasher);
        hasher.write(part);
    }
    hasher.finish()
}

/// Why a follower got no copy.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DedupError {
    #[error("the original request failed before it was answered: {0}")]
    LeaderFailed(String),
    #[error("the original response was larger than the deduplication bound")]
    Overflowed,
}

#[derive(Debug, Clone, Default)]
enum State {
    #[default]
    Streaming,
    Complete,
    Failed(String),
    Overflowed,
}

#[derive(Debug, Default)]
struct Recording {
    head: Option<(StatusCode, HeaderMap)>,
    chunks: Vec<Bytes>,
    size: u64,
    trailers: Option<HeaderMap>,
    state: State,
}

/// One response shared by a leader and its followers.
#[derive(Debug)]
pub struct Shared {
    recording: Mutex<Recording>,
    /// Bumped on every change of the recording, to wake followers.
    version: watch::Sender<u64>,
    max_bytes: u64,
}

impl Shared {
    fn update(&self, change: impl FnOnce(&mut Recording)) {
        change(
            &mut self
                .recording
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        self.version.send_modify(|version| *version += 1);
    }
}

#[derive(Debug)]
struct Entry {
    shared: Arc<Shared>,
    /// Set when the response is complete: duplicates are answered until then.
    expires: Option<Instant>,
}

/// Identical requests in flight and recently answered.
#[derive(Debug, Default)]
pub struct Deduplicator {
    entries: Mutex<(HashMap<u64, Entry>, Option<Instant>)>,
}

/// What a request is to do.
#[derive(Debug)]
pub enum Role {
    /// Go upstream, then [`Leader::publish`] the response.
    Leader(Leader),
    /// Wait for the leader's response with [`follow`].
    Follower(Arc<Shared>),
}

/// The request that goes upstream for its duplicates.
#[derive(Debug)]
pub struct Leader {
    dedup: Arc<Deduplicator>,
    key: u64,
    shared: Arc<Shared>,
    window: Duration,
    published: bool,
}

impl Deduplicator {
    /// Joins the set of requests with `key`: the first becomes the leader.
    pub fn join(
        self: &Arc<Self>,
        key: u64,
        window: Duration,
        max_bytes: u64,
        now: Instant,
    ) -> Role {
        let mut guard = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let (entries, last_purge) = &mut *guard;
        if last_purge.is_none_or(|last| now.duration_since(last) >= PURGE_INTERVAL)
            || entries.len() >= MAX_ENTRIES
        {
            entries.retain(|_, entry| entry.expires.is_none_or(|expires| now < expires));
            if entries.len() >= MAX_ENTRIES {
                // Still full of live requests: stop sharing the finished ones first.
                entries.retain(|_, entry| entry.expires.is_none());
            }
            *last_purge = Some(now);
        }
        if let Some(entry) = entries.get(&key)
            && entry.expires.is_none_or(|expires| now < expires)
        {
            return Role::Follower(Arc::clone(&entry.shared));
        }
        let shared = Arc::new(Shared {
            recording: Mutex::new(Recording::default()),
            version: watch::channel(0).0,
            max_bytes,
        });
        entries.insert(
            key,
            Entry {
                shared: Arc::clone(&shared),
                expires: None,
            },
        );
        Role::Leader(Leader {
            dedup: Arc::clone(self),
            key,
            shared,
            window,
            published: false,
        })
    }

    fn finish(&self, key: u64, shared: &Arc<Shared>, keep_for: Option<Duration>) {
        let mut guard = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entries = &mut guard.0;
        // Only this leader's entry: a newer one may have replaced it after expiry.
        if entries
            .get(&key)
            .is_some_and(|entry| Arc::ptr_eq(&entry.shared, shared))
        {
            match keep_for {
                Some(window) => {
                    if let Some(entry) = entries.get_mut(&key) {
                        entry.expires = Some(Instant::now() + window);
                    }
                }
                None => {
                    entries.remove(&key);
                }
            }
        }
    }

    /// Entries held now (in flight or answering duplicates).
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Leader {
    /// Shares the leader's response: its head at once, its body as it streams.
    pub fn publish(mut self, response: Response<ProxyBody>) -> Response<ProxyBody> {
        self.published = true;
        let (parts, body) = response.into_parts();
        self.shared.update(|recording| {
            recording.head = Some((parts.status, parts.headers.clone()));
        });
        let recording = RecordingBody {
            inner: body,
            leader: Some(LeaderBody {
                dedup: Arc::clone(&self.dedup),
                key: self.key,
                shared: Arc::clone(&self.shared),
                window: self.window,
            }),
        };
        Response::from_parts(parts, recording.boxed())
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.published {
            // The leader's caller went away before an answer came: followers must not wait
            // for one that will never come.
            self.shared.update(|recording| {
                recording.state = State::Failed("the original caller went away".into());
            });
            self.dedup.finish(self.key, &self.shared, None);
        }
    }
}

#[derive(Debug)]
struct LeaderBody {
    dedup: Arc<Deduplicator>,
    key: u64,
    shared: Arc<Shared>,
    window: Duration,
}

impl LeaderBody {
    fn end(self, state: State) {
        let keep = matches!(state, State::Complete).then_some(self.window);
        self.shared.update(|recording| recording.state = state);
        self.dedup.finish(self.key, &self.shared, keep);
    }
}

/// The leader's body, recorded for followers as it passes.
struct RecordingBody {
    inner: ProxyBody,
    leader: Option<LeaderBody>,
}

impl Body for RecordingBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(leader) = &self.leader {
                    let max = leader.shared.max_bytes;
                    if let Some(data) = frame.data_ref() {
                        let data = data.clone();
                        leader.shared.update(|recording| {
                            if !matches!(recording.state, State::Streaming) {
                                return;
                            }
                            recording.size += data.len() as u64;
                            if recording.size > max {
                                recording.state = State::Overflowed;
                                recording.chunks = Vec::new();
                            } else {
                                recording.chunks.push(data);
                            }
                        });
                    } else if let Some(trailers) = frame.trailers_ref() {
                        let trailers = trailers.clone();
                        leader
                            .shared
                            .update(|recording| recording.trailers = Some(trailers));
                    }
                }
            }
            Poll::Ready(Some(Err(error))) => {
                let reason = error.to_string();
                if let Some(leader) = self.leader.take() {
                    leader.end(State::Failed(reason));
                }
            }
            Poll::Ready(None) => {
                if let Some(leader) = self.leader.take() {
                    let overflowed = matches!(
                        leader
                            .shared
                            .recording
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .state,
                        State::Overflowed
                    );
                    leader.end(if overflowed {
                        State::Overflowed
                    } else {
                        State::Complete
                    });
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RecordingBody {
    fn drop(&mut self) {
        if let Some(leader) = self.leader.take() {
            leader.end(State::Failed(
                "the original caller stopped reading the response".into(),
            ));
        }
    }
}

/// Waits (up to `timeout`) for the leader's response head, then replays the body.
pub async fn follow(
    shared: Arc<Shared>,
    timeout: Duration,
) -> Result<Response<ProxyBody>, DedupError> {
    let mut version = shared.version.subscribe();
    let head = tokio::time::timeout(timeout, async {
        loop {
            {
                let recording = shared
                    .recording
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if let Some(head) = &recording.head {
                    return Ok(head.clone());
                }
                if let State::Failed(reason) = &recording.state {
                    return Err(DedupError::LeaderFailed(reason.clone()));
                }
            }
            if version.changed().await.is_err() {
                return Err(DedupError::LeaderFailed(
                    "the original request ended".into(),
                ));
            }
        }
    })
    .await
    .map_err(|_| DedupError::LeaderFailed("no answer within the request timeout".into()))??;
    let (status, headers) = head;
    let replay = futures_util::stream::unfold(
        (shared, version, 0usize, false),
        |(shared, mut version, next, done)| async move {
            if done {
                return None;
            }
            loop {
                let step = {
                    let recording = shared
                        .recording
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    if let Some(chunk) = recording.chunks.get(next) {
                        Some((Ok(Frame::data(chunk.clone())), next + 1, false))
                    } else {
                        match &recording.state {
                            State::Streaming => None,
                            State::Complete => {
                                let trailers = recording.trailers.clone()?;
                                Some((Ok(Frame::trailers(trailers)), next, true))
                            }
                            State::Failed(reason) => Some((
                                Err(BodyError::from(DedupError::LeaderFailed(reason.clone()))),
                                next,
                                true,
                            )),
                            State::Overflowed => {
                                Some((Err(BodyError::from(DedupError::Overflowed)), next, true))
                            }
                        }
                    }
                };
                if let Some((frame, next, done)) = step {
                    return Some((frame, (shared, version, next, done)));
                }
                if version.changed().await.is_err() {
                    return None;
                }
            }
        },
    );
    let mut response = Response::new(StreamBody::new(replay).boxed());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response.headers_mut().insert(
        "x-mesh-deduplicated",
        http::HeaderValue::from_static("true"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody as TestStream};

    fn response(body: &'static [u8]) -> Response<ProxyBody> {
        Response::new(
            Full::new(Bytes::from_static(body))
                .map_err(|never| match never {})
                .boxed(),
        )
    }

    async fn text(response: Response<ProxyBody>) -> Result<String, BodyError> {
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn followers_get_the_leaders_response_and_late_duplicates_within_the_window() {
        let dedup = Arc::new(Deduplicator::default());
        let now = Instant::now();
        let window = Duration::from_secs(5);
        let Role::Leader(leader) = dedup.join(7, window, 1024, now) else {
            panic!("first is the leader");
        };
        let Role::Follower(shared) = dedup.join(7, window, 1024, now) else {
            panic!("second follows");
        };
        let follower = tokio::spawn(follow(shared, Duration::from_secs(5)));
        let published = leader.publish(response(b"the one answer"));
        assert_eq!(text(published).await.unwrap(), "the one answer");
        let copy = follower.await.unwrap().unwrap();
        assert_eq!(copy.headers()["x-mesh-deduplicated"], "true");
        assert_eq!(text(copy).await.unwrap(), "the one answer");
        // Complete: a duplicate within the window is answered from the recording.
        let Role::Follower(shared) = dedup.join(7, window, 1024, Instant::now()) else {
            panic!("a late duplicate follows");
        };
        let late = follow(shared, Duration::from_secs(1)).await.unwrap();
        assert_eq!(text(late).await.unwrap(), "the one answer");
        // After the window, the next one leads again.
        assert!(matches!(
            dedup.join(7, window, 1024, Instant::now() + window * 2),
            Role::Leader(_)
        ));
        assert!(matches!(
            dedup.join(8, window, 1024, Instant::now()),
            Role::Leader(_)
        ));
    }

    #[tokio::test]
    async fn a_streamed_body_reaches_followers_as_it_arrives() {
        let dedup = Arc::new(Deduplicator::default());
        let Role::Leader(leader) = dedup.join(1, Duration::from_secs(1), 1024, Instant::now())
        else {
            panic!("leader");
        };
        let Role::Follower(shared) = dedup.join(1, Duration::from_secs(1), 1024, Instant::now())
        else {
            panic!("follower");
        };
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BodyError>>(4);
        let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|frame| (frame, receiver))
        });
        let leader_response = leader.publish(Response::new(TestStream::new(stream).boxed()));
        let follower = follow(shared, Duration::from_secs(5)).await.unwrap();
        let mut leader_body = leader_response.into_body();
        let mut follower_body = follower.into_body();
        sender
            .send(Ok(Frame::data(Bytes::from_static(b"event: one\n\n"))))
            .await
            .unwrap();
        // The leader reads the first event, and so can the follower, before the second exists.
        let first = leader_body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().unwrap().as_ref(), b"event: one\n\n");
        let copied = follower_body.frame().await.unwrap().unwrap();
        assert_eq!(copied.data_ref().unwrap().as_ref(), b"event: one\n\n");
        drop(sender);
        assert!(leader_body.frame().await.is_none());
        assert!(follower_body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_leader_that_fails_or_overflows_tells_its_followers() {
        let dedup = Arc::new(Deduplicator::default());
        let now = Instant::now();
        let Role::Leader(leader) = dedup.join(1, Duration::from_secs(1), 1024, now) else {
            panic!("leader");
        };
        let Role::Follower(shared) = dedup.join(1, Duration::from_secs(1), 1024, now) else {
            panic!("follower");
        };
        drop(leader);
        assert!(matches!(
            follow(shared, Duration::from_secs(1)).await,
            Err(DedupError::LeaderFailed(_))
        ));
        assert!(dedup.is_empty(), "a failed leader leaves no entry");

        let Role::Leader(leader) = dedup.join(2, Duration::from_secs(1), 4, now) else {
            panic!("leader");
        };
        let Role::Follower(shared) = dedup.join(2, Duration::from_secs(1), 4, now) else {
            panic!("follower");
        };
        let published = leader.publish(response(b"longer than four bytes"));
        let follower = follow(shared, Duration::from_secs(1)).await.unwrap();
        assert_eq!(
            text(published).await.unwrap(),
            "longer than four bytes",
            "the leader's caller gets its whole answer"
        );
        assert!(
            text(follower).await.is_err(),
            "the follower is told, not cut short silently"
        );
    }

    #[test]
    fn keys_separate_their_parts() {
        assert_ne!(key(&[b"ab", b"c"]), key(&[b"a", b"bc"]));
        assert_eq!(key(&[b"ab", b"c"]), key(&[b"ab", b"c"]));
    }
}
