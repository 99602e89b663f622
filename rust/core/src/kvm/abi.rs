//! The slice of the x86-64 KVM ABI we use: ioctl numbers, structs, caps and
//! exit reasons, as in `<linux/kvm.h>` (sizes checked by the unit tests).

use std::ffi::c_void;
use std::os::fd::BorrowedFd;

use rustix::ioctl::{Ioctl, IoctlOutput, Opcode, opcode};

const KVMIO: u8 = 0xAE;

/// The one `KVM_GET_API_VERSION` value the ABI has ever had.
pub const KVM_API_VERSION: i32 = 12;

pub const KVM_GET_API_VERSION: Opcode = opcode::none(KVMIO, 0x00);
pub const KVM_CREATE_VM: Opcode = opcode::none(KVMIO, 0x01);
pub const KVM_GET_MSR_INDEX_LIST: Opcode = opcode::read_write::<[u32; 1]>(KVMIO, 0x02);
pub const KVM_CHECK_EXTENSION: Opcode = opcode::none(KVMIO, 0x03);
pub const KVM_GET_VCPU_MMAP_SIZE: Opcode = opcode::none(KVMIO, 0x04);
pub const KVM_GET_SUPPORTED_CPUID: Opcode = opcode::read_write::<[u32; 2]>(KVMIO, 0x05);
pub const KVM_CREATE_VCPU: Opcode = opcode::none(KVMIO, 0x41);
pub const KVM_SET_USER_MEMORY_REGION: Opcode = opcode::write::<UserMemoryRegion>(KVMIO, 0x46);
pub const KVM_RUN: Opcode = opcode::none(KVMIO, 0x80);
pub const KVM_GET_REGS: Opcode = opcode::read::<Regs>(KVMIO, 0x81);
pub const KVM_SET_REGS: Opcode = opcode::write::<Regs>(KVMIO, 0x82);
pub const KVM_GET_SREGS: Opcode = opcode::read::<Sregs>(KVMIO, 0x83);
pub const KVM_SET_SREGS: Opcode = opcode::write::<Sregs>(KVMIO, 0x84);
pub const KVM_GET_MSRS: Opcode = opcode::read_write::<[u32; 2]>(KVMIO, 0x88);
pub const KVM_SET_MSRS: Opcode = opcode::write::<[u32; 2]>(KVMIO, 0x89);
pub const KVM_GET_FPU: Opcode = opcode::read::<Fpu>(KVMIO, 0x8c);
pub const KVM_SET_FPU: Opcode = opcode::write::<Fpu>(KVMIO, 0x8d);
pub const KVM_SET_CPUID2: Opcode = opcode::write::<[u32; 2]>(KVMIO, 0x90);
pub const KVM_GET_VCPU_EVENTS: Opcode = opcode::read::<VcpuEvents>(KVMIO, 0x9f);
pub const KVM_SET_VCPU_EVENTS: Opcode = opcode::write::<VcpuEvents>(KVMIO, 0xa0);

pub const KVM_CAP_NR_MEMSLOTS: usize = 10;
pub const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: usize = 168;
pub const KVM_CAP_DIRTY_LOG_RING: usize = 192;
pub const KVM_CAP_DIRTY_LOG_RING_ACQ_REL: usize = 223;

pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1;

pub const KVM_EXIT_IO: u32 = 2;
pub const KVM_EXIT_HLT: u32 = 5;
pub const KVM_EXIT_MMIO: u32 = 6;
pub const KVM_EXIT_SHUTDOWN: u32 = 8;
pub const KVM_EXIT_FAIL_ENTRY: u32 = 9;
pub const KVM_EXIT_INTR: u32 = 10;
pub const KVM_EXIT_INTERNAL_ERROR: u32 = 17;
pub const KVM_EXIT_SYSTEM_EVENT: u32 = 24;

/// `struct kvm_userspace_memory_region`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UserMemoryRegion {
    pub slot: u32,
    pub flags: u32,
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
}

/// `struct kvm_regs`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// `struct kvm_segment`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
    pub padding: u8,
}

/// `struct kvm_dtable`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Dtable {
    pub base: u64,
    pub limit: u16,
    pub padding: [u16; 3],
}

/// `struct kvm_sregs`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: Dtable,
    pub idt: Dtable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub interrupt_bitmap: [u64; 4],
}

