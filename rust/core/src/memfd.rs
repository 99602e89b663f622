//! Guest-RAM regions: a memfd, sealed against resizing, mapped `MAP_SHARED`.
//!
//! A [`Region`] owns its memfd; its mapping is a separate, reference-counted
//! [`Mapping`] so that anything still working on the pages (a dirty tracker, a
//! page stream, a vCPU) keeps them mapped even if the region object is closed.
//! Guest memory is reached only through raw pointers: a guest or another
//! process may write it at any time, so no `&[u8]` over it is ever formed.
//!
//! A region is either created here ([`Region::create`]) or adopted from an fd
//! another process handed over ([`Region::adopt`]), which is verified to be a
//! memfd of the expected size and seals before it is mapped.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::fs::{FileType, MemfdFlags, OFlags, SealFlags};
use rustix::io::FdFlags;
use rustix::mm::{Advice, MapFlags, ProtFlags};
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::error::{Errno, Error, Result};

/// The base page size of the host.
#[must_use]
pub fn host_page_size() -> usize {
    rustix::param::page_size()
}

/// Where the kernel says how shmem (and so memfd) uses transparent huge pages.
pub const SHMEM_THP_SYSFS: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// The most memory this machine can ever back: RAM plus swap (`sysinfo(2)`).
/// A memfd may be truncated, and even mapped, far beyond it (pages are
/// allocated only when touched), but a guest that touched such a region
/// would bring the OOM killer; a region larger than this is refused up front.
#[must_use]
pub fn max_region_size() -> u64 {
    let info = rustix::system::sysinfo();
    (info.totalram + info.totalswap).saturating_mul(u64::from(info.mem_unit.max(1)))
}

/// Refuse a region size the machine can never back (see [`max_region_size`]).
fn check_backable(size: usize) -> Result<()> {
    let max = max_region_size();
    if size as u64 > max {
        return Err(Error::InvalidArgument(format!(
            "region size {size} exceeds this machine's RAM + swap ({max} bytes): it could never be backed"
        )));
    }
    Ok(())
}

/// The shmem transparent-huge-page mode in force: `always`, `within_size`,
/// `advise`, `never`, `deny` or `force` (the bracketed word in [`SHMEM_THP_SYSFS`]).
pub fn shmem_thp_mode() -> Result<String> {
    let text = std::fs::read_to_string(SHMEM_THP_SYSFS).map_err(|e| Error::Unsupported {
        feature: "shmem transparent huge pages (no /sys/kernel/mm/transparent_hugepage/shmem_enabled)",
        errno: Errno(e.raw_os_error().unwrap_or(libc::ENOENT)),
    })?;
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .map(str::to_owned)
        .ok_or_else(|| Error::Corrupt(format!("{SHMEM_THP_SYSFS} has no [selected] mode: {text:?}")))
}

/// Pages are hashed through a staging buffer of at most this many bytes.
const HASH_CHUNK: usize = 64 * 1024;

/// xxh3-64 of `len` bytes that `stage(offset, buf)` copies into `buf` piece by
/// piece. Equal to `xxh3_64` of the whole `len` bytes, whatever the chunking.
fn hash_staged(len: usize, buf: &mut [u8], mut stage: impl FnMut(usize, &mut [u8])) -> u64 {
    if len <= buf.len() {
        let b = &mut buf[..len];
        stage(0, b);
        return xxh3_64(b);
    }
    let mut hasher = Xxh3::new();
    let chunk = buf.len();
    let mut off = 0;
    while off < len {
        let b = &mut buf[..chunk.min(len - off)];
        stage(off, b);
        hasher.update(b);
        off += b.len();
    }
    hasher.digest()
}

/// The checksum [`Mapping::checksums`] gives a page of `page_size` zero bytes,
/// so that callers can recognize zero pages without reading them again.
#[must_use]
pub fn zero_page_checksum(page_size: usize) -> u64 {
    let mut buf = vec![0u8; page_size.min(HASH_CHUNK)];
    hash_staged(page_size, &mut buf, |_, b| b.fill(0))
}

