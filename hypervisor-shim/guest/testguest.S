/*
 * The csv test guest: a few hundred bytes of x86-64 code that csv-vmm loads
 * at 1 MiB and enters in 64-bit long mode at CPL 3 with IOPL 3 (the VMM
 * builds the GDT and an identity map of the first 4 GiB with 2 MiB user
 * pages). It never needs ring 0: on hosts where KVM is the kvm_pvm module
 * (no hardware virtualization) supervisor code that is not PVM-aware runs
 * through KVM's instruction emulator, about 1000 times slower, while user
 * code runs natively. Port I/O at IOPL 3 and rdtsc work from CPL 3.
 *
 * It reads its settings from the mailbox page the VMM fills in (see
 * src/guest.rs for the layout), then loops forever:
 *   - dirty `rate` pages of the dirty area, round robin. Before a page is
 *     rewritten its contents are checked against the pattern of the
 *     generation recorded for it in the generation table; a mismatch counts
 *     an error and is reported on port 0x511 with the page number. So every
 *     page the guest ever wrote is verified once per lap, on whichever host
 *     the guest runs now.
 *   - wait for the next tick (rdtsc against the TSC frequency the VMM
 *     passed in; a late tick is not caught up, so a paused guest resumes at
 *     its normal pace), then bump the heartbeat sequence number in the
 *     mailbox and write its low 32 bits to port 0x510.
 *
 * The same image also boots under any multiboot loader (QEMU's -kernel),
 * for the benchmark against QEMU: the multiboot entry runs in 32-bit
 * protected mode, fills the mailbox from the multiboot memory size and the
 * command line "<tsc_khz> <pages per tick> <tick_us>", builds the same
 * page tables and GDT, enters long mode and drops to CPL 3 at _start. There
 * the heartbeat also goes to COM1 as "H<low 32 bits in 8 hex digits>\n".
 *
 * Page p at generation g holds, in qword i, (((p << 32) | g) * M) + i * K.
 * Everything the guest keeps lives in guest memory or in its registers, so
 * a save/restore or a migration carries it along.
 */
    .intel_syntax noprefix
    .code64
    .section .text
    .globl _start

    .set MAILBOX,      0x5000
    .set MB_MAGIC,     0
    .set MB_TSC_KHZ,   8
    .set MB_MEM,       16
    .set MB_RATE,      24
    .set MB_TICK_US,   32
    .set MB_DIRTY,     40
    .set MB_HB_SERIAL, 48
    .set MB_DISK_BLOCKS, 0x38
    .set MB_DISK_EVERY,  0x40
    .set MB_DISK_WRITES, 0x128
    .set MB_DISK_LAST,   0x130
    .set MB_DISK_ERRORS, 0x138
    .set MB_AVAIL_IDX,   0x140
    .set VIRTIO,       0xd0000000
    .set VQ_DESC,      0x60000
    .set VQ_AVAIL,     0x60100
    .set VQ_USED,      0x61000
    .set VQ_HDR,       0x62000
    .set VQ_DATA,      0x63000
    .set VQ_STATUS,    0x64000
    .set PORT_DISK_ERR, 0x513
    .set MB_SEQ,       0x100
    .set MB_ERRORS,    0x108
    .set MB_WRITTEN,   0x110
    .set MB_LAPS,      0x118
    .set MB_CURSOR,    0x120
    .set GEN_TABLE,    0x200000
    .set PORT_SERIAL,  0x3f8
    .set PORT_HEART,   0x510
    .set PORT_ERROR,   0x511
    .set PORT_BOOTED,  0x512
    .set PAT_MUL,      0x9E3779B97F4A7C15
    .set PAT_STEP,     0x2545F4914F6CDD1D

_start:
    jmp start64

    /* Multiboot header with the address fields (a flat image). */
    .balign 4
mb_header:
    .long 0x1BADB002
    .long 0x00010002
    .long -(0x1BADB002 + 0x00010002)
    .long mb_header
    .long _start
    .long 0
    .long 0
    .long mb_entry

start64:
    mov rsp, 0x80000
    mov rbx, MAILBOX

    lea rsi, [rip + banner]
1:  lodsb
    test al, al
    jz 2f
    mov dx, PORT_SERIAL
    out dx, al
    jmp 1b
2:  cmp qword ptr [rbx + MB_DISK_BLOCKS], 0
    je 12f
    call disk_init
