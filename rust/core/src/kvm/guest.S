/*
 * The cprfast KVM guest: a few instructions of 64-bit code that keep a
 * heartbeat and dirty a hot working set, forever, without ever exiting to
 * the VMM. The VMM starts the vCPU directly in long mode (CR0.PG, CR4.PAE,
 * EFER.LME/LMA) at CPL 3 with an identity map of all guest RAM, so every
 * address below is a guest-physical offset into the RAM memfd. (CPL 3
 * because nested PVM runs guest user mode natively; see guest.rs.)
 *
 * Plain GNU as (no C preprocessor). The machine code is checked in as
 * guest.bin; `cargo test -p cprfast-core guest_bin_matches_source`
 * re-assembles this file and compares. To regenerate:
 *   as --64 -o guest.o guest.S && objcopy -O binary -j .text guest.o guest.bin
 *
 * The code is position-independent (relative jumps, absolute data
 * addresses), loaded at GUEST_CODE (0x4000, see guest.rs). No stack, no
 * interrupts (RFLAGS.IF = 0), no IDT: any exception triple-faults, which
 * the VMM sees as KVM_EXIT_SHUTDOWN and reports.
 *
 * Registers carry the loop state, so a saved vCPU resumes mid-pass:
 *   r8  = first byte of the hot set   r9  = its length (whole pages)
 *   r10 = end of the hot set          r11 = next hot page to write
 *   rax = current heartbeat           ecx = pages left in this beat
 */
        .code64
        .text

        /* Keep in step with rust/core/src/layout.rs (checked by a unit test). */
        .equ HEARTBEAT,       0x1000
        .equ HOT_PASSES,      0x1008
        .equ PARAM_HOT_START, 0x2000
        .equ PARAM_HOT_LEN,   0x2008
        .equ PAGE_SIZE,       4096
        /* Pages written per heartbeat. One: when writes fault (first touch of
         * a memfd page, dirty-log write protection, a new VM's empty shadow
         * page tables: several us each when nested) the beat still moves
         * after every fault; when they do not, one beat takes ~30 ns. */
        .equ PAGES_PER_BEAT,  1

start:
        mov     PARAM_HOT_START, %r8
        mov     PARAM_HOT_LEN, %r9
        and     $-PAGE_SIZE, %r9
        lea     (%r8,%r9), %r10
        mov     %r8, %r11
beat:
        mov     HEARTBEAT, %rax
        inc     %rax
        mov     %rax, HEARTBEAT
        test    %r9, %r9
        jz      beat
        mov     $PAGES_PER_BEAT, %ecx
touch:
        mov     %rax, (%r11)            /* one 8-byte store dirties the page */
        add     $PAGE_SIZE, %r11
        cmp     %r10, %r11
        jb      1f
        mov     %r8, %r11               /* wrapped: one more full pass */
        incq    HOT_PASSES
1:
        dec     %ecx
        jnz     touch
        jmp     beat

        /* A target VMM's warm-up, run before it has the guest's state (see
         * guest.rs, WARM_ADDR): only reads, so it may run while the source
         * still runs the guest in this very RAM. Executing here and reading the
         * heartbeat builds the new VM's mappings of the code, the heartbeat
         * page and the page tables; the ud2 triple-faults (no IDT), which ends
         * the run with KVM_EXIT_SHUTDOWN. The guest's real registers are
         * loaded after. */
        .org    0x80
warm:
        mov     HEARTBEAT, %rax
        mov     PARAM_HOT_START, %rax
        ud2
