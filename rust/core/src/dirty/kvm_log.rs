//! The KVM dirty log of one memory slot: pages the guest wrote.
//!
//! The VMM creates the slot with `KVM_MEM_LOG_DIRTY_PAGES`; this module only
//! reads the log. Where `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` exists it is
//! enabled (with `KVM_DIRTY_LOG_INITIALLY_SET` when offered, as QEMU does), so
//! `KVM_GET_DIRTY_LOG` only reads the bitmap and `KVM_CLEAR_DIRTY_LOG`
//! re-protects exactly the pages reported; without it, `KVM_GET_DIRTY_LOG`
//! gets and clears in one call. The definitions below come from
//! `include/uapi/linux/kvm.h`; they are kept minimal and local on purpose.

use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::ioctl::{Opcode, opcode};

use super::{raw_ioctl, words_for};
use crate::error::{Errno, Error, Result};

const KVMIO: u8 = 0xAE;
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
pub const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
/// Manual protection: `KVM_GET_DIRTY_LOG` no longer clears.
pub const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1 << 0;
/// New logging slots start all dirty and unprotected.
pub const KVM_DIRTY_LOG_INITIALLY_SET: u64 = 1 << 1;

/// `struct kvm_dirty_log`.
#[repr(C)]
#[derive(Debug)]
struct KvmDirtyLogArg {
    slot: u32,
    padding: u32,
    bitmap: u64,
}

/// `struct kvm_clear_dirty_log`.
#[repr(C)]
#[derive(Debug)]
struct KvmClearDirtyLog {
    slot: u32,
    num_pages: u32,
    first_page: u64,
    bitmap: u64,
}

/// `struct kvm_enable_cap`.
#[repr(C)]
#[derive(Debug)]
struct KvmEnableCap {
    cap: u32,
    flags: u32,
    args: [u64; 4],
    pad: [u8; 64],
}

/// `KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)`.
pub const KVM_CHECK_EXTENSION: Opcode = opcode::none(KVMIO, 0x03);
/// `KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
pub const KVM_GET_DIRTY_LOG: Opcode = opcode::write::<KvmDirtyLogArg>(KVMIO, 0x42);
/// `KVM_ENABLE_CAP = _IOW(KVMIO, 0xa3, struct kvm_enable_cap)`.
pub const KVM_ENABLE_CAP: Opcode = opcode::write::<KvmEnableCap>(KVMIO, 0xa3);
/// `KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
pub const KVM_CLEAR_DIRTY_LOG: Opcode = opcode::read_write::<KvmClearDirtyLog>(KVMIO, 0xc0);

/// Reader of the dirty log of one KVM memory slot that maps a whole region.
#[derive(Debug)]
pub struct KvmDirtyLog {
    vm: OwnedFd,
    slot: u32,
    npages: usize,
    manual: bool,
    /// One spare word: KVM writes `ALIGN(slot pages, 64) / 8` bytes, and a slot
    /// of up to 63 pages more than the region cannot be told apart (see `start`).
    buf: Vec<u64>,
}

impl KvmDirtyLog {
    /// Track memory slot `slot` of the VM `vm_fd` (duplicated: the caller keeps
    /// its fd). The slot must map exactly `npages` host pages (the region).
    pub fn new(vm_fd: BorrowedFd<'_>, slot: u32, npages: usize) -> Result<Self> {
        let vm = rustix::io::fcntl_dupfd_cloexec(vm_fd, 0).map_err(|e| Error::os("dup(KVM VM fd)", e))?;
        // SAFETY: KVM_CHECK_EXTENSION takes the capability number as an integer;
        // on a non-KVM fd the ioctl fails with ENOTTY and touches nothing.
        let cap = unsafe { raw_ioctl(&vm, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as usize as *mut _) }
            .map_err(|e| Error::BadFd(format!("fd is not a KVM VM fd (KVM_CHECK_EXTENSION: {})", Errno::from(e))))?;
        let u32_pages = u32::try_from(npages).map_err(|_| Error::InvalidArgument(format!("{npages} pages is too many for KVM_CLEAR_DIRTY_LOG")))?;
        let this = Self { vm, slot, npages, manual: cap > 0, buf: vec![0; words_for(npages) + 1] };
        if this.manual {
            this.enable_manual(cap as u64 & (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET))?;
            this.check_slot_size(u32_pages)?;
        }
        Ok(this)
    }

    /// Whether manual protection (`KVM_CLEAR_DIRTY_LOG`) is in use.
    #[must_use]
    pub fn manual_protect(&self) -> bool {
        self.manual
    }

