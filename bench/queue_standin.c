/* The benchmarks' qmail-queue.orig: variant (a), the floor every variant pays.
 *
 * It does the part of qmail-queue's contract that costs time without a queue disk:
 * reads the message on fd 0 to end of file, then the envelope on fd 1 with
 * qmail-queue's checks (F first, T before each recipient, an address shorter than
 * 1003 bytes, the final NUL), and exits 0 (accepted), 91, 11 or 54 as qmail-queue does.
 * The tests use tests/qmail_queue_standin.py, which also records what it got; a Python
 * program would add ~15 ms to every variant here and hide what is being measured.
 */
#include <unistd.h>

static char buf[1 << 16];

int main(void) {
    ssize_t n;
    while ((n = read(0, buf, sizeof buf)) > 0)
        ;
    if (n < 0)
        return 54;

    /* Envelope: state 0 = expecting F (sender) or T (recipient) or the final NUL,
     * 1 = inside an address. */
    int state = 0, first = 1;
    long length = 0;
    for (;;) {
        n = read(1, buf, sizeof buf);
        if (n <= 0)
            return 54; /* end of file before the final NUL, or a read error */
        for (ssize_t i = 0; i < n; i++) {
            char c = buf[i];
            if (state == 0) {
                if (first) {
                    if (c != 'F')
                        return 91;
                } else if (c == '\0') {
                    return 0; /* the final NUL: accepted */
                } else if (c != 'T') {
                    return 91;
                }
                first = 0;
                state = 1;
                length = 0;
            } else if (c == '\0') {
                state = 0;
            } else if (++length >= 1003) {
                return 11;
            }
        }
    }
}
