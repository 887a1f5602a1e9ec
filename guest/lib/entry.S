/*
 * Entry points and interrupt stubs.
 *  _start:     64-bit entry (Linux 64-bit boot protocol: long mode, RSI = zero page).
 *  pvh_start:  32-bit PVH entry (EBX = struct hvm_start_info), named by the Xen ELF note so
 *              QEMU can boot the same binary with -kernel; it enables long mode itself.
 * Both switch to our CPL0 stack and call cpl0_main(kind, info), which never returns.
 */
#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS 0x1b
#define USER_CS 0x23
#define XEN_ELFNOTE_PHYS32_ENTRY 18

	.section .text.entry, "ax"
	.code64
	.globl _start
_start:
	xor %edi, %edi			/* BOOT_LINUX64; RSI = zero page */
common64:
	lea cpl0_stack+16384(%rip), %rsp
	call cpl0_main
1:	jmp 1b

	.code32
	.globl pvh_start
pvh_start:
	cli
	mov %ebx, %esi
	lgdt gdt_desc
	mov $KERNEL_DS, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	/* Temporary page tables: identity-map the first 1 GiB with 2 MiB pages. */
	mov $pvh_pd, %edi
	mov $0x83, %eax			/* present, writable, 2 MiB */
	mov $512, %ecx
1:	mov %eax, (%edi)
	movl $0, 4(%edi)
	add $0x200000, %eax
	add $8, %edi
	loop 1b
	movl $pvh_pd + 3, pvh_pdpt
	movl $pvh_pdpt + 3, pvh_pml4
	mov %cr4, %eax
	or $0x20, %eax			/* PAE */
	mov %eax, %cr4
	mov $pvh_pml4, %eax
	mov %eax, %cr3
	mov $0xc0000080, %ecx		/* EFER.LME */
	rdmsr
	or $0x100, %eax
	wrmsr
	mov %cr0, %eax
	or $0x80000001, %eax		/* PG | PE */
	mov %eax, %cr0
	ljmp $KERNEL_CS, $pvh_start64

	.code64
pvh_start64:
	mov %esi, %esi			/* zero-extend the start info address */
	mov $1, %edi			/* BOOT_PVH */
	jmp common64

	.text
/* load_gdt(desc): lgdt, reload the data segments and CS. */
	.globl load_gdt
load_gdt:
	lgdt (%rdi)
	mov $KERNEL_DS, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	xor %eax, %eax
	mov %eax, %fs
	mov %eax, %gs
	pushq $KERNEL_CS
	lea 1f(%rip), %rax
	push %rax
	lretq
1:	ret

/* enter_user(entry, stack): iretq to CPL3 with IF=1 and IOPL=0. */
	.globl enter_user
enter_user:
	mov $USER_DS, %eax
	mov %eax, %ds
	mov %eax, %es
	pushq $USER_DS
	push %rsi
	pushq $0x202
	pushq $USER_CS
	push %rdi
	iretq

/* IRQ 0: count the tick, EOI the master PIC. As short as possible: it runs emulated on PVM. */
	.globl timer_irq
timer_irq:
	incl timer_ticks(%rip)
	push %rax
	mov $0x20, %al
	outb %al, $0x20
	pop %rax
	iretq

/* Other PIC interrupts (all masked; this catches spurious ones): EOI and return. */
	.globl pic1_irq
pic1_irq:
	push %rax
	mov $0x20, %al
	outb %al, $0x20
	pop %rax
	iretq

	.globl pic2_irq
pic2_irq:
	push %rax
	mov $0x20, %al
	outb %al, $0xa0
	outb %al, $0x20
	pop %rax
	iretq

	.globl spurious_irq
spurious_irq:
	iretq

/* MSI_VECTOR (0x41): count, EOI the local APIC (its EOI register at 0xfee000b0). */
	.globl msi_irq
msi_irq:
	incl msi_count(%rip)
	push %rax
	lea wait_hlt(%rip), %rax
	cmp %rax, 8(%rsp)		/* interrupted just before irq_wait's hlt? */
	jne 1f
	incq 8(%rsp)			/* then return past it (hlt is one byte) */
1:	mov $0xfee000b0, %eax
	movl $0, (%rax)
	pop %rax
	iretq

/* LAPIC_TIMER_VECTOR (0x42): count, EOI the local APIC. */
	.globl lapic_timer_irq
lapic_timer_irq:
	incl lapic_timer_ticks(%rip)
	push %rax
	mov $0xfee000b0, %eax
	movl $0, (%rax)
	pop %rax
	iretq

/*
 * irq_wait(seen), callable at CPL3: halt until an interrupt, unless msi_count already differs
 * from `seen` (the count the caller saw before it last looked for work). PVM raises #UD for
 * software interrupts other than int3 and #GP for sti, so the way in is a ud2 that ud_trap
 * recognises by its address, and interrupts are enabled by an iretq to the hlt at CPL0 (the
 * #UD gate clears IF, so nothing slips in between the check and that iretq). An interrupt that
 * lands between the iretq and the hlt would leave the hlt waiting for the next one: msi_irq sees
 * its return address is the hlt and steps over it. Then the #UD frame, still on the stack,
 * returns to the caller.
 */
	.globl irq_wait
irq_wait:
irq_wait_ud:
	ud2
	ret

	.globl ud_trap
ud_trap:
	lea irq_wait_ud(%rip), %rax	/* rax is irq_wait's to clobber */
	cmp %rax, (%rsp)
	jne vector_stubs + 16 * 6	/* any other #UD is fatal */
	addq $2, (%rsp)			/* return past the ud2 */
	cmpl %edi, msi_count(%rip)
	jne 1f
	mov %rsp, %rax			/* the #UD frame, which the last iretq uses */
	pushq $KERNEL_DS
	push %rax
	pushq $0x202
	pushq $KERNEL_CS
	lea wait_hlt(%rip), %rax
	push %rax
	iretq
wait_hlt:
	hlt
1:	iretq

/*
 * One 16-byte stub per vector: push a zero error code where the CPU pushes none, push the
 * vector, and go to trap_fatal(vector, error, rip), which reports and resets.
 */
	.balign 16
	.globl vector_stubs
vector_stubs:
	vector = 0
	.rept 256
	.balign 16
	.if (vector == 8) || ((vector >= 10) && (vector <= 14)) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
	.else
	pushq $0
	.endif
	pushq $vector
	jmp trap_common
	vector = vector + 1
	.endr

trap_common:
	mov (%rsp), %rdi		/* vector */
	mov 8(%rsp), %rsi		/* error code */
	mov 16(%rsp), %rdx		/* rip */
	and $-16, %rsp
	call trap_fatal
1:	jmp 1b

	.bss
	.balign 4
	.globl timer_ticks
timer_ticks:
	.long 0
	.globl lapic_timer_ticks
lapic_timer_ticks:
	.long 0
	.globl msi_count
msi_count:
	.long 0
	.balign 4096
pvh_pml4:
	.skip 4096
pvh_pdpt:
	.skip 4096
pvh_pd:
	.skip 4096

	.section .note.Xen, "a", @note
	.balign 4
	.long 4				/* name size: "Xen\0" */
	.long 8				/* descriptor size */
	.long XEN_ELFNOTE_PHYS32_ENTRY
	.asciz "Xen"
	.balign 4
	.quad pvh_start
	.balign 4

	.section .note.GNU-stack, "", @progbits