/// How many worker threads to use for `pages` pages when `threads` were asked
/// for (0 = the machine's available parallelism).
fn worker_count(threads: usize, pages: usize) -> usize {
    let wanted = if threads == 0 {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    } else {
        threads
    };
    wanted.clamp(1, pages.max(1))
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
            rustix::mm::mmap(std::ptr::null_mut(), len, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED, fd, 0)
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
        // SAFETY: `data` is a live Rust slice of `data.len()` readable bytes.
        unsafe { self.write_raw(offset, data.as_ptr(), data.len()) }
    }

    /// Copy `len` bytes from `src` into the mapping at `offset`. `src` may lie
    /// in this very mapping (the copy is a `memmove`).
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes for the whole call.
    pub unsafe fn write_raw(&self, offset: usize, src: *const u8, len: usize) -> Result<()> {
        self.check_range(offset, len)?;
        // SAFETY: the destination is bounds-checked; the caller guarantees `src`;
        // `ptr::copy` allows the two ranges to overlap.
        unsafe { std::ptr::copy(src, self.base.add(offset), len) };
        Ok(())
    }

    /// Advise the kernel to back the mapping with transparent huge pages
    /// (`MADV_HUGEPAGE`). Advice only: whether shmem honours it depends on
    /// [`shmem_thp_mode`].
    pub fn advise_hugepage(&self) -> Result<()> {
        // SAFETY: the advice changes no contents and the range is our mapping.
        unsafe { rustix::mm::madvise(self.base.cast(), self.len, Advice::LinuxHugepage) }
            .map_err(|e| Error::Unsupported { feature: "MADV_HUGEPAGE (transparent huge pages)", errno: e.into() })
    }

    /// Allocate every page now (`MADV_POPULATE_WRITE`), split across
    /// `threads` threads (0 = available parallelism), so the guest never takes
    /// a first-touch fault. Returns the wall time it took.
    pub fn prefault(&self, threads: usize) -> Result<Duration> {
        let start = Instant::now();
        let pages = self.pages();
        let workers = worker_count(threads, pages);
        let per = pages.div_ceil(workers) * self.page_size;
        let base = self.base as usize;
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..self.len)
                .step_by(per)
                .map(|off| {
                    let len = per.min(self.len - off);
                    s.spawn(move || {
                        // SAFETY: `[off, off+len)` lies inside our mapping and is
                        // page-aligned; populating changes no contents.
                        unsafe { rustix::mm::madvise((base + off) as *mut _, len, Advice::LinuxPopulateWrite) }.map_err(
                            |e| match e {
                                rustix::io::Errno::INVAL => {
                                    Error::Unsupported { feature: "MADV_POPULATE_WRITE (Linux 5.14+)", errno: e.into() }
                                }
                                e => Error::os(format!("madvise(MADV_POPULATE_WRITE, {len} bytes at +{off:#x})"), e),
                            },
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("prefault worker panicked")).collect()
        });
        results.into_iter().collect::<Result<()>>()?;
        Ok(start.elapsed())
    }

    /// One xxh3-64 checksum per page, computed by `threads` threads
    /// (0 = available parallelism). Each page is copied into a per-thread
    /// buffer before it is hashed, so guest writes racing with the hash can
    /// change the result but never make it undefined. A page of zeros hashes to
    /// [`zero_page_checksum`].
    #[must_use]
    pub fn checksums(&self, threads: usize) -> Vec<u64> {
        let pages = self.pages();
        let page_size = self.page_size;
        let mut out = vec![0u64; pages];
        let per = pages.div_ceil(worker_count(threads, pages)).max(1);
        let base = self.base as usize;
        std::thread::scope(|s| {
            for (chunk, sums) in out.chunks_mut(per).enumerate() {
                s.spawn(move || {
                    let mut buf = vec![0u8; page_size.min(HASH_CHUNK)];
                    for (i, sum) in sums.iter_mut().enumerate() {
                        let page = base + (chunk * per + i) * page_size;
                        *sum = hash_staged(page_size, &mut buf, |off, b| {
                            // SAFETY: `page + off .. + b.len()` lies inside the
                            // mapping (page index < pages, off + len <= page_size);
                            // `b` is our own buffer, distinct from the mapping.
                            unsafe { std::ptr::copy_nonoverlapping((page + off) as *const u8, b.as_mut_ptr(), b.len()) }
                        });
                    }
                });
            }
        });
        out
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
    /// Advise shmem transparent huge pages (`MADV_HUGEPAGE`) on the mapping.
    pub thp: bool,
    /// Populate every page before returning (see [`Mapping::prefault`]).
    pub prefault: bool,
}

/// Wall time spent in each phase of setting up a region.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// `memfd_create` + `ftruncate` + seals, or, for an adopted fd, dup + checks.
    pub create: Duration,
    /// `mmap` (and `MADV_HUGEPAGE` if asked for).
    pub map: Duration,
    /// `MADV_POPULATE_WRITE` of every page; zero until the region is prefaulted.
    pub prefault: Duration,
}