12: mov dx, PORT_BOOTED
    mov eax, 1
    out dx, eax

    /* r15 = TSC ticks per heartbeat = tsc_khz * tick_us / 1000 */
    mov rax, [rbx + MB_TSC_KHZ]
    imul rax, [rbx + MB_TICK_US]
    xor edx, edx
    mov rcx, 1000
    div rcx
    test rax, rax
    jnz 3f
    mov eax, 1
3:  mov r15, rax
    /* r14 = number of pages in the dirty area */
    mov rax, [rbx + MB_MEM]
    sub rax, [rbx + MB_DIRTY]
    shr rax, 12
    mov r14, rax
    /* r12 = deadline of the next heartbeat */
    rdtsc
    shl rdx, 32
    or rax, rdx
    add rax, r15
    mov r12, rax
    mov r11, PAT_STEP

main_loop:
    mov r10, [rbx + MB_RATE]
    test r14, r14
    jz pace
dirty_one:
    test r10, r10
    jz pace
    mov r13, [rbx + MB_CURSOR]
    cmp r13, r14
    jb 4f
    xor r13d, r13d
4:  mov rdi, r13
    shl rdi, 12
    add rdi, [rbx + MB_DIRTY]
    mov eax, dword ptr [r13 * 4 + GEN_TABLE]
    test eax, eax
    jz write_page
    /* check the page against generation eax */
    mov r9, r13
    shl r9, 32
    or r9, rax
    mov r8, PAT_MUL
    imul r9, r8
    mov rsi, rdi
    mov ecx, 512
5:  cmp [rsi], r9
    jne bad_page
    add r9, r11
    add rsi, 8
    dec ecx
    jnz 5b
    jmp write_page
bad_page:
    inc qword ptr [rbx + MB_ERRORS]
    mov dx, PORT_ERROR
    mov eax, r13d
    out dx, eax
    mov eax, dword ptr [r13 * 4 + GEN_TABLE]
write_page:
    inc eax
    jnz 6f
    inc eax
6:  mov dword ptr [r13 * 4 + GEN_TABLE], eax
    mov r9, r13
    shl r9, 32
    or r9, rax
    mov r8, PAT_MUL
    imul r9, r8
    mov ecx, 512
7:  mov [rdi], r9
    add r9, r11
    add rdi, 8
    dec ecx
    jnz 7b
    inc qword ptr [rbx + MB_WRITTEN]
    inc r13
    cmp r13, r14
    jb 8f
    xor r13d, r13d
    inc qword ptr [rbx + MB_LAPS]
8:  mov [rbx + MB_CURSOR], r13
    dec r10
    jmp dirty_one

pace:
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, r12
    jae 9f
    pause
    jmp pace
9:  add r12, r15
    cmp rax, r12
    jb 10f
    /* more than a tick late (the guest was paused): no catching up */
    lea r12, [rax + r15]
10: mov rax, [rbx + MB_SEQ]
    inc rax
    mov [rbx + MB_SEQ], rax
    mov dx, PORT_HEART
    out dx, eax
    /* Every MB_DISK_EVERY heartbeats, one block to the disk. */
    cmp qword ptr [rbx + MB_DISK_BLOCKS], 0
    je 13f
    mov rcx, [rbx + MB_DISK_EVERY]
    test rcx, rcx
    jz 13f
    mov rax, [rbx + MB_SEQ]
    xor edx, edx
    div rcx
    test rdx, rdx
    jnz 13f
    call disk_write
13: cmp qword ptr [rbx + MB_HB_SERIAL], 0
    je main_loop
    /* "H" + the low 32 bits of the sequence number in hex + newline on
       COM1 (each byte is an exit to the VMM: kept short) */
    mov esi, dword ptr [rbx + MB_SEQ]
    shl rsi, 32
    mov dx, PORT_SERIAL
    mov al, 'H'
    out dx, al
    lea r8, [rip + hexdigits]
    mov ecx, 8
11: rol rsi, 4
    mov eax, esi
    and eax, 0xf
    mov al, [r8 + rax]
    out dx, al
    dec ecx
    jnz 11b
    mov al, 10
    out dx, al
    jmp main_loop

/*
 * virtio-blk over virtio-mmio (version 2) at VIRTIO, one queue of 8 with
 * a fixed three-descriptor chain (header, data, status). The VMM serves a
 * request during the queue-notify write, so the used index has moved when
 * that instruction completes: no interrupts, no waiting.
 */
