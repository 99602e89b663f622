//! Feature probes that need system calls: memfd, hugetlb memfds and
//! soft-dirty page tracking. Each tries the real thing and reports what
//! happened; nothing here changes how the process behaves afterwards.

use std::os::fd::AsFd;

use rustix::fs::{MemfdFlags, Mode, OFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Whether the feature works here.
    pub available: bool,
    /// What was tried and what came of it.
    pub detail: String,
    /// The errno of the failing call, if one failed.
    pub errno: Option<i32>,
}

impl Probe {
    fn yes(detail: impl Into<String>) -> Self {
        Self { available: true, detail: detail.into(), errno: None }
    }

    fn no(detail: impl Into<String>, errno: Option<rustix::io::Errno>) -> Self {
        Self { available: false, detail: detail.into(), errno: errno.map(|e| e.raw_os_error()) }
    }
}

/// `memfd_create` with sealing, as guest-RAM regions use it.
#[must_use]
pub fn memfd() -> Probe {
    let fd = match rustix::fs::memfd_create("cprfast-probe", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING) {
        Ok(fd) => fd,
        Err(e) => return Probe::no("memfd_create(MFD_ALLOW_SEALING) failed", Some(e)),
    };
    match rustix::fs::fcntl_add_seals(&fd, SealFlags::GROW | SealFlags::SHRINK) {
        Ok(()) => Probe::yes("memfd_create and F_SEAL_GROW|F_SEAL_SHRINK work"),
        Err(e) => Probe::no("fcntl(F_ADD_SEALS) on a memfd failed", Some(e)),
    }
}

/// `memfd_create(MFD_HUGETLB | size)` for a 2 MiB or 1 GiB huge page size.
/// This only shows the kernel supports the size; whether pages are free to
/// back a region is a separate question (see /sys/kernel/mm/hugepages).
#[must_use]
pub fn hugetlb_memfd(page_size: usize) -> Probe {
    let (size_flag, name) = match page_size {
        0x20_0000 => (MemfdFlags::HUGE_2MB, "MFD_HUGE_2MB"),
        0x4000_0000 => (MemfdFlags::HUGE_1GB, "MFD_HUGE_1GB"),
        _ => return Probe::no(format!("no hugetlb memfd flag for page size {page_size}"), None),
    };
    match rustix::fs::memfd_create("cprfast-probe", MemfdFlags::CLOEXEC | MemfdFlags::HUGETLB | size_flag) {
        Ok(_) => Probe::yes(format!("memfd_create(MFD_HUGETLB|{name}) works")),
        Err(e) => Probe::no(format!("memfd_create(MFD_HUGETLB|{name}) failed"), Some(e)),
    }
}

/// Bit 55 of a /proc/PID/pagemap entry: the page is soft-dirty.
const PM_SOFT_DIRTY: u64 = 1 << 55;

/// Soft-dirty tracking: write "4" to /proc/self/clear_refs (this only clears
/// soft-dirty bits, which nothing in cprfast relies on), then check that a
/// freshly written page shows bit 55 in /proc/self/pagemap and a cleared one
/// does not. Kernels without CONFIG_MEM_SOFT_DIRTY accept the write but
/// never set the bit.
#[must_use]
pub fn soft_dirty() -> Probe {
    let page = rustix::param::page_size();
    // SAFETY: a fresh private anonymous page at a kernel-chosen address; it
    // aliases nothing and is unmapped below.
    let addr = match unsafe {
        rustix::mm::mmap_anonymous(std::ptr::null_mut(), page, ProtFlags::READ | ProtFlags::WRITE, MapFlags::PRIVATE)
    } {
        Ok(a) => a.cast::<u8>(),
        Err(e) => return Probe::no("mmap of a probe page failed", Some(e)),
    };
    let result = soft_dirty_on(addr, page);
    // SAFETY: `addr`/`page` come from the mmap above and nothing refers to the page any more.
    let _ = unsafe { rustix::mm::munmap(addr.cast(), page) };
    result
}

fn soft_dirty_on(addr: *mut u8, page: usize) -> Probe {
    let write = |v: u8| {
        // SAFETY: `addr` is a mapped, writable page owned by this probe.
        unsafe { addr.write_volatile(v) }
    };
    let flag = || -> Result<bool, (String, rustix::io::Errno)> {
        let pm = rustix::fs::open("/proc/self/pagemap", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| ("open(/proc/self/pagemap) failed".to_owned(), e))?;
        let mut entry = [0u8; 8];
        let off = (addr as usize / page * 8) as u64;
        match rustix::io::pread(pm.as_fd(), &mut entry, off) {
            Ok(8) => Ok(u64::from_ne_bytes(entry) & PM_SOFT_DIRTY != 0),
            Ok(_) => Err(("short read of /proc/self/pagemap".to_owned(), rustix::io::Errno::IO)),
            Err(e) => Err(("pread(/proc/self/pagemap) failed".to_owned(), e)),
        }
    };
    let clear = || -> Result<(), (String, rustix::io::Errno)> {
        let f = rustix::fs::open("/proc/self/clear_refs", OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| ("open(/proc/self/clear_refs) failed".to_owned(), e))?;
        rustix::io::write(&f, b"4").map(drop).map_err(|e| ("write of 4 to /proc/self/clear_refs failed".to_owned(), e))
    };
    write(1);
    let steps = (|| {
        clear()?;
        let after_clear = flag()?;
        write(2);
        Ok::<_, (String, rustix::io::Errno)>((after_clear, flag()?))
    })();
    match steps {
        Err((what, e)) => Probe::no(what, Some(e)),
        Ok((false, true)) => Probe::yes("clear_refs 4 clears pagemap bit 55 and a write sets it"),
        Ok((true, _)) => Probe::no("pagemap bit 55 stayed set after clear_refs 4", None),
        Ok((false, false)) => Probe::no(
            "pagemap soft-dirty bit 55 stayed clear after a write (kernel built without CONFIG_MEM_SOFT_DIRTY)",
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_is_available() {
        assert_eq!(memfd(), Probe::yes("memfd_create and F_SEAL_GROW|F_SEAL_SHRINK work"));
    }

    #[test]
    fn probes_are_consistent() {
        for p in [hugetlb_memfd(0x20_0000), hugetlb_memfd(0x4000_0000), soft_dirty()] {
            assert!(!p.detail.is_empty());
            assert!(!(p.available && p.errno.is_some()), "{p:?}");
        }
        assert!(!hugetlb_memfd(4096).available);
    }
}
