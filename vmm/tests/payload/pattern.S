/*
 * pmsnap test payload: a guest that runs entirely in user mode (CPL 3), which this
 * host's KVM executes natively, so it writes memory at full speed.
 *
 * The VMM's payload mode enters it at `_start` on every vCPU with:
 *   rdi = vCPU index, rsi = vCPU count, rdx = region base, rcx = region size in bytes
 * (guest-physical == virtual, identity mapped with user pages, IOPL 3 so `out` works).
 *
 * Each vCPU owns an equal slice of the region's pages. In round r (r = 1, 2, ...) it
 * fills every 8-byte word of each page p of its slice with (r << 32) | p, in page order
 * and word order, then reports the round on port 0x510 as (vcpu << 24) | (r & 0xffffff).
 * So at any instant every word of page p reads (k << 32) | p where k is the round that
 * last wrote it, and within a page k never increases along the page.
 */
    .code64
    .text
    .globl _start
_start:
    mov     %rdi, %r14              /* vCPU index */
    mov     %rdx, %r8               /* region base */
    mov     %rcx, %rax
    shr     $12, %rax               /* pages in the region */
    xor     %edx, %edx
    div     %rsi                    /* rax = pages per vCPU */
    mov     %rax, %r9
    mov     %r14, %rax
    mul     %r9                     /* rax = my first page */
    mov     %rax, %r10
    lea     (%r10, %r9), %r11       /* one past my last page */
    xor     %r12d, %r12d            /* round */
next_round:
    inc     %r12
    mov     %r10, %r13              /* page */
next_page:
    mov     %r12, %rax
    shl     $32, %rax
    or      %r13, %rax              /* value = round << 32 | page */
    mov     %r13, %rdi
    shl     $12, %rdi
    add     %r8, %rdi
    mov     $512, %ecx
    cld
    rep stosq
    inc     %r13
    cmp     %r11, %r13
    jb      next_page
    mov     %r14, %rax
    shl     $24, %eax
    mov     %r12d, %ebx
    and     $0xffffff, %ebx
    or      %ebx, %eax
    mov     $0x510, %dx
    out     %eax, %dx
    jmp     next_round
