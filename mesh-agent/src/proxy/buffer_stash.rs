//! Per-thread stashes of the buffers HTTP/1.1 connections give back while they wait.
//!
//! A keep-alive connection drops its read buffer whenever its socket has nothing to read, and
//! a client connection its write buffer once a response is out, so thousands of idle
//! connections cost no buffer memory. Under load that means giving a
//! buffer back and taking one again for every request, twice on the client side (the wait
//! before the request and the one that reads it); a buffer this size is past the allocator's
//! per-thread cache, so each round trip through `malloc` and `free` cost several hundred
//! instructions. A stash keeps a few empty buffers per worker thread instead: memory stays
//! bounded (at most [`MAX_STASHED`] buffers of at most four chunks per stash and thread), and
//! a buffer that still shares its allocation with bytes handed out is never kept, so a
//! stashed buffer never holds a request body alive.

use std::cell::RefCell;

use bytes::BytesMut;

/// Bytes asked of the socket per read, on connections from clients (and the room a response
/// head starts with).
const CLIENT_READ_CHUNK: usize = 4 * 1024;
/// The largest buffer a stash keeps, in its chunks.
const MAX_CHUNKS_KEPT: usize = 4;
/// The largest buffer a client connection's stash keeps.
pub const MAX_CLIENT_BUFFER: usize = MAX_CHUNKS_KEPT * CLIENT_READ_CHUNK;
/// Bytes asked of the socket per read, on pooled connections to upstreams.
const UPSTREAM_READ_CHUNK: usize = 8 * 1024;

/// Most buffers one stash keeps per thread.
pub const MAX_STASHED: usize = 32;

/// Empty buffers of one kind of connection, for reuse on the same thread.
#[derive(Debug)]
pub struct Stash {
    /// The capacity of a new buffer; kept buffers have at least this and at most four times
    /// this.
    chunk: usize,
    buffers: RefCell<Vec<BytesMut>>,
}

thread_local! {
    /// Read and write buffers of connections from clients (`h1_server`).
    pub static CLIENT_BUFFERS: Stash = const { Stash::new(CLIENT_READ_CHUNK) };
    /// Read buffers of pooled connections to upstreams (`h1_client`).
    pub static UPSTREAM_READS: Stash = const { Stash::new(UPSTREAM_READ_CHUNK) };
}

impl Stash {
    pub const fn new(chunk: usize) -> Self {
        Self {
            chunk,
            buffers: RefCell::new(Vec::new()),
        }
    }

    /// An empty buffer with room for at least one chunk: a stashed one when there is one.
    pub fn take(&self) -> BytesMut {
        self.buffers
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(self.chunk))
    }

    /// Makes room in a connection's buffer for the next read or response: a stashed buffer
    /// when it has none (it was given back), a chunk more when less than half a chunk is free.
    pub fn make_room(&self, buffer: &mut BytesMut) {
        if buffer.capacity() == 0 {
            *buffer = self.take();
        } else if buffer.capacity() - buffer.len() < self.chunk / 2 {
            buffer.reserve(self.chunk);
        }
    }

    /// Gives a connection's (empty) buffer back while it waits, leaving it none.
    pub fn release(&self, buffer: &mut BytesMut) {
        self.give_back(std::mem::take(buffer));
    }

    /// Keeps an empty buffer for the next [`Stash::take`] on this thread, or drops it: when
    /// it holds bytes, shares its allocation with bytes handed out, is smaller than a chunk
    /// or larger than four, or the stash is full.
    pub fn give_back(&self, mut buffer: BytesMut) {
        // `try_reclaim` succeeds without allocating only for a buffer that owns its whole
        // allocation; it then offers all of it.
        if !buffer.is_empty()
            || !buffer.try_reclaim(self.chunk)
            || buffer.capacity() > MAX_CHUNKS_KEPT * self.chunk
        {
            return;
        }
        let mut buffers = self.buffers.borrow_mut();
        if buffers.len() < MAX_STASHED {
            buffers.push(buffer);
        }
    }

    /// How many buffers are stashed on this thread.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buffers.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;

    use super::*;

    #[test]
    fn a_given_back_buffer_is_taken_again_without_a_new_allocation() {
        let stash = Stash::new(1024);
        let buffer = stash.take();
        assert!(buffer.capacity() >= 1024);
        let address = buffer.as_ptr();
        stash.give_back(buffer);
        assert_eq!(stash.len(), 1);
        let again = stash.take();
        assert_eq!(again.as_ptr(), address);
        assert_eq!(stash.len(), 0);
    }

    #[test]
    fn buffers_that_hold_or_share_bytes_or_are_oversized_are_not_kept() {
        let stash = Stash::new(1024);

        let mut holding = stash.take();
        holding.put_slice(b"GET / HTTP/1.1\r\n");
        stash.give_back(holding);
        assert_eq!(stash.len(), 0, "a buffer with bytes in it");

        // The request handed out still lives in the same allocation.
        let mut shared = stash.take();
        shared.put_slice(b"GET / HTTP/1.1\r\n\r\n");
        let request = shared.split().freeze();
        stash.give_back(shared);
        assert_eq!(stash.len(), 0, "a buffer sharing its allocation");
        drop(request);

        stash.give_back(BytesMut::with_capacity(64 * 1024));
        assert_eq!(stash.len(), 0, "an oversized buffer");

        // Once the bytes handed out are gone, the same kind of buffer is kept.
        let mut reused = stash.take();
        reused.put_slice(b"GET / HTTP/1.1\r\n\r\n");
        drop(reused.split().freeze());
        stash.give_back(reused);
        assert_eq!(stash.len(), 1);
    }

    #[test]
    fn room_comes_from_the_stash_and_a_released_buffer_goes_back_to_it() {
        let stash = Stash::new(1024);
        let mut buffer = BytesMut::new();
        stash.make_room(&mut buffer);
        assert!(buffer.capacity() >= 1024);
        stash.release(&mut buffer);
        assert_eq!((buffer.capacity(), stash.len()), (0, 1));
        stash.make_room(&mut buffer);
        assert_eq!(stash.len(), 0, "the stashed buffer is taken again");

        // Less than half a chunk free: a chunk more.
        buffer.put_slice(&[b'x'; 700]);
        stash.make_room(&mut buffer);
        assert!(buffer.capacity() - buffer.len() >= 1024);
        // Half a chunk or more free: left as it is.
        let capacity = buffer.capacity();
        stash.make_room(&mut buffer);
        assert_eq!(buffer.capacity(), capacity);
    }

    #[test]
    fn the_stash_is_bounded() {
        let stash = Stash::new(1024);
        for _ in 0..MAX_STASHED + 5 {
            stash.give_back(BytesMut::with_capacity(1024));
        }
        assert_eq!(stash.len(), MAX_STASHED);
    }
}