    fn enable_manual(&self, flags: u64) -> Result<()> {
        let mut cap = KvmEnableCap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags: 0, args: [flags, 0, 0, 0], pad: [0; 64] };
        // SAFETY: KVM_ENABLE_CAP reads one `struct kvm_enable_cap`, which `cap` is.
        unsafe { raw_ioctl(&self.vm, KVM_ENABLE_CAP, (&raw mut cap).cast()) }
            .map_err(|e| Error::os("KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)", e))?;
        Ok(())
    }

    /// `KVM_CLEAR_DIRTY_LOG` of `num_pages` pages from `first_page` with all bits set.
    fn clear(&self, first_page: u64, num_pages: u32, bitmap: *const u64) -> rustix::io::Result<i32> {
        let mut arg = KvmClearDirtyLog { slot: self.slot, num_pages, first_page, bitmap: bitmap as u64 };
        // SAFETY: KVM_CLEAR_DIRTY_LOG reads `arg` and `num_pages` bits from
        // `bitmap`, which every caller sizes for at least that many bits.
        unsafe { raw_ioctl(&self.vm, KVM_CLEAR_DIRTY_LOG, (&raw mut arg).cast()) }
    }

    /// KVM validates clear ranges against the slot's size; use that to refuse
    /// a slot smaller than the region, or 64+ pages larger (whose log would
    /// not fit our buffer). Clearing here is harmless: `start` discards the log.
    fn check_slot_size(&self, npages: u32) -> Result<()> {
        let ones = vec![u64::MAX; words_for(npages as usize) + 1];
        let misfit = |what: &str| {
            Error::InvalidArgument(format!(
                "KVM memory slot {} does not map exactly this region of {npages} pages ({what})",
                self.slot
            ))
        };
        match self.clear(0, npages, ones.as_ptr()) {
            Ok(_) => {}
            Err(rustix::io::Errno::NOENT) => return Err(self.no_log_error(libc::ENOENT)),
            Err(e) if e == rustix::io::Errno::INVAL => return Err(misfit("KVM_CLEAR_DIRTY_LOG over the region's pages: EINVAL")),
            Err(e) => return Err(Error::os(format!("KVM_CLEAR_DIRTY_LOG(slot {})", self.slot), e)),
        }
        if self.clear(u64::from(npages.next_multiple_of(64)), 64, ones.as_ptr()).is_ok() {
            return Err(misfit("it has 64 or more pages past the region"));
        }
        Ok(())
    }

    fn no_log_error(&self, errno: i32) -> Error {
        Error::Os {
            op: format!(
                "KVM dirty log of slot {}: no such slot, or it lacks KVM_MEM_LOG_DIRTY_PAGES, or the dirty ring is in use",
                self.slot
            ),
            errno: Errno(errno),
        }
    }

    /// Get (and clear) the pages the guest wrote since the last call, OR-ing
    /// them into `words`. Returns how many pages were dirty.
    pub fn sync_into(&mut self, words: &mut [u64]) -> Result<usize> {
        let mut arg = KvmDirtyLogArg { slot: self.slot, padding: 0, bitmap: self.buf.as_mut_ptr() as u64 };
        // SAFETY: KVM_GET_DIRTY_LOG reads `arg` and writes the slot's bitmap,
        // ALIGN(slot pages, 64) / 8 bytes, into `buf`; `new` checked that this
        // fits (`buf` has a spare word for the one case it cannot check).
        unsafe { raw_ioctl(&self.vm, KVM_GET_DIRTY_LOG, (&raw mut arg).cast()) }.map_err(|e| match e {
            rustix::io::Errno::NOENT | rustix::io::Errno::NXIO => self.no_log_error(e.raw_os_error()),
            e => Error::os(format!("KVM_GET_DIRTY_LOG(slot {})", self.slot), e),
        })?;
        let n = words_for(self.npages);
        if self.npages % 64 != 0 {
            self.buf[n - 1] &= (1u64 << (self.npages % 64)) - 1;
        }
        let mut count = 0;
        for (out, w) in words.iter_mut().zip(&self.buf[..n]) {
            *out |= w;
            count += w.count_ones() as usize;
        }
        if self.manual && count > 0 {
            self.clear(0, self.npages as u32, self.buf.as_ptr())
                .map_err(|e| Error::os(format!("KVM_CLEAR_DIRTY_LOG(slot {})", self.slot), e))?;
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes_and_ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(size_of::<KvmDirtyLogArg>(), 16);
        assert_eq!(size_of::<KvmClearDirtyLog>(), 24);
        assert_eq!(size_of::<KvmEnableCap>(), 104);
        assert_eq!(KVM_CHECK_EXTENSION, 0xAE03);
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_AE42);
        assert_eq!(KVM_ENABLE_CAP, 0x4068_AEA3);
        assert_eq!(KVM_CLEAR_DIRTY_LOG, 0xC018_AEC0);
    }

    #[test]
    fn a_non_kvm_fd_is_refused() {
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        let e = KvmDirtyLog::new(std::os::fd::AsFd::as_fd(&f), 0, 16).unwrap_err();
        assert!(matches!(e, Error::BadFd(_)), "{e}");
    }
}
