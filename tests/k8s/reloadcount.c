/* reloadcount FILE COUNTER: a stand-in for an app that reloads its secrets on SIGHUP.
 *
 * Its process name (/proc/PID/comm) is its executable's name, "reloadcount", which is what a
 * vaultfs volume names in `reloadProcess`. At start it prints FILE once; on every SIGHUP it
 * counts the signal into COUNTER (rewritten with the new count) and prints FILE again. Each line
 * on stdout starts with the host's CLOCK_BOOTTIME (the clock /proc/uptime shows, the same in
 * every container of the node), then the event and FILE's content with newlines as '|':
 *     12345.678 start 0 user=app|password=v1|
 *     12347.012 hup 1 user=app|password=v2|
 * Built with `gcc -static` by tests/k8s/image.sh; SIGTERM exits 0.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t hups, stop;

static void on_hup(int sig) { (void)sig; hups++; }
static void on_term(int sig) { (void)sig; stop = 1; }

static void report(const char *event, long count, const char *file) {
    char buf[4096];
    size_t n = 0;
    FILE *f = fopen(file, "r");
    if (f) {
        n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
    }
    buf[n] = 0;
    for (size_t i = 0; i < n; i++)
        if (buf[i] == '\n') buf[i] = '|';
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    printf("%ld.%03ld %s %ld %s\n", (long)ts.tv_sec, ts.tv_nsec / 1000000, event, count,
           f ? buf : "(unreadable)");
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: reloadcount FILE COUNTER\n");
        return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_hup;
    sigaction(SIGHUP, &sa, NULL);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGHUP);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &old);

    long seen = 0;
    report("start", 0, argv[1]);
    while (!stop) {
        while (!stop && hups == seen)
            sigsuspend(&old); /* atomically unblocks and waits: no signal is missed */
        if (stop) break;
        seen = hups;
        FILE *c = fopen(argv[2], "w");
        if (c) {
            fprintf(c, "%ld\n", seen);
            fclose(c);
        }
        report("hup", seen, argv[1]);
    }
    return 0;
}
