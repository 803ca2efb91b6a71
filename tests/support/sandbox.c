/* sandbox ALLOWED_FILE COMMAND [ARG...]: run COMMAND under a seccomp filter that allows
 * only the system calls named in ALLOWED_FILE (whitespace-separated) and answers every
 * other with EPERM, as systemd does for a unit with SystemCallFilter= and
 * SystemCallErrorNumber=EPERM. Names this architecture lacks are skipped.
 * Built by tests/test_worker.py with `gcc ... -lseccomp` (Debian: libseccomp-dev). */
#include <errno.h>
#include <seccomp.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s ALLOWED_FILE COMMAND [ARG...]\n", argv[0]);
        return 2;
    }
    FILE *names = fopen(argv[1], "r");
    if (names == NULL) {
        perror(argv[1]);
        return 2;
    }
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ERRNO(EPERM));
    if (ctx == NULL) {
        fprintf(stderr, "seccomp_init failed\n");
        return 2;
    }
    char name[128];
    while (fscanf(names, "%127s", name) == 1) {
        int nr = seccomp_syscall_resolve_name(name);
        if (nr == __NR_SCMP_ERROR)
            continue;
        if (seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0) < 0) {
            fprintf(stderr, "seccomp_rule_add %s failed\n", name);
            return 2;
        }
    }
    fclose(names);
    if (seccomp_load(ctx) < 0) {
        fprintf(stderr, "seccomp_load failed\n");
        return 2;
    }
    execvp(argv[2], argv + 2);
    perror(argv[2]);
    return 127;
}
