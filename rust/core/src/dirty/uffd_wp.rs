//! Kernel write tracking: userfaultfd async write-protect + `PAGEMAP_SCAN`.
//!
//! The mapping is registered with a userfaultfd in write-protect mode with
//! `UFFD_FEATURE_WP_ASYNC`: the kernel resolves each write fault itself (no
//! handler thread) and the page table entry loses its write-protect bit. A
//! `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` with `PM_SCAN_WP_MATCHING`
//! then reports the written pages and re-protects them in the same walk, so a
//! write is either in this sync or in the next. It sees writes by every thread
//! of the process, native or Python, and by the kernel on its behalf (KVM).
//!
//! The kernel records a write when the store faults, just before it lands.
//! So a write that races with a scan may be reported by that scan and once
//! more by a later one (the store retried after the re-protect): tracking is
//! conservative, a write is never missed, and a page written once while no
//! scan runs is reported exactly once.
//!
//! Neither libc nor rustix defines this ABI (Linux 6.7+), so it is defined
//! here from `include/uapi/linux/fs.h` and `include/uapi/linux/userfaultfd.h`.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use rustix::fs::{Mode, OFlags};
use rustix::ioctl::{Opcode, opcode};
use rustix::mm::UserfaultfdFlags;

use super::raw_ioctl;
use crate::error::{Errno, Error, Result};
use crate::memfd::{CreateOptions, Mapping, Region, host_page_size};

/// `struct pm_scan_arg` (linux/fs.h): the argument of `PAGEMAP_SCAN`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PmScanArg {
    /// `sizeof(struct pm_scan_arg)`.
    pub size: u64,
    /// `PM_SCAN_*` flags.
    pub flags: u64,
    /// First address to scan (page aligned).
    pub start: u64,
    /// End of the scan (exclusive).
    pub end: u64,
    /// Set by the kernel: where the walk stopped.
    pub walk_end: u64,
    /// Address of a `page_region` array.
    pub vec: u64,
    /// Entries in `vec`.
    pub vec_len: u64,
    /// Stop after this many pages (0: no limit).
    pub max_pages: u64,
    /// Categories whose sense is inverted.
    pub category_inverted: u64,
    /// Categories a page must all have.
    pub category_mask: u64,
    /// Categories of which a page must have at least one.
    pub category_anyof_mask: u64,
    /// Categories reported in `page_region::categories`.
    pub return_mask: u64,
}

/// `struct page_region` (linux/fs.h): one run of pages with equal categories.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PageRegion {
    /// First address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `PAGE_IS_*` bits.
    pub categories: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: Opcode = opcode::read_write::<PmScanArg>(b'f', 16);
/// Write-protect the pages that match while scanning.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail the scan if a page is not in an async write-protect range.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// Page category: written since it was last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;

const UFFD_API: u64 = 0xAA;
/// Write-protect shmem and hugetlbfs mappings.
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Write-protect page table entries that are not populated yet.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Resolve write-protect faults in the kernel, without a handler.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_API = _IOWR(0xAA, 0x3F, struct uffdio_api)`.
pub const UFFDIO_API: Opcode = opcode::read_write::<UffdioApi>(0xAA, 0x3F);
/// `UFFDIO_REGISTER = _IOWR(0xAA, 0x00, struct uffdio_register)`.
pub const UFFDIO_REGISTER: Opcode = opcode::read_write::<UffdioRegister>(0xAA, 0x00);
/// `UFFDIO_UNREGISTER = _IOR(0xAA, 0x01, struct uffdio_range)`.
pub const UFFDIO_UNREGISTER: Opcode = opcode::read::<UffdioRange>(0xAA, 0x01);
/// `UFFDIO_WRITEPROTECT = _IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
pub const UFFDIO_WRITEPROTECT: Opcode = opcode::read_write::<UffdioWriteprotect>(0xAA, 0x06);
/// `USERFAULTFD_IOC_NEW = _IO(0xAA, 0x00)` on `/dev/userfaultfd`.
pub const USERFAULTFD_IOC_NEW: Opcode = opcode::none(0xAA, 0x00);

/// Regions fetched per `PAGEMAP_SCAN` call (24 bytes each).
const SCAN_BATCH: usize = 4096;

