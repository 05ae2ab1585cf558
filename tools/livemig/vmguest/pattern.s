/*
 * The `livemig vm` test guest: a 512-byte boot sector (GNU as, built by
 * tools/meson.build) that dirties guest RAM in a pattern a consistent
 * snapshot can be checked against (tools/livemig/vmcheck.h).
 *
 * Entry (as `livemig vm` starts it, no firmware): real mode, CS:IP =
 * 0000:7C00, ESI = the RAM size in bytes (livemig vm's convention; 0 or
 * less than 2 MiB means "assume 16 MiB").
 *
 * It switches to 32-bit protected mode with flat segments, then:
 *   - the region is every 4 KiB page from 1 MiB to the end of RAM; the
 *     first 32-bit word of each page is that page's counter, set to 0;
 *   - the header at 0x500 (five 32-bit words: magic "LMVG", pass, cursor,
 *     region start, region pages) is written, magic last;
 *   - "LMVG ready" goes to COM1;
 *   - forever: for each page in order, increment its counter and then set
 *     cursor to the number of pages done in this pass; after the last page,
 *     increment pass, set cursor to 0 and print "pass XXXXXXXX" (hex).
 * So at any instruction boundary, with P = pass and c = cursor, every
 * counter is P or P + 1, the P + 1 ones are a prefix of k pages, and
 * k = c, or k = c + 1 (between a counter's increment and the cursor's
 * store), or k = 0 with c = the page count (between pass++ and cursor = 0).
 */
        .equ HDR,        0x500
        .equ HDR_MAGIC,  HDR + 0
        .equ HDR_PASS,   HDR + 4
        .equ HDR_CURSOR, HDR + 8
        .equ HDR_START,  HDR + 12
        .equ HDR_PAGES,  HDR + 16
        .equ MAGIC,      0x47564d4c             /* "LMVG" little endian */
        .equ REGION,     0x00100000             /* 1 MiB */
        .equ COM1,       0x3f8

        .code16
        .text
        .globl _start
_start:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    $0x7c00, %sp
        lgdtl   gdt_desc
        movl    %cr0, %eax
        orl     $1, %eax
        movl    %eax, %cr0
        ljmp    $0x08, $pm32

        .code32
pm32:
        movw    $0x10, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %fs
        movw    %ax, %gs
        movw    %ax, %ss
        movl    $0x7c00, %esp

        cmpl    $0x200000, %esi                 /* RAM size from the VMM */
        jae     1f
        movl    $0x1000000, %esi
1:      subl    $REGION, %esi
        shrl    $12, %esi                       /* esi = region pages */

        movl    $REGION, %edi                   /* counters to 0 */
        movl    %esi, %ecx
2:      movl    $0, (%edi)
        addl    $4096, %edi
        decl    %ecx
        jnz     2b

        movl    $0, HDR_PASS
        movl    $0, HDR_CURSOR
        movl    $REGION, HDR_START
        movl    %esi, HDR_PAGES
        movl    $MAGIC, HDR_MAGIC

        movl    $msg_ready, %ebx
        call    puts

pass:   movl    $REGION, %edi
        xorl    %ecx, %ecx
page:   incl    (%edi)
        incl    %ecx
        movl    %ecx, HDR_CURSOR
        addl    $4096, %edi
        cmpl    %esi, %ecx
        jb      page
        incl    HDR_PASS
        movl    $0, HDR_CURSOR

        movl    $msg_pass, %ebx
        call    puts
        movl    HDR_PASS, %eax
        movl    $8, %ecx
3:      roll    $4, %eax                        /* top nibble first */
        movl    %eax, %ebx
        andl    $0xf, %ebx
        movb    hexdigits(%ebx), %bl
        pushl   %eax
        movb    %bl, %al
        movw    $COM1, %dx
        outb    %al, %dx
        popl    %eax
        decl    %ecx
        jnz     3b
        movb    $'\n', %al
        outb    %al, %dx
        jmp     pass

/* Print the NUL-terminated string at ebx on COM1. */
puts:   movw    $COM1, %dx
4:      movb    (%ebx), %al
        testb   %al, %al
        jz      5f
        outb    %al, %dx
        incl    %ebx
        jmp     4b
5:      ret

msg_ready:  .asciz "LMVG ready\n"
msg_pass:   .asciz "pass "
hexdigits:  .ascii "0123456789abcdef"

        .p2align 3
gdt:    .quad   0
        .quad   0x00cf9a000000ffff              /* 0x08: code, flat 4 GiB, 32-bit */
        .quad   0x00cf92000000ffff              /* 0x10: data, flat 4 GiB */
gdt_desc:
        .word   gdt_desc - gdt - 1
        .long   gdt

        .org    510
        .word   0xaa55
