/*
 * Memory fences for pyvmm's virtqueues (see fences.py beside this file).
 *
 * Built by `python -m pyvmm.native` into _fences-<machine>.so and called through cffi's ABI
 * mode, so it needs no Python headers and no C library: gcc -shared -nostdlib.
 *
 * What each compiles to, for reference:
 *                  x86-64              aarch64
 *   acquire        (nothing)           dmb ishld
 *   release        (nothing)           dmb ish
 *   full           lock or / mfence    dmb ish
 * A call through cffi is also a compiler barrier: nothing in the interpreter moves across it.
 */

void pyvmm_fence_acquire(void)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
}

void pyvmm_fence_release(void)
{
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

void pyvmm_fence_full(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