disk_init:
    mov r8d, VIRTIO
    cmp dword ptr [r8], 0x74726976
    jne disk_off
    cmp dword ptr [r8 + 4], 2
    jne disk_off
    cmp dword ptr [r8 + 8], 2
    jne disk_off
    mov dword ptr [r8 + 0x70], 0
    mov dword ptr [r8 + 0x70], 1
    mov dword ptr [r8 + 0x70], 3
    mov dword ptr [r8 + 0x24], 1
    mov dword ptr [r8 + 0x20], 1          /* VIRTIO_F_VERSION_1 */
    mov dword ptr [r8 + 0x24], 0
    mov dword ptr [r8 + 0x20], 0x200      /* VIRTIO_BLK_F_FLUSH */
    mov dword ptr [r8 + 0x70], 11
    mov eax, [r8 + 0x70]
    test eax, 8
    jz disk_off
    mov dword ptr [r8 + 0x30], 0
    mov dword ptr [r8 + 0x38], 8
    mov dword ptr [r8 + 0x80], VQ_DESC
    mov dword ptr [r8 + 0x84], 0
    mov dword ptr [r8 + 0x90], VQ_AVAIL
    mov dword ptr [r8 + 0x94], 0
    mov dword ptr [r8 + 0xa0], VQ_USED
    mov dword ptr [r8 + 0xa4], 0
    mov dword ptr [r8 + 0x44], 1
    mov dword ptr [r8 + 0x70], 15
    /* The chain: header -> data -> status. */
    mov qword ptr [VQ_DESC], VQ_HDR
    mov dword ptr [VQ_DESC + 8], 16
    mov word ptr [VQ_DESC + 12], 1
    mov word ptr [VQ_DESC + 14], 1
    mov qword ptr [VQ_DESC + 16], VQ_DATA
    mov dword ptr [VQ_DESC + 24], 4096
    mov word ptr [VQ_DESC + 28], 1
    mov word ptr [VQ_DESC + 30], 2
    mov qword ptr [VQ_DESC + 32], VQ_STATUS
    mov dword ptr [VQ_DESC + 40], 1
    mov word ptr [VQ_DESC + 44], 2
    mov word ptr [VQ_DESC + 46], 0
    ret
disk_off:
    mov qword ptr [rbx + MB_DISK_BLOCKS], 0
    mov dx, PORT_DISK_ERR
    mov eax, 0xffffffff
    out dx, eax
    ret

/* Writes block (seq mod blocks): qword 0 the sequence number, qword 1 the
   block number, then the pattern of page (block | 1 << 31) at generation
   (seq mod 2^32). Every 64th write is followed by a flush. */
disk_write:
    mov r9, [rbx + MB_SEQ]
    mov rax, r9
    xor edx, edx
    div qword ptr [rbx + MB_DISK_BLOCKS]
    mov r10, rdx
    mov edi, VQ_DATA
    mov [rdi], r9
    mov [rdi + 8], r10
    mov rax, r10
    bts rax, 31
    shl rax, 32
    mov ecx, r9d
    or rax, rcx
    mov r8, PAT_MUL
    imul rax, r8
    add rax, r11
    add rax, r11
    add rdi, 16
    mov ecx, 510
14: mov [rdi], rax
    add rax, r11
    add rdi, 8
    dec ecx
    jnz 14b
    mov dword ptr [VQ_HDR], 1             /* VIRTIO_BLK_T_OUT */
    mov dword ptr [VQ_HDR + 4], 0
    mov rax, r10
    shl rax, 3
    mov qword ptr [VQ_HDR + 8], rax
    mov word ptr [VQ_DESC + 12], 1        /* header -> data */
    mov word ptr [VQ_DESC + 14], 1
    call vq_submit
    test eax, eax
    jnz disk_error
    inc qword ptr [rbx + MB_DISK_WRITES]
    mov [rbx + MB_DISK_LAST], r9
    mov rax, [rbx + MB_DISK_WRITES]
    test rax, 63
    jnz 15f
    mov dword ptr [VQ_HDR], 4             /* VIRTIO_BLK_T_FLUSH */
    mov qword ptr [VQ_HDR + 8], 0
    mov word ptr [VQ_DESC + 14], 2        /* header -> status */
    call vq_submit
    test eax, eax
    jnz disk_error
15: ret
disk_error:
    inc qword ptr [rbx + MB_DISK_ERRORS]
    mov dx, PORT_DISK_ERR
    out dx, eax
    ret