/// A new userfaultfd: the syscall, or `/dev/userfaultfd` where the syscall is
/// refused (EPERM: `vm.unprivileged_userfaultfd = 0` without CAP_SYS_PTRACE).
fn open_uffd() -> Result<OwnedFd> {
    let flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
    // SAFETY: creating a userfaultfd touches no memory; its power over this
    // process's memory is used only through the registrations below.
    let errno = match unsafe { rustix::mm::userfaultfd(flags) } {
        Ok(fd) => return Ok(fd),
        Err(e) if e == rustix::io::Errno::PERM => e,
        Err(e) => return Err(Error::Unsupported { feature: "userfaultfd", errno: e.into() }),
    };
    let dev = rustix::fs::open("/dev/userfaultfd", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(|_| Error::Unsupported { feature: "userfaultfd", errno: errno.into() })?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the userfaultfd flags as an integer.
    let fd = unsafe { raw_ioctl(&dev, USERFAULTFD_IOC_NEW, flags.bits() as usize as *mut libc::c_void) }
        .map_err(|e| Error::Unsupported { feature: "userfaultfd (/dev/userfaultfd)", errno: e.into() })?;
    // SAFETY: a successful USERFAULTFD_IOC_NEW returns a new fd that we own.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// `UFFDIO_API` handshake asking for `features`; returns what the kernel offers.
fn uffd_api(uffd: &OwnedFd, features: u64) -> rustix::io::Result<u64> {
    let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
    // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which `api` is.
    unsafe { raw_ioctl(uffd, UFFDIO_API, (&raw mut api).cast()) }?;
    Ok(api.features)
}

/// The userfaultfd features this kernel offers (probed on a throwaway fd,
/// because `UFFDIO_API` can be done only once per fd).
fn available_features() -> Result<u64> {
    uffd_api(&open_uffd()?, 0).map_err(|e| Error::Unsupported { feature: "userfaultfd UFFDIO_API", errno: e.into() })
}

/// Name the first required feature missing from `features`.
fn require_wp_async(features: u64) -> Result<()> {
    let einval = Errno(libc::EINVAL);
    if features & UFFD_FEATURE_WP_ASYNC == 0 {
        return Err(Error::Unsupported { feature: "userfaultfd UFFD_FEATURE_WP_ASYNC", errno: einval });
    }
    if features & UFFD_FEATURE_WP_UNPOPULATED == 0 {
        return Err(Error::Unsupported { feature: "userfaultfd UFFD_FEATURE_WP_UNPOPULATED", errno: einval });
    }
    Ok(())
}

/// An empty `PAGEMAP_SCAN`: checks that the ioctl exists.
fn probe_pagemap_scan(pagemap: &OwnedFd) -> Result<()> {
    let mut arg = PmScanArg { size: size_of::<PmScanArg>() as u64, ..Default::default() };
    // SAFETY: PAGEMAP_SCAN reads/writes one `pm_scan_arg`; the empty range with
    // no output vector makes the kernel write nothing else.
    unsafe { raw_ioctl(pagemap, PAGEMAP_SCAN, (&raw mut arg).cast()) }
        .map_err(|e| Error::Unsupported { feature: "PAGEMAP_SCAN ioctl", errno: e.into() })?;
    Ok(())
}

fn open_pagemap() -> Result<OwnedFd> {
    rustix::fs::open("/proc/self/pagemap", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| Error::os("open(/proc/self/pagemap)", e))
}

/// Write tracking of one mapping by the kernel. Dropping it (or [`stop`])
/// un-protects and unregisters the range: the mapping is untracked again.
///
/// [`stop`]: UffdWp::stop
#[derive(Debug)]
pub struct UffdWp {
    uffd: OwnedFd,
    pagemap: OwnedFd,
    mapping: Arc<Mapping>,
    buf: Vec<PageRegion>,
    registered: bool,
}

impl UffdWp {
    /// Register `mapping` for async write-protect and protect all of it, so
    /// the first scan reports exactly the pages written from now on.
    pub fn start(mapping: Arc<Mapping>) -> Result<Self> {
        let offered = available_features()?;
        require_wp_async(offered)?;
        let pagemap = open_pagemap()?;
        probe_pagemap_scan(&pagemap)?;
        let uffd = open_uffd()?;
        let want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | (offered & UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
        uffd_api(&uffd, want)
            .map_err(|e| Error::Unsupported { feature: "userfaultfd UFFD_FEATURE_WP_ASYNC", errno: e.into() })?;
        let range = UffdioRange { start: mapping.as_ptr() as u64, len: mapping.len() as u64 };
        let mut reg = UffdioRegister { range, mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads/writes one `uffdio_register`. The range
        // is our live mapping (kept alive by the `Arc` we store).
        unsafe { raw_ioctl(&uffd, UFFDIO_REGISTER, (&raw mut reg).cast()) }.map_err(|e| match e {
            rustix::io::Errno::BUSY => {
                Error::os("UFFDIO_REGISTER: the region is already write-tracked by another userfaultfd", e)
            }
            e => Error::os(format!("UFFDIO_REGISTER(WP, {:#x} bytes)", range.len), e),
        })?;
        let this = Self { uffd, pagemap, mapping, buf: vec![PageRegion::default(); SCAN_BATCH], registered: true };
        this.protect(true)?;
        Ok(this)
    }

    /// Write-protect (or un-protect) the whole mapping.
    fn protect(&self, on: bool) -> Result<()> {
        let range = UffdioRange { start: self.mapping.as_ptr() as u64, len: self.mapping.len() as u64 };
        let mut wp = UffdioWriteprotect { range, mode: if on { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 } };
        // SAFETY: UFFDIO_WRITEPROTECT reads/writes one `uffdio_writeprotect`
        // over our registered, live mapping.
        unsafe { raw_ioctl(&self.uffd, UFFDIO_WRITEPROTECT, (&raw mut wp).cast()) }
            .map_err(|e| Error::os(format!("UFFDIO_WRITEPROTECT(mode {})", wp.mode), e))?;
        Ok(())
    }

    /// Get the pages written since the last scan and re-protect them,
    /// OR-ing one bit per host page into `words`. Returns the pages reported.
    pub fn scan_into(&mut self, words: &mut [u64]) -> Result<usize> {
        let base = self.mapping.as_ptr() as u64;
        let end = base + self.mapping.len() as u64;
        let ps = host_page_size() as u64;
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            start: base,
            end,
            vec: self.buf.as_mut_ptr() as u64,
            vec_len: self.buf.len() as u64,
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..Default::default()
        };
        let mut pages = 0;
        loop {
            // SAFETY: PAGEMAP_SCAN reads/writes `arg` and writes at most
            // `vec_len` `page_region`s into `buf`, which is that long and
            // exclusively ours (`&mut self`); the scanned range is our mapping.
            let n = unsafe { raw_ioctl(&self.pagemap, PAGEMAP_SCAN, (&raw mut arg).cast()) }
                .map_err(|e| Error::os("PAGEMAP_SCAN(PAGE_IS_WRITTEN, WP_MATCHING)", e))?;
            for r in &self.buf[..n as usize] {
                let (first, count) = ((r.start - base) / ps, (r.end - r.start).div_ceil(ps));
                for (w, mask) in super::word_masks(first as usize, count as usize) {
                    words[w] |= mask;
                }
                pages += count as usize;
            }
            if arg.walk_end >= end || (n == 0 && arg.walk_end <= arg.start) {
                return Ok(pages);
            }
            arg.start = arg.walk_end;
        }
    }

    /// Un-protect and unregister the mapping, reporting any failure.
    pub fn stop(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        if !std::mem::replace(&mut self.registered, false) {
            return Ok(());
        }
        self.protect(false)?;
        let mut range = UffdioRange { start: self.mapping.as_ptr() as u64, len: self.mapping.len() as u64 };
        // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range`: our registered mapping.
        unsafe { raw_ioctl(&self.uffd, UFFDIO_UNREGISTER, (&raw mut range).cast()) }
            .map_err(|e| Error::os("UFFDIO_UNREGISTER", e))?;
        Ok(())
    }
}

impl Drop for UffdWp {
    fn drop(&mut self) {
        // Closing the userfaultfd unregisters anyway; this also clears the
        // write-protect bits so the mapping does not fault again.
        let _ = self.release();
    }
}

/// What [`probe`] found about kernel write tracking on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// A userfaultfd could be created.
    pub userfaultfd: bool,
    /// It offers `UFFD_FEATURE_WP_ASYNC` and `UFFD_FEATURE_WP_UNPOPULATED`.
    pub wp_async: bool,
    /// `/proc/self/pagemap` answers the `PAGEMAP_SCAN` ioctl.
    pub pagemap_scan: bool,
    /// An end-to-end check on a one-page memfd reported exactly the written page.
    pub available: bool,
    /// Human-readable outcome.
    pub detail: String,
    /// The errno of the first failure, if any.
    pub errno: Option<i32>,
}

/// Check every piece of kernel write tracking, then track a write to a
/// one-page memfd end to end.
#[must_use]
pub fn probe() -> Probe {
    let mut p = Probe { userfaultfd: false, wp_async: false, pagemap_scan: false, available: false, detail: String::new(), errno: None };
    let result = (|| {
        let offered = available_features()?;
        p.userfaultfd = true;
        require_wp_async(offered)?;
        p.wp_async = true;
        probe_pagemap_scan(&open_pagemap()?)?;
        p.pagemap_scan = true;
        let region = Region::create("cprfast-probe", host_page_size(), &CreateOptions::default())?;
        let mut wp = UffdWp::start(region.mapping())?;
        let mut words = [0u64; 1];
        region.mapping().write(0, &[1])?;
        wp.scan_into(&mut words)?;
        if words[0] != 1 {
            return Err(Error::Corrupt(format!("a written page was not reported (bits {:#x})", words[0])));
        }
        wp.stop()
    })();
    match result {
        Ok(()) => {
            p.available = true;
            p.detail = "userfaultfd async write-protect + PAGEMAP_SCAN".into();
        }
        Err(e) => {
            p.errno = e.errno();
            p.detail = e.to_string();
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes_and_ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(size_of::<PmScanArg>(), 96);
        assert_eq!(size_of::<PageRegion>(), 24);
        assert_eq!(size_of::<UffdioApi>(), 24);
        assert_eq!(size_of::<UffdioRegister>(), 32);
        assert_eq!(size_of::<UffdioWriteprotect>(), 24);
        assert_eq!(PAGEMAP_SCAN, 0xC060_6610);
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_AA01);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xC018_AA06);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xAA00);
    }

    #[test]
    fn writes_are_reported_once_and_nothing_else() {
        let ps = host_page_size();
        let region = Region::create("uffd-test", 256 * ps, &CreateOptions::default()).unwrap();
        let m = region.mapping();
        m.write(3 * ps, &[1]).unwrap(); // populated before tracking: not reported
        let mut wp = UffdWp::start(region.mapping()).unwrap();
        let written = [0usize, 5, 6, 7, 64, 200, 255];
        let writers: Vec<_> = written
            .iter()
            .map(|&p| {
                let m = region.mapping();
                std::thread::spawn(move || m.write(p * ps + 17, &[0xAB; 8]).unwrap())
            })
            .collect();
        writers.into_iter().for_each(|t| t.join().unwrap());
        let mut words = [0u64; 4];
        assert_eq!(wp.scan_into(&mut words).unwrap(), written.len());
        let set = super::super::DirtySet::from_words(words.to_vec(), 256).unwrap();
        assert_eq!(set.ranges().collect::<Vec<_>>(), vec![(0, 1), (5, 3), (64, 1), (200, 1), (255, 1)]);
        let mut again = [0u64; 4];
        assert_eq!(wp.scan_into(&mut again).unwrap(), 0);
        m.write(5 * ps, &[2]).unwrap();
        assert_eq!(wp.scan_into(&mut again).unwrap(), 1);
        assert_eq!(again, [1 << 5, 0, 0, 0]);
        wp.stop().unwrap();
    }

    #[test]
    fn probe_reports_a_working_kernel() {
        let p = probe();
        assert!(p.available, "{p:?}");
        assert!(p.userfaultfd && p.wp_async && p.pagemap_scan && p.errno.is_none());
    }
}
