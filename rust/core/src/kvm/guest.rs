//! The tiny 64-bit guest the reference VMM boots: its machine code
//! (`guest.S`, assembled into `guest.bin`), the page tables, GDT and
//! parameters the VMM writes into guest RAM, and the long-mode register
//! state the vCPU starts in.
//!
//! Guest-RAM use below [`layout::RESERVED_END`] (1 MiB):
//!
//! | offset    | what                                                 |
//! |-----------|------------------------------------------------------|
//! | 0x1000    | heartbeat, hot passes ([`layout`])                   |
//! | 0x2000    | parameters: hot start, hot length, RAM size          |
//! | 0x3000    | GDT: null, 64-bit user code (0x0b), user data (0x13) |
//! | 0x4000    | code (`guest.bin`)                                   |
//! | 0x10000   | PML4, then the PDPT, then (2 MiB pages only) one PD per GiB |
//!
//! The identity map covers all of RAM, rounded up to whole GiB, with 1 GiB
//! pages when the host CPUID offers them (pdpe1gb), else 2 MiB pages.
//!
//! The guest runs in long mode at CPL 3 (user pages, DPL-3 segments): under
//! PVM (`kvm_pvm`, nested), guest supervisor code outside PVM's own address
//! range is not run natively — measured here, a two-instruction loop ran
//! 2.9e5 iterations/s at CPL 0 and 1.1e9 at CPL 3. Our guest needs no
//! privilege, and on hardware-assisted KVM the CPL makes no difference.

use crate::error::{Error, Result};
use crate::layout;
use crate::memfd::Mapping;

use super::abi::{Regs, Segment, Sregs};

/// The guest's machine code, assembled from `guest.S`.
pub const CODE: &[u8] = include_bytes!("guest.bin");
/// The guest's assembly source.
pub const SOURCE: &str = include_str!("guest.S");

const GDT: usize = 0x3000;
const CODE_ADDR: usize = 0x4000;
const PML4: usize = 0x1_0000;
const PDPT: usize = PML4 + 0x1000;
const PD: usize = PDPT + 0x1000;
const GIB: usize = 1 << 30;

/// Largest guest RAM the page tables can map (64 PDs of 2 MiB pages fit below 1 MiB).
pub const MAX_RAM: usize = 64 * GIB;

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 2;
const PTE_USER: u64 = 4;
const PTE_HUGE: u64 = 1 << 7;

fn check(ram: usize, hot_start: usize, hot_len: usize) -> Result<()> {
    let page = 4096;
    if !(layout::RESERVED_END + page..=MAX_RAM).contains(&ram) {
        return Err(Error::InvalidArgument(format!(
            "guest RAM of {ram:#x} bytes: the KVM guest needs more than {:#x} and at most {MAX_RAM:#x}",
            layout::RESERVED_END
        )));
    }
    let fits = hot_start.checked_add(hot_len).is_some_and(|end| end <= ram);
    if hot_start % page != 0 || hot_len % page != 0 || (hot_len > 0 && hot_start < layout::RESERVED_END) || !fits {
        return Err(Error::InvalidArgument(format!(
            "hot set {hot_start:#x}+{hot_len:#x} must be whole pages in [{:#x}, {ram:#x})",
            layout::RESERVED_END
        )));
    }
    Ok(())
}

