//! The guest-RAM layout shared by the reference VMM's guests (KVM and native
//! threads), the observer and the demo. All values are guest-physical offsets
//! into the one guest-RAM region; all integers are little-endian.

/// u64 heartbeat, incremented by the running guest at least every 10 µs.
pub const HEARTBEAT: usize = 0x1000;
/// u64 count of completed passes over the hot working set.
pub const HOT_PASSES: usize = 0x1008;
/// Parameter block written by the VMM before the guest first runs.
pub const PARAMS: usize = 0x2000;
/// Within [`PARAMS`]: u64 offset of the hot working set.
pub const PARAM_HOT_START: usize = PARAMS;
/// Within [`PARAMS`]: u64 length of the hot working set in bytes.
pub const PARAM_HOT_LEN: usize = PARAMS + 8;
/// Within [`PARAMS`]: u64 total guest RAM size in bytes.
pub const PARAM_RAM_SIZE: usize = PARAMS + 16;
/// First byte of the hot working set the guest keeps writing (1 MiB).
pub const HOT_START: usize = 0x10_0000;
/// Everything below this offset belongs to the guest's own bookkeeping
/// (heartbeat, parameters, code, stack, page tables): 1 MiB.
pub const RESERVED_END: usize = HOT_START;
