//! A ring of fixed-size messages from one CPU to another, the transport between the
//! null-Kernel's per-CPU kernel instances (DESIGN.md §3: per-pair shared-memory rings with
//! an IPI doorbell). Each ordered pair of kernels gets its own ring, so every ring has
//! exactly one producer and one consumer, and FIFO order per pair holds (the channel
//! assumption of the Barrelfish protocol, seed thesis ch. 4).
//!
//! Messages are `WORDS` 64-bit words. Every slot word is an atomic, so the ring is safe
//! code: the producer fills a slot with relaxed stores and publishes it with a release
//! store of `tail`; the consumer's acquire load of `tail` makes those words visible. Using
//! one side from two CPUs at once breaks the FIFO promise (messages may be lost or read
//! twice) but not memory safety.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The ring has no free slot; the message was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingFull;

/// A single-producer single-consumer ring of `SLOTS` messages of `WORDS` words.
#[derive(Debug)]
pub struct Ring<const SLOTS: usize, const WORDS: usize> {
    /// The next slot the consumer reads (free-running; the slot is `head % SLOTS`).
    head: AtomicU32,
    /// The next slot the producer writes.
    tail: AtomicU32,
    slots: [[AtomicU64; WORDS]; SLOTS],
}

impl<const SLOTS: usize, const WORDS: usize> Default for Ring<SLOTS, WORDS> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const SLOTS: usize, const WORDS: usize> Ring<SLOTS, WORDS> {
    const CAPACITY_OK: () = assert!(SLOTS > 0 && SLOTS.is_power_of_two() && SLOTS <= 1 << 16);

    /// Creates an empty ring.
    pub const fn new() -> Self {
        Self::starting_at(0)
    }

    /// Creates an empty ring whose free-running indices start at `index` (tests use it to
    /// cross the u32 wrap-around).
    pub const fn starting_at(index: u32) -> Self {
        let () = Self::CAPACITY_OK;
        Self {
            head: AtomicU32::new(index),
            tail: AtomicU32::new(index),
            slots: [const { [const { AtomicU64::new(0) }; WORDS] }; SLOTS],
        }
    }

    fn slot(&self, index: u32) -> &[AtomicU64; WORDS] {
        // SLOTS is a power of two no larger than 2^16, so the mask keeps the index inside.
        &self.slots[index as usize & (SLOTS - 1)]
    }

    /// Sends a message (producer side only).
    pub fn push(&self, message: &[u64; WORDS]) -> Result<(), RingFull> {
        let tail = self.tail.load(Ordering::Relaxed);
        let head = self.head.load(Ordering::Acquire);
        if tail.wrapping_sub(head) as usize >= SLOTS {
            return Err(RingFull);
        }
        for (word, &value) in self.slot(tail).iter().zip(message) {
            word.store(value, Ordering::Relaxed);
        }
        self.tail.store(tail.wrapping_add(1), Ordering::Release);
        Ok(())
    }

    /// Receives the oldest message (consumer side only).
    pub fn pop(&self) -> Option<[u64; WORDS]> {
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Acquire);
        if head == tail {
            return None;
        }
        let mut message = [0; WORDS];
        for (value, word) in message.iter_mut().zip(self.slot(head)) {
            *value = word.load(Ordering::Relaxed);
        }
        self.head.store(head.wrapping_add(1), Ordering::Release);
        Some(message)
    }

    /// Returns how many messages wait (exact only when neither side is running).
    pub fn len(&self) -> usize {
        self.tail.load(Ordering::Acquire).wrapping_sub(self.head.load(Ordering::Acquire)) as usize
    }

    /// Tells whether no message waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn fifo_full_and_empty() {
        let ring: Ring<4, 2> = Ring::new();
        assert_eq!(ring.pop(), None);
        for i in 0..4 {
            ring.push(&[i, i * 10]).unwrap();
        }
        assert_eq!(ring.push(&[9, 9]), Err(RingFull));
        assert_eq!(ring.len(), 4);
        for i in 0..4 {
            assert_eq!(ring.pop(), Some([i, i * 10]));
        }
        assert!(ring.is_empty());
    }

    #[test]
    fn indices_cross_the_u32_wrap_around() {
        let ring: Ring<8, 1> = Ring::starting_at(u32::MAX - 5);
        for round in 0..100u64 {
            for i in 0..5 {
                ring.push(&[round * 10 + i]).unwrap();
            }
            for i in 0..5 {
                assert_eq!(ring.pop(), Some([round * 10 + i]));
            }
        }
    }

    /// One producer and one consumer thread pass a million messages: every message
    /// arrives once, in order, with all its words intact.
    #[test]
    fn concurrent_producer_and_consumer_keep_order_and_contents() {
        const COUNT: u64 = 1_000_000;
        let ring: Arc<Ring<64, 4>> = Arc::new(Ring::new());
        let producer = {
            let ring = Arc::clone(&ring);
            std::thread::spawn(move || {
                let mut next = 0;
                while next < COUNT {
                    let message = [next, !next, next.rotate_left(17), next ^ 0xA5A5];
                    if ring.push(&message).is_ok() {
                        next += 1;
                    } else {
                        std::hint::spin_loop();
                    }
                }
            })
        };
        let mut expected = 0;
        while expected < COUNT {
            match ring.pop() {
                Some(m) => {
                    assert_eq!(m, [expected, !expected, expected.rotate_left(17), expected ^ 0xA5A5]);
                    expected += 1;
                }
                None => std::hint::spin_loop(),
            }
        }
        producer.join().unwrap();
        assert!(ring.is_empty());
    }
}
