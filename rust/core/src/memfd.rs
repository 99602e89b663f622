//! Guest-RAM regions: a memfd, sealed against resizing, mapped `MAP_SHARED`.
//!
//! A [`Region`] owns its memfd; its mapping is a separate, reference-counted
//! [`Mapping`] so that anything still working on the pages (a dirty tracker, a
//! page stream, a vCPU) keeps them mapped even if the region object is closed.
//! Guest memory is reached only through raw pointers: a guest or another
//! process may write it at any time, so no `&[u8]` over it is ever formed.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

use crate::error::{Error, Result};

/// The base page size of the host.
#[must_use]
pub fn host_page_size() -> usize {
    rustix::param::page_size()
}

/// A `MAP_SHARED` mapping of a memfd. Unmapped when the last `Arc` drops.
#[derive(Debug)]
pub struct Mapping {
    base: *mut u8,
    len: usize,
    page_size: usize,
}

// SAFETY: `Mapping` is a raw address range. It hands out only raw pointers;
// every access goes through raw/volatile operations whose callers uphold the
// aliasing rules, so sharing the range between threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: see `Send` above: no interior references are ever created.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `len` bytes of `fd` read-write and shared.
    pub fn map(fd: BorrowedFd<'_>, len: usize, page_size: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::InvalidArgument("cannot map a region of size 0".into()));
        }
        // SAFETY: a fresh mapping at an address the kernel chooses; it aliases
        // no Rust object, and `Mapping` never forms references into it.
        let base = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }
        .map_err(|e| Error::os(format!("mmap({len} bytes)"), e))?;
        Ok(Self { base: base.cast(), len, page_size })
    }

    /// First byte of the mapping.
    #[must_use]
    pub fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping has at least one page.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Page size of the backing memory (host pages, or the hugetlb size).
    #[must_use]
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Number of pages.
    #[must_use]
    pub fn pages(&self) -> usize {
        self.len / self.page_size
    }

    /// Check that `[offset, offset+len)` lies inside the mapping.
    pub fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "range {offset:#x}+{len:#x} is outside the region of {:#x} bytes",
                self.len
            ))),
        }
    }

    /// Copy bytes out of the mapping.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check_range(offset, out.len())?;
        // SAFETY: the range was bounds-checked; the source is raw shared memory
        // and the destination a distinct Rust buffer, so they do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(offset), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copy bytes into the mapping.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len())?;
        // SAFETY: bounds-checked as above; `data` is a Rust buffer distinct from the mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(offset), data.len()) };
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` came from a successful mmap and this is the last
        // owner (the `Arc` is dropping), so nothing can use the range afterwards.
        let _ = unsafe { rustix::mm::munmap(self.base.cast(), self.len) };
    }
}

/// How to create a region.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Huge page size in bytes for a hugetlb memfd (2 MiB or 1 GiB), or `None`.
    pub hugetlb: Option<usize>,
    /// Seal the memfd against grow and shrink (default for [`Region::create`]).
    pub seal: bool,
}

/// A named guest-RAM region: an owned memfd and its shared mapping.
#[derive(Debug)]
pub struct Region {
    name: String,
    fd: OwnedFd,
    mapping: Arc<Mapping>,
}

impl Region {
    /// Create a memfd (`MFD_CLOEXEC`) of `size` bytes and map it.
    pub fn create(name: &str, size: usize, opts: &CreateOptions) -> Result<Self> {
        let cname = CString::new(name)
            .map_err(|_| Error::InvalidArgument(format!("region name {name:?} contains a NUL byte")))?;
        let mut flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
        let page_size = match opts.hugetlb {
            None => host_page_size(),
            Some(sz) => {
                flags |= MemfdFlags::HUGETLB
                    | match sz {
                        0x20_0000 => MemfdFlags::HUGE_2MB,
                        0x4000_0000 => MemfdFlags::HUGE_1GB,
                        _ => {
                            return Err(Error::InvalidArgument(format!(
                                "hugetlb page size must be 2 MiB or 1 GiB, not {sz}"
                            )));
                        }
                    };
                sz
            }
        };
        if size == 0 || size % page_size != 0 {
            return Err(Error::InvalidArgument(format!(
                "region size {size} must be a nonzero multiple of the page size {page_size}"
            )));
        }
        let fd = rustix::fs::memfd_create(&cname, flags).map_err(|e| {
            if opts.hugetlb.is_some() {
                Error::Unsupported { feature: "hugetlb memfd", errno: e.into() }
            } else {
                Error::os(format!("memfd_create({name})"), e)
            }
        })?;
        rustix::fs::ftruncate(&fd, size as u64)
            .map_err(|e| Error::os(format!("ftruncate({name}, {size})"), e))?;
        if opts.seal {
            rustix::fs::fcntl_add_seals(&fd, SealFlags::GROW | SealFlags::SHRINK)
                .map_err(|e| Error::os(format!("F_ADD_SEALS({name})"), e))?;
        }
        let mapping = Mapping::map(fd.as_fd(), size, page_size).map_err(|e| match (opts.hugetlb, e) {
            // hugetlbfs reserves pages at mmap time: ENOMEM means none are free.
            (Some(_), Error::Os { errno, .. }) => {
                Error::Unsupported { feature: "hugetlb memfd (not enough free huge pages)", errno }
            }
            (_, e) => e,
        })?;
        Ok(Self { name: name.to_owned(), fd, mapping: Arc::new(mapping) })
    }

    /// The region's name (also the memfd's name, visible in /proc/PID/fd).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The memfd.
    #[must_use]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A shared handle on the mapping; the pages stay mapped while it lives.
    #[must_use]
    pub fn mapping(&self) -> Arc<Mapping> {
        Arc::clone(&self.mapping)
    }

    /// Size in bytes.
    #[must_use]
    pub fn size(&self) -> usize {
        self.mapping.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_write_read() {
        let r = Region::create("t", 1 << 20, &CreateOptions { seal: true, ..Default::default() }).unwrap();
        let m = r.mapping();
        m.write(4096, b"hello").unwrap();
        let mut out = [0u8; 5];
        m.read(4096, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(m.write((1 << 20) - 2, b"abc").is_err());
        assert!(Region::create("t", 0, &CreateOptions::default()).is_err());
    }
}