/// The seals that make a region's size fixed.
pub const SIZE_SEALS: SealFlags = SealFlags::GROW.union(SealFlags::SHRINK);

/// Human-readable names of the seals in `seals`, e.g. `"GROW|SHRINK"`.
fn seal_names(seals: SealFlags) -> String {
    let names: Vec<_> = [
        (SealFlags::SEAL, "SEAL"),
        (SealFlags::SHRINK, "SHRINK"),
        (SealFlags::GROW, "GROW"),
        (SealFlags::WRITE, "WRITE"),
        (SealFlags::FUTURE_WRITE, "FUTURE_WRITE"),
    ]
    .into_iter()
    .filter(|(f, _)| seals.contains(*f))
    .map(|(_, n)| n)
    .collect();
    if names.is_empty() { "none".to_owned() } else { names.join("|") }
}

/// A named guest-RAM region: an owned memfd and its shared mapping.
#[derive(Debug)]
pub struct Region {
    name: String,
    fd: OwnedFd,
    mapping: Arc<Mapping>,
    timings: Timings,
    thp_mode: Option<String>,
}

impl Region {
    /// Create a memfd (`MFD_CLOEXEC`) of `size` bytes and map it.
    pub fn create(name: &str, size: usize, opts: &CreateOptions) -> Result<Self> {
        let start = Instant::now();
        let cname = CString::new(name)
            .map_err(|_| Error::InvalidArgument(format!("region name {name:?} contains a NUL byte")))?;
        let mut flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
        let page_size = match opts.hugetlb {
            None => host_page_size(),
            Some(_) if opts.thp => {
                return Err(Error::InvalidArgument(
                    "thp (transparent huge pages) and hugetlb exclude each other".into(),
                ));
            }
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
        check_backable(size)?;
        let fd = rustix::fs::memfd_create(&cname, flags).map_err(|e| {
            if opts.hugetlb.is_some() {
                Error::Unsupported { feature: "hugetlb memfd", errno: e.into() }
            } else {
                Error::os(format!("memfd_create({name})"), e)
            }
        })?;
        rustix::fs::ftruncate(&fd, size as u64).map_err(|e| Error::os(format!("ftruncate({name}, {size})"), e))?;
        if opts.seal {
            rustix::fs::fcntl_add_seals(&fd, SIZE_SEALS).map_err(|e| Error::os(format!("F_ADD_SEALS({name})"), e))?;
        }
        let create = start.elapsed();
        let mapping = Mapping::map(fd.as_fd(), size, page_size).map_err(|e| match (opts.hugetlb, e) {
            // hugetlbfs reserves pages at mmap time: ENOMEM means none are free.
            (Some(_), Error::Os { errno, .. }) => {
                Error::Unsupported { feature: "hugetlb memfd (not enough free huge pages)", errno }
            }
            (_, e) => e,
        })?;
        let thp_mode = if opts.thp {
            mapping.advise_hugepage()?;
            Some(shmem_thp_mode()?)
        } else {
            None
        };
        let timings = Timings { create, map: start.elapsed() - create, prefault: Duration::ZERO };
        let mut region = Self { name: name.to_owned(), fd, mapping: Arc::new(mapping), timings, thp_mode };
        if opts.prefault {
            region.timings.prefault = region.mapping.prefault(0)?;
        }
        Ok(region)
    }

    /// Adopt a memfd another process created: check that it is a memfd (on
    /// tmpfs or hugetlbfs) open read-write, of exactly `size` bytes, sealed
    /// against grow and shrink if `require_seals`; then map it. The region owns
    /// a `F_DUPFD_CLOEXEC` duplicate; the caller keeps (and closes) `fd`.
    /// `name` defaults to the memfd's own name.
    pub fn adopt(fd: BorrowedFd<'_>, size: usize, name: Option<&str>, require_seals: bool) -> Result<Self> {
        let start = Instant::now();
        check_backable(size)?;
        let raw = fd.as_raw_fd();
        let bad = |what: String| Error::BadFd(format!("fd {raw}: {what}"));
        let fd = rustix::io::fcntl_dupfd_cloexec(fd, 0).map_err(|e| match e {
            rustix::io::Errno::BADF => bad("not an open file descriptor".into()),
            e => Error::os(format!("F_DUPFD_CLOEXEC({raw})"), e),
        })?;
        let st = rustix::fs::fstat(&fd).map_err(|e| Error::os(format!("fstat({raw})"), e))?;
        let file_type = FileType::from_raw_mode(st.st_mode);
        if file_type != FileType::RegularFile {
            return Err(bad(format!("not a memfd: it is a {file_type:?}")));
        }
        let link = rustix::fs::readlink(format!("/proc/self/fd/{}", fd.as_raw_fd()), Vec::new())
            .map_err(|e| Error::os(format!("readlink(/proc/self/fd/{raw})"), e))?;
        let link = link.to_string_lossy();
        let sfs = rustix::fs::fstatfs(&fd).map_err(|e| Error::os(format!("fstatfs({raw})"), e))?;
        let page_size = match sfs.f_type {
            t if t == libc::TMPFS_MAGIC => host_page_size(),
            // hugetlbfs reports its huge page size as the block size.
            t if t == libc::HUGETLBFS_MAGIC => sfs.f_bsize as usize,
            t => {
                return Err(bad(format!(
                    "not a memfd: {link} is on a filesystem with magic {t:#x}, not tmpfs/hugetlbfs"
                )));
            }
        };
        let Some(memfd_name) = link.strip_prefix("/memfd:") else {
            return Err(bad(format!("not a memfd: it is the file {link}")));
        };
        let memfd_name = memfd_name.strip_suffix(" (deleted)").unwrap_or(memfd_name);
        let actual = usize::try_from(st.st_size).unwrap_or(usize::MAX);
        if actual != size {
            return Err(bad(format!("wrong size: {actual} bytes vs expected {size}")));
        }
        if size == 0 || size % page_size != 0 {
            return Err(bad(format!("size {size} is not a nonzero multiple of its page size {page_size}")));
        }
        let mode = rustix::fs::fcntl_getfl(&fd).map_err(|e| Error::os(format!("F_GETFL({raw})"), e))?;
        if mode & OFlags::RWMODE != OFlags::RDWR {
            return Err(bad("not open read-write, cannot map it MAP_SHARED writable".into()));
        }
        if require_seals {
            let seals = seals_of(fd.as_fd())?;
            if !seals.contains(SIZE_SEALS) {
                return Err(bad(format!("missing seals GROW|SHRINK (has {})", seal_names(seals))));
            }
        }
        let create = start.elapsed();
        let mapping = Mapping::map(fd.as_fd(), size, page_size)?;
        let timings = Timings { create, map: start.elapsed() - create, prefault: Duration::ZERO };
        let name = name.unwrap_or(memfd_name).to_owned();
        Ok(Self { name, fd, mapping: Arc::new(mapping), timings, thp_mode: None })
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

    /// How long creating (or adopting), mapping and prefaulting took.
    #[must_use]
    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// The shmem THP mode in force when `thp` was asked for at creation
    /// (`"never"`/`"deny"` mean the advice has no effect), else `None`.
    #[must_use]
    pub fn thp_mode(&self) -> Option<&str> {
        self.thp_mode.as_deref()
    }

    /// The memfd's seals (`F_GET_SEALS`).
    pub fn seals(&self) -> Result<SealFlags> {
        seals_of(self.fd.as_fd())
    }

    /// Keep the memfd open across `execve` (clear `FD_CLOEXEC`), for cpr-exec;
    /// `false` restores close-on-exec.
    pub fn set_preserved(&self, preserved: bool) -> Result<()> {
        let flags = if preserved { FdFlags::empty() } else { FdFlags::CLOEXEC };
        rustix::io::fcntl_setfd(&self.fd, flags).map_err(|e| Error::os(format!("F_SETFD({})", self.name), e))
    }

    /// Whether the memfd survives `execve` (`FD_CLOEXEC` is clear).
    pub fn preserved(&self) -> Result<bool> {
        let flags = rustix::io::fcntl_getfd(&self.fd).map_err(|e| Error::os(format!("F_GETFD({})", self.name), e))?;
        Ok(!flags.contains(FdFlags::CLOEXEC))
    }
}

/// The seals of `fd`; a file that cannot be sealed (EINVAL) has none.
fn seals_of(fd: BorrowedFd<'_>) -> Result<SealFlags> {
    match rustix::fs::fcntl_get_seals(fd) {
        Ok(s) => Ok(s),
        Err(rustix::io::Errno::INVAL) => Ok(SealFlags::empty()),
        Err(e) => Err(Error::os(format!("F_GET_SEALS({})", fd.as_raw_fd()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(size: usize) -> Region {
        Region::create("t", size, &CreateOptions { seal: true, ..Default::default() }).unwrap()
    }

    fn bad_fd_text(r: Result<Region>) -> String {
        match r {
            Err(Error::BadFd(s)) => s,
            other => panic!("expected BadFd, got {other:?}"),
        }
    }

    #[test]
    fn create_write_read() {
        let r = sealed(1 << 20);
        let m = r.mapping();
        m.write(4096, b"hello").unwrap();
        let mut out = [0u8; 5];
        m.read(4096, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(m.write((1 << 20) - 2, b"abc").is_err());
        assert!(Region::create("t", 0, &CreateOptions::default()).is_err());
        assert_eq!(r.seals().unwrap(), SIZE_SEALS);
        assert!(rustix::fs::ftruncate(r.fd(), 2 << 20).is_err(), "GROW seal must stop ftruncate");
    }

    #[test]
    fn sizes_beyond_ram_and_swap_are_refused() {
        let too_big = usize::try_from(max_region_size()).unwrap() + host_page_size();
        let too_big = too_big.next_multiple_of(host_page_size());
        match Region::create("t", too_big, &CreateOptions::default()) {
            Err(Error::InvalidArgument(s)) => assert!(s.contains("RAM + swap"), "{s}"),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
        let r = sealed(1 << 16);
        assert!(matches!(Region::adopt(r.fd(), too_big, None, true), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn write_raw_may_overlap() {
        let r = sealed(1 << 16);
        let m = r.mapping();
        m.write(0, b"abcdef").unwrap();
        // SAFETY: the source lies inside the live mapping, 6 readable bytes.
        unsafe { m.write_raw(2, m.as_ptr(), 6) }.unwrap();
        let mut out = [0u8; 8];
        m.read(0, &mut out).unwrap();
        assert_eq!(&out, b"ababcdef");
    }

    #[test]
    fn adopt_shares_pages_and_owns_a_dup() {
        let r = sealed(1 << 20);
        let a = Region::adopt(r.fd(), 1 << 20, None, true).unwrap();
        assert_eq!(a.name(), "t");
        assert_ne!(a.fd().as_raw_fd(), r.fd().as_raw_fd());
        assert!(!a.preserved().unwrap(), "the dup must be close-on-exec");
        a.mapping().write(8192, b"xyz").unwrap();
        let mut out = [0u8; 3];
        r.mapping().read(8192, &mut out).unwrap();
        assert_eq!(&out, b"xyz");
        let named = Region::adopt(r.fd(), 1 << 20, Some("guest"), true).unwrap();
        assert_eq!(named.name(), "guest");
    }

    #[test]
    fn adopt_refuses_wrong_size_unsealed_and_non_memfds() {
        let r = sealed(1 << 20);
        let text = bad_fd_text(Region::adopt(r.fd(), 2 << 20, None, true));
        assert!(text.contains("wrong size: 1048576 bytes vs expected 2097152"), "{text}");

        let unsealed = Region::create("u", 1 << 20, &CreateOptions::default()).unwrap();
        let text = bad_fd_text(Region::adopt(unsealed.fd(), 1 << 20, None, true));
        assert!(text.contains("missing seals GROW|SHRINK (has none)"), "{text}");
        Region::adopt(unsealed.fd(), 1 << 20, None, false).unwrap();

        let (rd, _wr) = rustix::pipe::pipe().unwrap();
        let text = bad_fd_text(Region::adopt(rd.as_fd(), 4096, None, true));
        assert!(text.contains("not a memfd: it is a Fifo"), "{text}");

        let file = std::fs::File::open(env!("CARGO_MANIFEST_DIR").to_owned() + "/Cargo.toml").unwrap();
        let text = bad_fd_text(Region::adopt(file.as_fd(), 4096, None, true));
        assert!(text.contains("not a memfd"), "{text}");
    }

    #[test]
    fn preserve_flips_cloexec() {
        let r = sealed(1 << 16);
        assert!(!r.preserved().unwrap());
        r.set_preserved(true).unwrap();
        assert!(r.preserved().unwrap());
        r.set_preserved(false).unwrap();
        assert!(!r.preserved().unwrap());
    }

    #[test]
    fn checksums_find_changes_and_zero_pages() {
        let a = sealed(64 << 12);
        let b = sealed(64 << 12);
        for r in [&a, &b] {
            r.mapping().write(5 << 12, b"same").unwrap();
        }
        let (sa, sb) = (a.mapping().checksums(3), b.mapping().checksums(1));
        assert_eq!(sa.len(), 64);
        assert_eq!(sa, sb);
        let zero = zero_page_checksum(4096);
        assert_eq!(zero, xxh3_64(&[0u8; 4096]));
        assert_eq!(sa.iter().filter(|&&s| s == zero).count(), 63);
        b.mapping().write((40 << 12) + 4095, &[1]).unwrap();
        let sb = b.mapping().checksums(0);
        let differing: Vec<_> = (0..64).filter(|&i| sa[i] != sb[i]).collect();
        assert_eq!(differing, [40]);
    }

    #[test]
    fn staged_hash_equals_one_shot() {
        let data: Vec<u8> = (0..(3 * HASH_CHUNK + 17)).map(|i| (i * 7 % 251) as u8).collect();
        let mut buf = vec![0u8; HASH_CHUNK];
        let staged = hash_staged(data.len(), &mut buf, |off, b| b.copy_from_slice(&data[off..off + b.len()]));
        assert_eq!(staged, xxh3_64(&data));
        assert_eq!(zero_page_checksum(2 << 20), xxh3_64(&vec![0u8; 2 << 20]));
    }

    #[test]
    fn prefault_populates_or_says_unsupported() {
        let r = Region::create("p", 4 << 20, &CreateOptions { seal: true, prefault: true, ..Default::default() });
        match r {
            Ok(r) => {
                assert!(r.timings().prefault > Duration::ZERO);
                r.mapping().prefault(2).unwrap();
            }
            Err(Error::Unsupported { errno, .. }) => assert_eq!(errno.0, libc::EINVAL),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn thp_records_the_shmem_mode_and_excludes_hugetlb() {
        let r = Region::create("thp", 4 << 20, &CreateOptions { thp: true, ..Default::default() }).unwrap();
        assert_eq!(r.thp_mode(), Some(shmem_thp_mode().unwrap().as_str()));
        let opts = CreateOptions { thp: true, hugetlb: Some(2 << 20), ..Default::default() };
        assert!(matches!(Region::create("x", 2 << 20, &opts), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn worker_count_is_bounded_by_pages() {
        assert_eq!(worker_count(8, 3), 3);
        assert_eq!(worker_count(1, 100), 1);
        assert!(worker_count(0, 100) >= 1);
    }
}
