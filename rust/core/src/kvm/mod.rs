//! KVM for the reference VMM: a VM with memory slots over memfd mappings
//! ([`vm`]), one vCPU run in a native thread with pause/resume and its state
//! as bytes ([`vcpu`], [`state`]), and the tiny 64-bit guest we boot ([`guest`]).
//!
//! No kvm-ioctls crate: the few ioctls and structs we need are in `abi.rs`.

mod abi;
pub mod guest;
pub mod state;
pub mod vcpu;
pub mod vm;

use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{Mode, OFlags};

use crate::error::{Error, Result};

pub use vcpu::Vcpu;
pub use vm::Vm;

/// Open `/dev/kvm` and check the API version: the system fd every VM comes from.
pub(crate) fn open_kvm() -> Result<OwnedFd> {
    const FEATURE: &str = "KVM (/dev/kvm)";
    let fd = rustix::fs::open("/dev/kvm", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| Error::Unsupported { feature: FEATURE, errno: e.into() })?;
    let version = abi::ioctl_int(fd.as_fd(), abi::KVM_GET_API_VERSION, 0)
        .map_err(|e| Error::Unsupported { feature: FEATURE, errno: e.into() })?;
    if version != abi::KVM_API_VERSION {
        return Err(Error::Unsupported { feature: FEATURE, errno: crate::Errno(libc::EPROTO) });
    }
    Ok(fd)
}

/// What this machine's KVM offers; everything `cprfast info` reports about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    /// A VM could be created.
    pub available: bool,
    /// One line saying what works or what failed (with the errno text).
    pub detail: String,
    /// The errno of the failure, if any.
    pub errno: Option<i32>,
    /// `KVM_GET_API_VERSION` (12 on every kernel since 2.6.22).
    pub api_version: i32,
    /// `KVM_CAP_NR_MEMSLOTS`: memory slots per VM.
    pub max_memslots: i32,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: the supported flag bits (0 = absent).
    pub manual_dirty_log_protect2: i32,
    /// `KVM_CAP_DIRTY_LOG_RING`: the largest dirty ring in bytes (0 = absent).
    pub dirty_log_ring: i32,
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`: same, with acquire/release ordering.
    pub dirty_log_ring_acq_rel: i32,
    /// The loaded KVM vendor module (`kvm_intel`, `kvm_amd`, `kvm_pvm`), if known.
    pub module: Option<String>,
}

/// Probe `/dev/kvm`: open it, read the capabilities we use, and create (and
/// drop) one VM to prove it is usable. Never fails: failures are in the result.
#[must_use]
pub fn probe() -> Probe {
    let module = ["kvm_pvm", "kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| std::path::Path::new("/sys/module").join(m).exists())
        .map(str::to_owned);
    let mut p = Probe { module, ..Probe::default() };
    let kvm = match open_kvm() {
        Ok(fd) => fd,
        Err(e) => {
            p.errno = e.errno();
            p.detail = e.to_string();
            return p;
        }
    };
    p.api_version = abi::KVM_API_VERSION;
    let cap = |c| abi::ioctl_int(kvm.as_fd(), abi::KVM_CHECK_EXTENSION, c).unwrap_or(0);
    p.max_memslots = cap(abi::KVM_CAP_NR_MEMSLOTS);
    p.manual_dirty_log_protect2 = cap(abi::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
    p.dirty_log_ring = cap(abi::KVM_CAP_DIRTY_LOG_RING);
    p.dirty_log_ring_acq_rel = cap(abi::KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
    match vm::create_vm_fd(kvm.as_fd()) {
        Ok(_vm) => {
            p.available = true;
            p.detail = format!(
                "KVM API {} via {}, {} memory slots",
                p.api_version,
                p.module.as_deref().unwrap_or("unknown module"),
                p.max_memslots
            );
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
    fn probe_reports_consistently() {
        let p = probe();
        if p.available {
            assert_eq!(p.api_version, 12);
            assert!(p.max_memslots > 0);
            assert!(p.errno.is_none());
        } else {
            assert!(p.errno.is_some(), "{p:?}");
            assert!(!p.detail.is_empty());
        }
    }
}
