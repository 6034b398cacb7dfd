/*
 * LD_PRELOAD shim for the QEMU COLO peer of `tandem bench pause` (QEMU 7.2
 * under TCG only). Built by qemu-scripts/colo-qemu.sh.
 *
 * The bug it works around: QEMU 7.2's COLO checkpoint calls
 * qemu_savevm_live_state() from the migration thread without the big QEMU
 * lock (BQL). Under TCG the RAM sync ends in tcg_log_global_after_sync() ->
 * run_on_cpu(), which waits with qemu_cond_wait(&qemu_work_cond,
 * &qemu_global_mutex), a mutex the thread does not hold. pthread_cond_wait
 * then releases a lock someone else holds and returns with the migration
 * thread owning the BQL behind QEMU's back; the next
 * qemu_mutex_lock_iothread() before vm_start() deadlocks the primary on
 * the first or one of the first checkpoints (KVM has no such listener).
 *
 * The same call also queues the work and kicks the vCPU without the BQL,
 * so the kick can fall between the stopped vCPU thread's "anything to do?"
 * check and its wait on halt_cond: a lost wakeup, and the checkpoint (and
 * the guest) hangs for good, about once in a thousand checkpoints.
 *
 * What the shim does:
 * - a pthread_cond_wait() whose caller does not own the (glibc) mutex takes
 *   the mutex first, waits at most 1 ms and releases the mutex again: the
 *   wait run_on_cpu's contract expects (caller holds the BQL);
 * - every other pthread_cond_wait() waits at most 1 ms too, so a lost
 *   wakeup costs at most 1 ms.
 * Both are spurious wakeups, which POSIX allows and every caller tolerates
 * (QEMU loops on its own predicate: run_on_cpu on `done`, the vCPU on its
 * work list). The cost is a few hundred wakeups per second per waiting
 * thread.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

typedef int (*timedwait_fn)(pthread_cond_t *, pthread_mutex_t *,
                            const struct timespec *);

static timedwait_fn real_timedwait;

static void resolve(void)
{
    if (!real_timedwait) {
        /* The versioned lookup: plain dlsym would find the pre-2.3.2
         * condition variable ABI. */
        real_timedwait = (timedwait_fn)dlvsym(RTLD_NEXT, "pthread_cond_timedwait",
                                              "GLIBC_2.3.2");
    }
}

static void wait_1ms(pthread_cond_t *cond, pthread_mutex_t *mutex)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec += 1;
        ts.tv_nsec -= 1000000000;
    }
    real_timedwait(cond, mutex, &ts);
}

int pthread_cond_wait(pthread_cond_t *cond, pthread_mutex_t *mutex)
{
    resolve();
    pid_t self = (pid_t)syscall(SYS_gettid);
    if (mutex->__data.__owner == self) {
        wait_1ms(cond, mutex);
        return 0;
    }
    pthread_mutex_lock(mutex);
    wait_1ms(cond, mutex);
    pthread_mutex_unlock(mutex);
    return 0;
}
