//! A vCPU's architectural state as bytes, to carry from one VMM process to
//! the next (or from one VM to another in the same process).
//!
//! Format, version 1, all little-endian:
//!
//! ```text
//! 0   magic      b"CPRVCPU\0"
//! 8   version    u32 = 1
//! 12  length     u32   bytes of payload after this 24-byte header
//! 16  checksum   u64   FNV-1a 64 of the payload
//! 24  payload:   kvm_regs (144) | kvm_sregs (312) | kvm_fpu (416)
//!                | kvm_vcpu_events (64) | nmsrs u32 | pad u32 | nmsrs x kvm_msr_entry (16)
//! ```
//!
//! FPU means x87 + SSE (`KVM_GET_FPU`): our guest never sets CR4.OSXSAVE, so
//! no XSAVE component beyond those can hold state. EFER, CR0/3/4 and the
//! segment bases are in `kvm_sregs`. The MSRs are [`SAVED_MSRS`] as far as
//! KVM reports them in `KVM_GET_MSR_INDEX_LIST`.

use std::mem::size_of;

use super::abi::{Fpu, MsrEntry, Regs, Sregs, VcpuEvents};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"CPRVCPU\0";
/// The state format version this build writes and reads.
pub const VERSION: u32 = 1;
const HEADER: usize = 24;
const FIXED: usize = size_of::<Regs>() + size_of::<Sregs>() + size_of::<Fpu>() + size_of::<VcpuEvents>() + 8;

/// MSRs saved besides those in `kvm_sregs`: the time-stamp counter (so guest
/// time continues where it stopped), the page-attribute table (memory types
/// of the identity map), and the long-mode system-call MSRs a 64-bit kernel
/// sets once at boot (STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE).
pub const SAVED_MSRS: [u32; 7] = [0x10, 0x277, 0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084, 0xC000_0102];

/// Upper bound on MSRs in a state blob (refuses absurd counts before allocating).
pub(crate) const MAX_MSRS: usize = 64;

/// Types that are plain bytes: `repr(C)`, no implicit padding, every bit pattern valid.
///
/// # Safety
/// Implement only for such types.
unsafe trait Pod: Copy {}
// SAFETY: all five are `repr(C)` integer aggregates with explicit padding fields.
unsafe impl Pod for Regs {}
// SAFETY: as above.
unsafe impl Pod for Sregs {}
// SAFETY: as above.
unsafe impl Pod for Fpu {}
// SAFETY: as above (a byte array).
unsafe impl Pod for VcpuEvents {}
// SAFETY: as above.
unsafe impl Pod for MsrEntry {}

fn put<T: Pod>(out: &mut Vec<u8>, v: &T) {
    // SAFETY: `T: Pod` has no padding, so all `size_of::<T>()` bytes are initialized;
    // `v` is an ordinary Rust value, not guest memory.
    let bytes = unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) };
    out.extend_from_slice(bytes);
}

/// Read a `T` at `*pos` and advance; the caller checked the length.
fn take<T: Pod>(b: &[u8], pos: &mut usize) -> T {
    let bytes = &b[*pos..*pos + size_of::<T>()];
    *pos += size_of::<T>();
    // SAFETY: `bytes` holds exactly `size_of::<T>()` bytes and every bit pattern is a valid `T: Pod`.
    unsafe { bytes.as_ptr().cast::<T>().read_unaligned() }
}

fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Everything `KVM_GET_*` told us about one paused vCPU.
#[derive(Debug, Clone)]
pub struct VcpuState {
    pub(crate) regs: Regs,
    pub(crate) sregs: Sregs,
    pub(crate) fpu: Fpu,
    pub(crate) events: VcpuEvents,
    pub(crate) msrs: Vec<MsrEntry>,
}

