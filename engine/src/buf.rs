//! Block-aligned heap buffers, the only memory handed to the device.
//!
//! `O_DIRECT` requires the buffer address, the file offset and the length to be multiples of the
//! logical block size; we align everything to [`BLOCK_BYTES`] so any device up to 4 KiB sectors works.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use crate::types::BLOCK_BYTES;

/// An owned, zero-initialised buffer whose address and length are multiples of [`BLOCK_BYTES`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `n_blocks` zeroed blocks. A zero-length buffer is allowed and allocates nothing.
    pub fn zeroed(n_blocks: usize) -> AlignedBuf {
        let len = n_blocks * BLOCK_BYTES;
        if len == 0 {
            return AlignedBuf { ptr: NonNull::<u8>::dangling(), len: 0 };
        }
        let layout = Layout::from_size_align(len, BLOCK_BYTES).expect("buffer layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    /// `head_blocks` zeroed blocks that `fill_head` writes into, followed by a copy of each block
    /// of `data` (each exactly one block long). The data blocks are copied into memory that was
    /// never zeroed: zeroing them first would cost as much as the copy (a log write of 1 MiB was
    /// spending 5 % of its time in that memset).
    pub fn assemble<'a>(
        head_blocks: usize,
        fill_head: impl FnOnce(&mut [u8]),
        data: impl ExactSizeIterator<Item = &'a [u8]>,
    ) -> AlignedBuf {
        let n_blocks = head_blocks + data.len();
        let len = n_blocks * BLOCK_BYTES;
        if len == 0 {
            fill_head(&mut []);
            return AlignedBuf { ptr: NonNull::<u8>::dangling(), len: 0 };
        }
        let layout = Layout::from_size_align(len, BLOCK_BYTES).expect("buffer layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let mut copied = 0;
        for (i, block) in data.enumerate() {
            assert_eq!(block.len(), BLOCK_BYTES, "AlignedBuf::assemble copies whole blocks");
            assert!(head_blocks + i < n_blocks, "more data blocks than the iterator's length said");
            // SAFETY: the destination block lies inside the allocation, which `block` (a shared
            // borrow of other memory) cannot overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    block.as_ptr(),
                    ptr.as_ptr().add((head_blocks + i) * BLOCK_BYTES),
                    BLOCK_BYTES,
                )
            };
            copied += 1;
        }
        // The remaining bytes (the head, and any data blocks a lying iterator did not yield) are
        // zeroed, so every byte is initialised before a slice over it exists.
        // SAFETY: both ranges lie inside the allocation.
        unsafe {
            std::ptr::write_bytes(ptr.as_ptr(), 0, head_blocks * BLOCK_BYTES);
            let tail = head_blocks + copied;
            std::ptr::write_bytes(ptr.as_ptr().add(tail * BLOCK_BYTES), 0, (n_blocks - tail) * BLOCK_BYTES);
        }
        let mut buf = AlignedBuf { ptr, len };
        fill_head(&mut buf[..head_blocks * BLOCK_BYTES]);
        buf
    }

    /// A buffer holding a copy of `data`, which must be a whole number of blocks.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        assert_eq!(data.len() % BLOCK_BYTES, 0, "AlignedBuf::from_slice needs whole blocks");
        let mut buf = AlignedBuf::zeroed(data.len() / BLOCK_BYTES);
        buf.copy_from_slice(data);
        buf
    }

    pub fn n_blocks(&self) -> usize {
        self.len / BLOCK_BYTES
    }

    /// Block `block_idx` of this buffer.
    pub fn block(&self, block_idx: usize) -> &[u8] {
        &self[block_idx * BLOCK_BYTES..(block_idx + 1) * BLOCK_BYTES]
    }

    pub fn block_mut(&mut self, block_idx: usize) -> &mut [u8] {
        &mut self[block_idx * BLOCK_BYTES..(block_idx + 1) * BLOCK_BYTES]
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len != 0 {
            let layout = Layout::from_size_align(self.len, BLOCK_BYTES).expect("buffer layout");
            // SAFETY: allocated in `zeroed` with this exact layout.
            unsafe { dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (or dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} blocks)", self.n_blocks())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_block_aligned_and_zeroed() {
        let buf = AlignedBuf::zeroed(3);
        assert_eq!(buf.as_ptr() as usize % BLOCK_BYTES, 0);
        assert_eq!(buf.len(), 3 * BLOCK_BYTES);
        assert!(buf.iter().all(|b| *b == 0));
        assert_eq!(AlignedBuf::zeroed(0).len(), 0);
    }

    #[test]
    fn assemble_puts_the_head_then_the_data_blocks() {
        let a = vec![1u8; BLOCK_BYTES];
        let b = vec![2u8; BLOCK_BYTES];
        let buf = AlignedBuf::assemble(2, |h| h[5] = 9, [&a[..], &b[..]].into_iter());
        assert_eq!(buf.as_ptr() as usize % BLOCK_BYTES, 0);
        assert_eq!(buf.n_blocks(), 4);
        assert!(buf[..2 * BLOCK_BYTES].iter().enumerate().all(|(i, x)| *x == if i == 5 { 9 } else { 0 }));
        assert_eq!(buf.block(2), &a[..]);
        assert_eq!(buf.block(3), &b[..]);
        assert_eq!(AlignedBuf::assemble(0, |h| assert!(h.is_empty()), std::iter::empty()).len(), 0);
    }
}
