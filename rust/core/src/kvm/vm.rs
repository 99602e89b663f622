//! A KVM VM: the VM fd, its memory slots over memfd mappings, and what the
//! host supports (CPUID, MSRs) for the vCPUs it creates.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::abi;
use crate::error::{Error, Result};
use crate::memfd::Mapping;

/// One registered memory slot; holding the `Arc` keeps its pages mapped for KVM.
#[derive(Debug)]
struct Slot {
    mapping: Arc<Mapping>,
    guest_addr: u64,
    flags: u32,
}

/// A KVM virtual machine.
#[derive(Debug)]
pub struct Vm {
    fd: OwnedFd,
    /// Host CPUID as KVM supports it, handed to every vCPU.
    pub(crate) cpuid: Box<abi::Cpuid2>,
    /// MSR indices KVM can save and restore (`KVM_GET_MSR_INDEX_LIST`).
    pub(crate) msr_index: Vec<u32>,
    /// Size of each vCPU's shared `kvm_run` area.
    pub(crate) run_size: usize,
    slots: Mutex<BTreeMap<u32, Slot>>,
}

/// `KVM_CREATE_VM` on an open `/dev/kvm`.
pub(crate) fn create_vm_fd(kvm: BorrowedFd<'_>) -> Result<OwnedFd> {
    let fd = abi::ioctl_int(kvm, abi::KVM_CREATE_VM, 0).map_err(|e| Error::os("KVM_CREATE_VM", e))?;
    // SAFETY: KVM_CREATE_VM returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Vm {
    /// Open `/dev/kvm` and create a VM with no memory and no vCPUs.
    pub fn create() -> Result<Self> {
        let kvm = super::open_kvm()?;
        let fd = create_vm_fd(kvm.as_fd())?;
        let run_size = abi::ioctl_int(kvm.as_fd(), abi::KVM_GET_VCPU_MMAP_SIZE, 0)
            .map_err(|e| Error::os("KVM_GET_VCPU_MMAP_SIZE", e))?;
        Ok(Self {
            fd,
            cpuid: supported_cpuid(kvm.as_fd())?,
            msr_index: msr_index_list(kvm.as_fd())?,
            run_size: run_size as usize,
            slots: Mutex::new(BTreeMap::new()),
        })
    }

    /// The VM fd (for `KVM_GET_DIRTY_LOG` and friends).
    #[must_use]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Register `mapping` as memory slot `slot` at `guest_addr`, replacing any
    /// slot with that number, optionally with dirty logging. Returns how long
    /// `KVM_SET_USER_MEMORY_REGION` took (it grows with the slot's size).
    pub fn set_memory(&self, slot: u32, guest_addr: u64, mapping: Arc<Mapping>, dirty_log: bool) -> Result<Duration> {
        if guest_addr % rustix::param::page_size() as u64 != 0 {
            return Err(Error::InvalidArgument(format!("guest address {guest_addr:#x} is not page-aligned")));
        }
        let flags = if dirty_log { abi::KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let took = self.register(slot, guest_addr, &mapping, flags)?;
        // The old mapping (if any) drops here, after KVM stopped using it.
        slots.insert(slot, Slot { mapping, guest_addr, flags });
        Ok(took)
    }

    /// Turn dirty logging of an existing slot on or off (re-registers it).
    pub fn set_dirty_log(&self, slot: u32, on: bool) -> Result<Duration> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let s = slots
            .get_mut(&slot)
            .ok_or_else(|| Error::InvalidArgument(format!("memory slot {slot} is not registered")))?;
        let flags = if on { s.flags | abi::KVM_MEM_LOG_DIRTY_PAGES } else { s.flags & !abi::KVM_MEM_LOG_DIRTY_PAGES };
        let took = self.register(slot, s.guest_addr, &s.mapping, flags)?;
        s.flags = flags;
        Ok(took)
    }

    fn register(&self, slot: u32, guest_addr: u64, mapping: &Mapping, flags: u32) -> Result<Duration> {
        let mut region = abi::UserMemoryRegion {
            slot,
            flags,
            guest_phys_addr: guest_addr,
            memory_size: mapping.len() as u64,
            userspace_addr: mapping.as_ptr() as u64,
        };
        let t0 = Instant::now();
        // SAFETY: KVM_SET_USER_MEMORY_REGION reads one `kvm_userspace_memory_region`;
        // the userspace range is a live mapping the caller keeps in `slots`
        // (the `Arc`) for as long as the slot is registered.
        unsafe { abi::ioctl(self.fd(), abi::KVM_SET_USER_MEMORY_REGION, (&raw mut region).cast::<c_void>()) }
            .map_err(|e| Error::os(format!("KVM_SET_USER_MEMORY_REGION(slot {slot}, {} bytes)", mapping.len()), e))?;
        Ok(t0.elapsed())
    }

    /// The mapping registered at guest-physical address 0: the guest's RAM.
    pub fn ram(&self) -> Result<Arc<Mapping>> {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots
            .values()
            .find(|s| s.guest_addr == 0)
            .map(|s| Arc::clone(&s.mapping))
            .ok_or_else(|| Error::InvalidArgument("no memory slot at guest address 0: call set_memory first".into()))
    }

    /// Whether the vCPUs may use 1 GiB pages (CPUID 0x8000_0001 EDX.Page1GB).
    #[must_use]
    pub fn has_1g_pages(&self) -> bool {
        self.cpuid.entries[..self.cpuid.nent as usize]
            .iter()
            .any(|e| e.function == 0x8000_0001 && e.edx & (1 << 26) != 0)
    }
}

