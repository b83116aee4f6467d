/* measure FD PROGRAM [ARG...]: run PROGRAM as qmail would (fork, exec, wait) and
 * write "<wall ns> <cpu us> <peak rss kB> <minor page faults>\n" of that one process
 * (and of the program it execs: qmail-queue.orig) to descriptor FD; exit with its exit
 * code (128 + signal when killed).
 *
 * Why a C program: Python starts children with vfork (posix_spawn, subprocess), and
 * the kernel charges the parent's memory high-water mark to a vfork child at its exec,
 * so wait4's ru_maxrss would report the benchmark's own size. Forked from this small
 * process, the child's ru_maxrss is its own (plus this process's ~1 MB at the fork).
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3)
        return 100;
    int out = atoi(argv[1]);
    if (fcntl(out, F_SETFD, FD_CLOEXEC) < 0)
        return 100;
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    pid_t pid = fork();
    if (pid < 0)
        return 100;
    if (pid == 0) {
        execv(argv[2], argv + 2);
        _exit(127);
    }
    int status;
    struct rusage usage;
    if (wait4(pid, &status, 0, &usage) != pid)
        return 100;
    clock_gettime(CLOCK_MONOTONIC, &end);
    long long wall = (end.tv_sec - start.tv_sec) * 1000000000LL + (end.tv_nsec - start.tv_nsec);
    long long cpu = (usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1000000LL +
                    usage.ru_utime.tv_usec + usage.ru_stime.tv_usec;
    dprintf(out, "%lld %lld %ld %ld\n", wall, cpu, usage.ru_maxrss, usage.ru_minflt);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