/// The identity map of `ram` bytes as (offset, bytes) to write: PML4, PDPT and PDs.
fn page_tables(ram: usize, gib_pages: bool) -> Vec<u8> {
    let gibs = ram.div_ceil(GIB);
    let pds = if gib_pages { 0 } else { gibs };
    let mut t = vec![0u64; 512 * (2 + pds)];
    t[0] = PDPT as u64 | PTE_PRESENT | PTE_WRITE | PTE_USER;
    for g in 0..gibs {
        t[512 + g] = if gib_pages {
            (g * GIB) as u64 | PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_HUGE
        } else {
            (PD + g * 0x1000) as u64 | PTE_PRESENT | PTE_WRITE | PTE_USER
        };
    }
    for i in 0..pds * 512 {
        t[1024 + i] = (i << 21) as u64 | PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_HUGE;
    }
    t.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Write a fresh guest into `ram`: heartbeat and passes zeroed, parameters,
/// GDT, code and page tables.
pub fn write_image(ram: &Mapping, hot_start: usize, hot_len: usize, gib_pages: bool) -> Result<()> {
    check(ram.len(), hot_start, hot_len)?;
    ram.write(layout::HEARTBEAT, &[0; 16])?;
    let params: Vec<u8> =
        [hot_start, hot_len, ram.len()].iter().flat_map(|v| (*v as u64).to_le_bytes()).collect();
    ram.write(layout::PARAM_HOT_START, &params)?;
    let gdt: Vec<u8> =
        [0u64, 0x00af_fb00_0000_ffff, 0x00cf_f300_0000_ffff].iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write(GDT, &gdt)?;
    ram.write(CODE_ADDR, CODE)?;
    ram.write(PML4, &page_tables(ram.len(), gib_pages))
}

/// Registers to start the guest with: at its first instruction, interrupts off.
pub(crate) fn boot_regs() -> Regs {
    Regs { rip: CODE_ADDR as u64, rflags: 0x2, ..Regs::default() }
}

/// Guest address of the read-only warm-up routine (`warm:` in `guest.S`, at `.org 0x80`).
const WARM_ADDR: usize = CODE_ADDR + 0x80;

/// Registers for a warm-up run ([`super::Vcpu::warm_up`]): at `warm:`, interrupts off.
pub(crate) fn warm_regs() -> Regs {
    Regs { rip: WARM_ADDR as u64, ..boot_regs() }
}

/// Whether `ram` holds this build's guest code, so its `warm:` routine is where
/// [`warm_regs`] points (a guest booted by an older build may not have one).
pub fn has_current_code(ram: &Mapping) -> Result<bool> {
    let mut code = vec![0u8; CODE.len()];
    ram.read(CODE_ADDR, &mut code)?;
    Ok(code == CODE)
}

/// Long-mode special registers, derived from the vCPU's reset state: paging
/// on with our PML4, flat 64-bit user-mode code and data segments from our GDT.
pub(crate) fn boot_sregs(mut s: Sregs) -> Sregs {
    let code = Segment { base: 0, limit: 0xffff_ffff, selector: 0x0b, type_: 0xb, present: 1, dpl: 3, s: 1, l: 1, g: 1, ..Segment::default() };
    let data = Segment { selector: 0x13, type_: 0x3, l: 0, db: 1, ..code };
    s.cs = code;
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.gdt.base = GDT as u64;
    s.gdt.limit = 3 * 8 - 1;
    s.cr3 = PML4 as u64;
    s.cr4 = 1 << 5; // PAE
    s.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
    s.efer = 0x500; // LMA | LME
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memfd::{CreateOptions, Region};

    #[test]
    fn source_constants_match_layout() {
        for (name, value) in [
            ("HEARTBEAT", layout::HEARTBEAT),
            ("HOT_PASSES", layout::HOT_PASSES),
            ("PARAM_HOT_START", layout::PARAM_HOT_START),
            ("PARAM_HOT_LEN", layout::PARAM_HOT_LEN),
        ] {
            let line = format!(".equ {name},");
            let decl = SOURCE.lines().find(|l| l.trim_start().starts_with(&line)).unwrap();
            let text = decl.split(',').nth(1).unwrap().trim();
            assert_eq!(usize::from_str_radix(text.trim_start_matches("0x"), 16).unwrap(), value, "{decl}");
        }
    }

    #[test]
    fn warm_routine_only_reads_and_ends_in_ud2() {
        let warm = &CODE[WARM_ADDR - CODE_ADDR..];
        // mov HEARTBEAT, %rax; mov PARAM_HOT_START, %rax; ud2
        let mut expected = vec![0x48, 0x8b, 0x04, 0x25];
        expected.extend_from_slice(&(layout::HEARTBEAT as u32).to_le_bytes());
        expected.extend_from_slice(&[0x48, 0x8b, 0x04, 0x25]);
        expected.extend_from_slice(&(layout::PARAM_HOT_START as u32).to_le_bytes());
        expected.extend_from_slice(&[0x0f, 0x0b]);
        assert_eq!(warm, expected.as_slice());
    }

    #[test]
    fn guest_bin_matches_source() {
        let dir = std::env::temp_dir().join(format!("cprfast-guest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (src, obj, bin) = (dir.join("guest.S"), dir.join("guest.o"), dir.join("guest.bin"));
        std::fs::write(&src, SOURCE).unwrap();
        let run = |cmd: &str, args: &[&std::ffi::OsStr]| std::process::Command::new(cmd).args(args).status();
        match run("as", &["--64".as_ref(), "-o".as_ref(), obj.as_os_str(), src.as_os_str()]) {
            Ok(st) => assert!(st.success(), "as failed on guest.S"),
            Err(e) => {
                eprintln!("skipping: GNU as not available: {e}");
                return;
            }
        }
        let st = run("objcopy", &["-O".as_ref(), "binary".as_ref(), "-j".as_ref(), ".text".as_ref(), obj.as_os_str(), bin.as_os_str()])
            .unwrap();
        assert!(st.success());
        let built = std::fs::read(&bin).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(built, CODE, "guest.bin is stale: regenerate it as guest.S's header says");
    }

    #[test]
    fn identity_map_covers_ram() {
        let t = page_tables(16 * GIB, false);
        let entry = |i: usize| u64::from_le_bytes(t[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(t.len(), 4096 * 18);
        // The last 2 MiB page of the 16th GiB maps itself.
        assert_eq!(entry(512 + 15), (PD + 15 * 0x1000) as u64 | 7);
        assert_eq!(entry(1024 + 16 * 512 - 1), (16 * GIB - (1 << 21)) as u64 | 0x87);
        assert!(PML4 + t.len() <= layout::RESERVED_END);
        let t = page_tables(MAX_RAM, false);
        assert!(PML4 + t.len() <= layout::RESERVED_END);
        let t = page_tables(3 * GIB / 2, true);
        assert_eq!(t.len(), 8192);
        assert_eq!(u64::from_le_bytes(t[4096 + 8..4096 + 16].try_into().unwrap()), GIB as u64 | 0x87);
    }

    #[test]
    fn bad_hot_sets_are_refused() {
        let r = Region::create("guest-img", 4 << 20, &CreateOptions::default()).unwrap();
        let m = r.mapping();
        assert!(write_image(&m, 0x1000, 0x1000, false).is_err()); // inside the reserved area
        assert!(write_image(&m, 1 << 20, (3 << 20) + 1, false).is_err()); // not whole pages
        assert!(write_image(&m, 1 << 20, 4 << 20, false).is_err()); // beyond RAM
        write_image(&m, 1 << 20, 3 << 20, false).unwrap();
        let mut code = vec![0; CODE.len()];
        m.read(CODE_ADDR, &mut code).unwrap();
        assert_eq!(code, CODE);
    }
}