/// `struct kvm_fpu`: x87 and SSE state.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Fpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub pad1: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
    pub pad2: u32,
}

/// `struct kvm_vcpu_events`, kept opaque: we only ever round-trip it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VcpuEvents(pub [u8; 64]);

/// `struct kvm_msr_entry`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct MsrEntry {
    pub index: u32,
    pub reserved: u32,
    pub data: u64,
}

/// `struct kvm_msrs` with room for `N` entries.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Msrs<const N: usize> {
    pub nmsrs: u32,
    pub pad: u32,
    pub entries: [MsrEntry; N],
}

/// `struct kvm_cpuid_entry2`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
    pub padding: [u32; 3],
}

/// `struct kvm_cpuid2` with room for [`MAX_CPUID_ENTRIES`] entries.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Cpuid2 {
    pub nent: u32,
    pub padding: u32,
    pub entries: [CpuidEntry; MAX_CPUID_ENTRIES],
}

/// Room for the supported-CPUID list (KVM's own limit is 256).
pub const MAX_CPUID_ENTRIES: usize = 256;

/// Offsets into the `struct kvm_run` page shared with the kernel.
pub mod run {
    /// `__u8 immediate_exit`.
    pub const IMMEDIATE_EXIT: usize = 1;
    /// `__u32 exit_reason`.
    pub const EXIT_REASON: usize = 8;
    /// The exit-specific union.
    pub const UNION: usize = 32;
}

/// An ioctl whose argument is a raw pointer (or integer) and whose result is
/// the syscall's return value.
struct Raw {
    op: Opcode,
    arg: *mut c_void,
}

// SAFETY: `ioctl` below is unsafe and its callers guarantee that `op` and the
// pointed-to argument match what the KVM driver expects; the output is the
// plain integer return value.
unsafe impl Ioctl for Raw {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        self.op
    }

    fn as_ptr(&mut self) -> *mut c_void {
        self.arg
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// Issue a KVM ioctl and return its (non-negative) result.
///
/// # Safety
/// `arg` must be what `op` expects: a pointer to a live, correctly sized and
/// aligned value of the ioctl's argument type, or an integer for `_IO` ioctls.
pub unsafe fn ioctl(fd: BorrowedFd<'_>, op: Opcode, arg: *mut c_void) -> rustix::io::Result<IoctlOutput> {
    // SAFETY: forwarded from the caller's contract.
    unsafe { rustix::ioctl::ioctl(fd, Raw { op, arg }) }
}

/// Issue an `_IO` ioctl with an integer argument.
pub fn ioctl_int(fd: BorrowedFd<'_>, op: Opcode, arg: usize) -> rustix::io::Result<IoctlOutput> {
    // SAFETY: every `_IO` KVM ioctl we call (CREATE_VM, CHECK_EXTENSION,
    // GET_VCPU_MMAP_SIZE, CREATE_VCPU, RUN, GET_API_VERSION) takes an integer, not
    // a pointer, so no memory is read or written through `arg`.
    unsafe { ioctl(fd, op, arg as *mut c_void) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn sizes_and_numbers_match_linux_kvm_h() {
        assert_eq!(size_of::<UserMemoryRegion>(), 32);
        assert_eq!(size_of::<Regs>(), 144);
        assert_eq!(size_of::<Sregs>(), 312);
        assert_eq!(size_of::<Fpu>(), 416);
        assert_eq!(size_of::<VcpuEvents>(), 64);
        assert_eq!(size_of::<MsrEntry>(), 16);
        assert_eq!(size_of::<CpuidEntry>(), 40);
        // Values printed by a C program including <linux/kvm.h>.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_SET_SREGS, 0x4138_ae84);
        assert_eq!(KVM_GET_FPU, 0x81a0_ae8c);
        assert_eq!(KVM_GET_VCPU_EVENTS, 0x8040_ae9f);
        assert_eq!(KVM_SET_VCPU_EVENTS, 0x4040_aea0);
        assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
        assert_eq!(KVM_SET_MSRS, 0x4008_ae89);
        assert_eq!(KVM_SET_CPUID2, 0x4008_ae90);
        assert_eq!(KVM_GET_SUPPORTED_CPUID, 0xc008_ae05);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(KVM_GET_MSR_INDEX_LIST, 0xc004_ae02);
    }
}
