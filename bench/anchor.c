/* Variant (b) of the benchmarks: the physical-limit anchor. It does, in C, the work
 * fp-qmail does for a clean message, and nothing else:
 *   copy fd 0 into <tmpdir>/fi<pid>.<random> (O_EXCL|O_NOFOLLOW, splice from a pipe),
 *   create <tmpdir>/fo<pid>.<random>, read the envelope on fd 1,
 *   send one FPQMAIL/1 SCAN request (docs/protocol.md) to the scanner, read the reply,
 *   check CLEAN/CLEANED and that Size equals what fo holds,
 *   remove both names, put fo on fd 0 and the envelope (a memfd) on fd 1,
 *   exec qmail-queue.orig.
 * Settings from the environment as fp-qmail's: FP_QMAIL_SCANNER (one host:port with an
 * IPv4 address, or one /unix/path), FP_QMAIL_TMPDIR, FP_QMAIL_QUEUE. It has none of
 * fp-qmail's policy, logging, timeouts or failover: it is a floor, not a product.
 * Exit codes on failure: 53 spool, 54 input, 73 connect, 74 reply, 71 exec.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define ENVELOPE_MAX (1 << 20)
#define REPLY_MAX (64 << 10)

static char fi[4096], fo[4096];

static void fail(int code) {
    unlink(fi);
    unlink(fo);
    _exit(code);
}

static const char *setting(const char *name, const char *fallback) {
    const char *v = getenv(name);
    return v && *v ? v : fallback;
}

static void write_all(int fd, const char *p, size_t n, int code) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w <= 0)
            fail(code);
        p += w;
        n -= (size_t)w;
    }
}

static long copy_message(int out) {
    long total = 0;
    ssize_t n;
    while ((n = splice(0, NULL, out, NULL, 1 << 20, 0)) > 0)
        total += n;
    if (n == 0)
        return total;
    static char buf[1 << 16]; /* fd 0 not a pipe: read/write */
    while ((n = read(0, buf, sizeof buf)) > 0) {
        write_all(out, buf, (size_t)n, 53);
        total += n;
    }
    if (n < 0)
        fail(54);
    return total;
}

static int connect_scanner(const char *spec) {
    int s;
    if (spec[0] == '/') {
        struct sockaddr_un un = {.sun_family = AF_UNIX};
        snprintf(un.sun_path, sizeof un.sun_path, "%s", spec);
        s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0 || connect(s, (struct sockaddr *)&un, sizeof un) < 0)
            fail(73);
        return s;
    }
    char host[256];
    const char *colon = strrchr(spec, ':');
    if (!colon || (size_t)(colon - spec) >= sizeof host)
        fail(73);
    memcpy(host, spec, (size_t)(colon - spec));
    host[colon - spec] = 0;
    struct sockaddr_in in = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(colon + 1))};
    if (inet_pton(AF_INET, host, &in.sin_addr) != 1)
        fail(73);
    s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&in, sizeof in) < 0)
        fail(73);
    return s;
}

int main(void) {
    const char *tmpdir = setting("FP_QMAIL_TMPDIR", "/tmp");
    const char *queue = setting("FP_QMAIL_QUEUE", "/var/qmail/bin/qmail-queue.orig");
    unsigned char rnd[8];
    if (getrandom(rnd, sizeof rnd, 0) != sizeof rnd)
        _exit(53);
    char suffix[64];
    int len = snprintf(suffix, sizeof suffix, "%d.", (int)getpid());
    for (int i = 0; i < 8; i++)
        len += snprintf(suffix + len, sizeof suffix - (size_t)len, "%02x", rnd[i]);
    snprintf(fi, sizeof fi, "%s/fi%s", tmpdir, suffix);
    snprintf(fo, sizeof fo, "%s/fo%s", tmpdir, suffix);
    umask(077);
    int fi_fd = open(fi, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fi_fd < 0)
        _exit(53);
    int fo_fd = open(fo, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fo_fd < 0)
        fail(53);
    long size = copy_message(fi_fd);

    static char envelope[ENVELOPE_MAX];
    size_t env_len = 0;
    ssize_t n;
    while ((n = read(1, envelope + env_len, sizeof envelope - env_len)) > 0)
        env_len += (size_t)n;
    if (n < 0 || env_len < 2 || envelope[env_len - 1] || envelope[env_len - 2])
        fail(54);

    static char request[ENVELOPE_MAX + 16384];
    int head = snprintf(request, 16384, "FPQMAIL/1 SCAN\nIn: %s\nOut: %s\nSize: %ld\nEnvelope: %zu\n\n",
                        fi, fo, size, env_len);
    memcpy(request + head, envelope, env_len);
    int s = connect_scanner(setting("FP_QMAIL_SCANNER", "127.0.0.1:11200"));
    write_all(s, request, (size_t)head + env_len, 74);

    static char reply[REPLY_MAX + 1];
    size_t got = 0;
    while ((n = read(s, reply + got, REPLY_MAX - got)) > 0)
        got += (size_t)n;
    reply[got] = 0;
    close(s);
    if (strncmp(reply, "FPQMAIL/1 CLEAN\n", 16) && strncmp(reply, "FPQMAIL/1 CLEANED\n", 18))
        fail(74);
    const char *field = strstr(reply, "\nSize: ");
    struct stat st;
    if (!field || !strstr(reply, "\n\n") || fstat(fo_fd, &st) < 0 || st.st_size <= 0 ||
        strtol(field + 7, NULL, 10) != st.st_size)
        fail(74);

    int env_fd = memfd_create("envelope", MFD_CLOEXEC);
    if (env_fd < 0)
        fail(53);
    write_all(env_fd, envelope, env_len, 53);
    unlink(fi);
    unlink(fo);
    if (lseek(env_fd, 0, SEEK_SET) < 0 || lseek(fo_fd, 0, SEEK_SET) < 0 || dup2(fo_fd, 0) < 0 ||
        dup2(env_fd, 1) < 0)
        _exit(71);
    execl(queue, queue, (char *)NULL);
    _exit(71);
}
