/*
 * The tiny QEMU guest of the side-by-side benchmark: a 64 KiB firmware image
 * loaded with -bios. It uses the guest-RAM layout of rust/core/src/layout.rs:
 *   0x1000  u64 heartbeat, incremented after every page the guest writes
 *   0x1008  u64 completed passes over the hot working set
 *   0x2000  u64 hot working set start (written by the host before `cont`)
 *   0x2008  u64 hot working set length in bytes (0: heartbeat only)
 * Only the low 32 bits of the parameters are used: the hot set must lie below
 * 4 GiB (and below the machine's low-RAM limit, 3 GiB for a 4 GiB pc guest).
 *
 * The CPU starts in real mode at F000:FFF0 (the image's last 16 bytes, also
 * mapped at 0xFFFF0). We enter 32-bit protected mode with flat segments, turn
 * on SSE so the u64 heartbeat is stored with one aligned 8-byte move (never
 * torn for an observer), then loop forever: for each page of the hot set,
 * bump the heartbeat and store it into that page.
 *
 * Build: as --32 -o guest.o guest.S && objcopy -O binary -j .text guest.o guest.bin
 */
        .set IMAGE_BASE, 0xF0000        /* where the 64 KiB image sits below 1 MiB */
        .set HEARTBEAT,  0x1000
        .set HOT_PASSES, 0x1008
        .set HOT_START,  0x2000
        .set HOT_LEN,    0x2008

        .text
        .code16
start16:
        cli
        inb     $0x92, %al              /* fast A20 gate on */
        orb     $2, %al
        andb    $0xFE, %al              /* never pulse the reset bit */
        outb    %al, $0x92
        lgdtl   %cs:gdt_desc
        movl    %cr0, %eax
        orl     $1, %eax                /* PE */
        movl    %eax, %cr0
        ljmpl   $0x08, $(IMAGE_BASE + start32)

        .code32
start32:
        movw    $0x10, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movl    $0x9000, %esp
        movl    %cr0, %eax
        andl    $~0x4, %eax             /* clear EM */
        orl     $0x2, %eax              /* set MP */
        movl    %eax, %cr0
        movl    %cr4, %eax
        orl     $0x600, %eax            /* OSFXSR | OSXMMEXCPT */
        movl    %eax, %cr4
        movl    $1, %eax
        movd    %eax, %xmm1             /* xmm1 = u64 1 */

pass:
        movl    HOT_START, %esi
        movl    HOT_LEN, %ecx
        testl   %ecx, %ecx
        jz      beat_only
        addl    %esi, %ecx              /* ecx = end of the hot set */
page:
        movq    HEARTBEAT, %xmm0
        paddq   %xmm1, %xmm0
        movq    %xmm0, HEARTBEAT
        movq    %xmm0, (%esi)           /* dirty this page of the hot set */
        addl    $4096, %esi
        cmpl    %ecx, %esi
        jb      page
        movq    HOT_PASSES, %xmm2
        paddq   %xmm1, %xmm2
        movq    %xmm2, HOT_PASSES
        jmp     pass
beat_only:
        movq    HEARTBEAT, %xmm0
        paddq   %xmm1, %xmm0
        movq    %xmm0, HEARTBEAT
        jmp     pass

        .balign 8
gdt:
        .quad   0                       /* null */
        .quad   0x00CF9A000000FFFF      /* 0x08: flat 32-bit code */
        .quad   0x00CF92000000FFFF      /* 0x10: flat 32-bit data */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   IMAGE_BASE + gdt

        .org    0xFFF0
        .code16
reset:
        ljmp    $0xF000, $start16
        .org    0x10000