impl VcpuState {
    /// Instruction pointer, for diagnostics.
    #[must_use]
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }

    /// Serialize (header, payload, checksum).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::with_capacity(FIXED + self.msrs.len() * size_of::<MsrEntry>());
        put(&mut payload, &self.regs);
        put(&mut payload, &self.sregs);
        put(&mut payload, &self.fpu);
        put(&mut payload, &self.events);
        payload.extend_from_slice(&(self.msrs.len() as u32).to_le_bytes());
        payload.extend_from_slice(&0u32.to_le_bytes());
        for m in &self.msrs {
            put(&mut payload, m);
        }
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&fnv1a64(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Parse and verify bytes written by [`encode`](Self::encode).
    pub fn decode(b: &[u8]) -> Result<Self> {
        let corrupt = |what: String| Error::Corrupt(format!("vCPU state: {what}"));
        if b.len() < HEADER || &b[..8] != MAGIC {
            return Err(corrupt("bad magic (not a cprfast vCPU state)".into()));
        }
        let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let version = word(8);
        if version != VERSION {
            return Err(corrupt(format!("unsupported version {version} (this build reads {VERSION})")));
        }
        let len = word(12) as usize;
        if b.len() != HEADER + len {
            return Err(corrupt(format!("{} bytes of payload, header says {len}", b.len() - HEADER)));
        }
        let payload = &b[HEADER..];
        let sum = u64::from_le_bytes(b[16..24].try_into().unwrap_or_default());
        if fnv1a64(payload) != sum {
            return Err(corrupt("checksum mismatch".into()));
        }
        if len < FIXED {
            return Err(corrupt(format!("payload of {len} bytes is shorter than the fixed part ({FIXED})")));
        }
        let mut pos = 0;
        let regs = take(payload, &mut pos);
        let sregs = take(payload, &mut pos);
        let fpu = take(payload, &mut pos);
        let events = take(payload, &mut pos);
        let nmsrs = u32::from_le_bytes(payload[pos..pos + 4].try_into().unwrap_or_default()) as usize;
        pos += 8;
        if nmsrs > MAX_MSRS || len != FIXED + nmsrs * size_of::<MsrEntry>() {
            return Err(corrupt(format!("{nmsrs} MSRs do not fit a payload of {len} bytes")));
        }
        let msrs = (0..nmsrs).map(|_| take(payload, &mut pos)).collect();
        Ok(Self { regs, sregs, fpu, events, msrs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        VcpuState {
            regs: Regs { rip: 0x4021, r11: 0x10_0000, ..Regs::default() },
            sregs: Sregs::default(),
            fpu: Fpu {
                fpr: [[0; 16]; 8],
                fcw: 0x37f,
                fsw: 0,
                ftwx: 0,
                pad1: 0,
                last_opcode: 0,
                last_ip: 0,
                last_dp: 0,
                xmm: [[7; 16]; 16],
                mxcsr: 0x1f80,
                pad2: 0,
            },
            events: VcpuEvents([0; 64]),
            msrs: vec![MsrEntry { index: 0x10, reserved: 0, data: 12345 }],
        }
    }

    #[test]
    fn round_trip() {
        let b = sample().encode();
        let s = VcpuState::decode(&b).unwrap();
        assert_eq!(s.rip(), 0x4021);
        assert_eq!(s.regs.r11, 0x10_0000);
        assert_eq!(s.fpu.mxcsr, 0x1f80);
        assert_eq!(s.msrs[0].data, 12345);
        assert_eq!(s.encode(), b);
    }

    #[test]
    fn rejects_corruption_of_every_kind() {
        let b = sample().encode();
        let err = |b: &[u8]| VcpuState::decode(b).unwrap_err().to_string();
        assert!(err(&b[..10]).contains("magic"));
        let mut v = b.clone();
        v[8] = 9;
        assert!(err(&v).contains("version 9"));
        assert!(err(&b[..b.len() - 1]).contains("header says"));
        let mut v = b.clone();
        v[HEADER + 5] ^= 1;
        assert!(err(&v).contains("checksum"));
        // A consistent header and checksum around an impossible MSR count.
        let mut payload = b[HEADER..].to_vec();
        payload[FIXED - 8] = 200;
        let mut v = b[..HEADER].to_vec();
        v[16..24].copy_from_slice(&fnv1a64(&payload).to_le_bytes());
        v.extend_from_slice(&payload);
        assert!(err(&v).contains("200 MSRs"));
    }
}