fn supported_cpuid(kvm: BorrowedFd<'_>) -> Result<Box<abi::Cpuid2>> {
    let mut cpuid = Box::new(abi::Cpuid2 {
        nent: abi::MAX_CPUID_ENTRIES as u32,
        padding: 0,
        entries: [abi::CpuidEntry::default(); abi::MAX_CPUID_ENTRIES],
    });
    // SAFETY: the buffer is a `kvm_cpuid2` header followed by room for `nent`
    // entries; KVM writes at most `nent` entries and updates `nent`.
    unsafe { abi::ioctl(kvm, abi::KVM_GET_SUPPORTED_CPUID, (&raw mut *cpuid).cast::<c_void>()) }
        .map_err(|e| Error::os("KVM_GET_SUPPORTED_CPUID", e))?;
    Ok(cpuid)
}

fn msr_index_list(kvm: BorrowedFd<'_>) -> Result<Vec<u32>> {
    const ROOM: usize = 1024;
    let mut buf = vec![0u32; 1 + ROOM];
    buf[0] = ROOM as u32;
    // SAFETY: `struct kvm_msr_list` is a u32 count followed by that many u32
    // indices; the buffer has room for `ROOM` of them and KVM writes no more.
    unsafe { abi::ioctl(kvm, abi::KVM_GET_MSR_INDEX_LIST, buf.as_mut_ptr().cast::<c_void>()) }
        .map_err(|e| Error::os("KVM_GET_MSR_INDEX_LIST", e))?;
    let n = (buf[0] as usize).min(ROOM);
    Ok(buf[1..=n].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memfd::{CreateOptions, Region};

    fn vm() -> Option<Vm> {
        match Vm::create() {
            Ok(vm) => Some(vm),
            Err(e) => {
                eprintln!("skipping: {e}");
                None
            }
        }
    }

    #[test]
    fn slots_register_and_toggle_dirty_log() {
        let Some(vm) = vm() else { return };
        let r = Region::create("kvm-slot", 1 << 21, &CreateOptions::default()).unwrap();
        assert!(vm.ram().is_err());
        vm.set_memory(0, 0, r.mapping(), false).unwrap();
        vm.set_dirty_log(0, true).unwrap();
        vm.set_dirty_log(0, false).unwrap();
        assert_eq!(vm.ram().unwrap().len(), 1 << 21);
        assert!(vm.set_dirty_log(7, true).is_err());
        assert!(vm.set_memory(1, 123, r.mapping(), false).is_err());
        // Overlapping guest ranges are refused by KVM, with the errno kept.
        assert_eq!(vm.set_memory(1, 0, r.mapping(), false).unwrap_err().errno(), Some(libc::EEXIST));
        assert!(!vm.msr_index.is_empty());
    }
}
