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
}
