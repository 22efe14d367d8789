//! Part-sized buffers handed back after use, so a restore does not allocate a fresh 16 MiB buffer
//! for every part it decodes. A fresh buffer costs a page fault and the zeroing of every page
//! each time (on VMs that return freed memory to the host, much more); a reused one costs
//! nothing. The pool holds at most as many buffers as were ever in flight at once, which the
//! callers bound.

use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct BufferPool(Arc<Mutex<Vec<Vec<u8>>>>);

impl BufferPool {
    /// An empty buffer, with the capacity of its last use.
    pub fn take(&self) -> Vec<u8> {
        let mut buf = self.0.lock().expect("pool lock").pop().unwrap_or_default();
        buf.clear();
        buf
    }

    pub fn give(&self, buf: Vec<u8>) {
        self.0.lock().expect("pool lock").push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_with_their_memory() {
        let pool = BufferPool::default();
        let mut a = pool.take();
        assert_eq!(a.capacity(), 0, "an empty pool makes a new buffer");
        a.extend_from_slice(&[7; 1 << 20]);
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take();
        assert!(b.is_empty(), "handed out empty");
        assert_eq!(b.as_ptr(), ptr, "the same allocation, reused");
        assert!(b.capacity() >= 1 << 20);
        assert_eq!(pool.take().capacity(), 0, "one buffer given, one taken");
    }
}