/* Offers descriptor chain 0 and notifies; eax = the request's status. */
vq_submit:
    mov byte ptr [VQ_STATUS], 0xff
    mov rax, [rbx + MB_AVAIL_IDX]
    mov ecx, eax
    and ecx, 7
    mov word ptr [rcx * 2 + VQ_AVAIL + 4], 0
    inc rax
    mov [rbx + MB_AVAIL_IDX], rax
    mov word ptr [VQ_AVAIL + 2], ax
    mov r8d, VIRTIO
    mov dword ptr [r8 + 0x50], 0
    movzx ecx, word ptr [VQ_USED + 2]
    cmp cx, ax
    jne 16f
    movzx eax, byte ptr [VQ_STATUS]
    ret
16: mov eax, 0xfe
    ret

banner:
    .asciz "csv test guest: up\n"
hexdigits:
    .ascii "0123456789abcdef"

/*
 * Multiboot entry: 32-bit protected mode, paging off, EBX = multiboot info.
 */
    .code32
mb_entry:
    cli
    mov esp, 0x80000
    mov ebp, ebx
    /* The mailbox: zero, then defaults. */
    mov edi, MAILBOX
    xor eax, eax
    mov ecx, 1024
    rep stosd
    mov dword ptr [MAILBOX + MB_MAGIC], 0x47565343
    mov dword ptr [MAILBOX + MB_MAGIC + 4], 0x54534555
    mov dword ptr [MAILBOX + MB_DIRTY], 0x400000
    mov dword ptr [MAILBOX + MB_TICK_US], 1000
    mov dword ptr [MAILBOX + MB_TSC_KHZ], 1000000
    mov dword ptr [MAILBOX + MB_HB_SERIAL], 1
    /* Memory: mem_upper KiB above 1 MiB, rounded down to 2 MiB, at most 2 GiB. */
    test dword ptr [ebp], 1
    jz 1f
    mov eax, [ebp + 8]
    add eax, 1024
    cmp eax, 0x200000
    jbe 20f
    mov eax, 0x200000
20: shl eax, 10
    and eax, 0xFFE00000
    mov [MAILBOX + MB_MEM], eax
1:  /* Command line: tsc_khz, pages per tick, tick_us. */
    test dword ptr [ebp], 4
    jz 2f
    mov esi, [ebp + 16]
    /* Loaders put the kernel's name first ("/path/guest.bin 2596148 ..."):
       skip a first word that does not start with a digit. */
    movzx eax, byte ptr [esi]
    sub eax, '0'
    cmp eax, 9
    jbe 21f
22: movzx eax, byte ptr [esi]
    test eax, eax
    jz 21f
    cmp eax, ' '
    je 21f
    inc esi
    jmp 22b
21: call parse_num
    test eax, eax
    jz 2f
    mov [MAILBOX + MB_TSC_KHZ], eax
    call parse_num
    mov [MAILBOX + MB_RATE], eax
    call parse_num
    test eax, eax
    jz 2f
    mov [MAILBOX + MB_TICK_US], eax
2:  /* Page tables at 0x9000: PML4, PDPT, four PDs of 2 MiB user pages. */
    mov edi, 0x9000
    xor eax, eax
    mov ecx, 6 * 1024
    rep stosd
    mov dword ptr [0x9000], 0xA007
    mov dword ptr [0xA000], 0xB007
    mov dword ptr [0xA008], 0xC007
    mov dword ptr [0xA010], 0xD007
    mov dword ptr [0xA018], 0xE007
    mov edi, 0xB000
    mov eax, 0x87
    mov ecx, 2048
3:  mov [edi], eax
    add eax, 0x200000
    add edi, 8
    dec ecx
    jnz 3b
    lgdt [gdt_ptr]
    mov eax, cr4
    or eax, 0x620
    mov cr4, eax
    mov eax, 0x9000
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000021
    mov cr0, eax
    push 0x08
    push offset long64
    retf

parse_num:
    xor eax, eax
4:  cmp byte ptr [esi], ' '
    jne 5f
    inc esi
    jmp 4b
5:  movzx ecx, byte ptr [esi]
    sub ecx, '0'
    cmp ecx, 9
    ja 6f
    imul eax, eax, 10
    add eax, ecx
    inc esi
    jmp 5b
6:  ret

    .code64
long64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    /* Drop to CPL 3 at _start with IOPL 3 and interrupts off. */
    push 0x23
    push 0x80000
    push 0x3002
    push 0x1b
    lea rax, [rip + start64]
    push rax
    iretq

    .balign 8
gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff    /* 0x10 kernel data */
    .quad 0x00affa000000ffff    /* 0x18 user code, 64-bit */
    .quad 0x00cff2000000ffff    /* 0x20 user data */
gdt_ptr:
    .word gdt_ptr - gdt - 1
    .long gdt
