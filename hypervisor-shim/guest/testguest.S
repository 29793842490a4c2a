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
 * Page p at generation g holds, in qword i, (((p << 32) | g) * M) + i * K.
 * Everything the guest keeps lives in guest memory or in its registers, so
 * a save/restore or a migration carries it along.
 */
    .intel_syntax noprefix
    .code64
    .section .text
    .globl _start

    .set MAILBOX,      0x5000
    .set MB_TSC_KHZ,   8
    .set MB_MEM,       16
    .set MB_RATE,      24
    .set MB_TICK_US,   32
    .set MB_DIRTY,     40
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
    mov rsp, 0x80000
    mov rbx, MAILBOX

    lea rsi, [rip + banner]
1:  lodsb
    test al, al
    jz 2f
    mov dx, PORT_SERIAL
    out dx, al
    jmp 1b
2:  mov dx, PORT_BOOTED
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
    jmp main_loop

banner:
    .asciz "csv test guest: up\n"
