/*
 * pam_aurora_iam: a tiny PAM module for the aurora_dbx local stack.
 *
 * It hands the whole password (an Aurora IAM auth token, ~1 KB, which pam_exec
 * would cut at 512 bytes) and the PAM user to the stack's token verifier over a
 * unix socket and succeeds only when the verifier answers an explicit "OK".
 *
 * Module arguments:
 *   socket=/path/to/verifier.sock   unix socket of the verifier (required)
 *   endpoint=localhost:PORT         the server endpoint the token must be minted for (required)
 *   timeout=SECONDS                 socket timeout (default 10)
 *
 * Wire protocol (request): the ASCII magic "AIAM1", then three fields, each a
 * 4-byte big-endian length followed by that many bytes: endpoint, user, token.
 * Response: a line starting with "OK" (allow) or anything else (deny).
 *
 * Built by aurora_dbx.local_stack at stack start:
 *   gcc -shared -fPIC -O2 -o pam_aurora_iam.so pam_aurora_iam.c -lpam
 */
#define PAM_SM_AUTH
#define PAM_SM_ACCOUNT

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <syslog.h>
#include <unistd.h>

#include <security/pam_ext.h>
#include <security/pam_modules.h>

static int write_all(int fd, const void *buf, size_t len) {
    const char *p = (const char *)buf;
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int write_field(int fd, const char *s) {
    size_t len = strlen(s);
    unsigned char hdr[4];
    hdr[0] = (unsigned char)((len >> 24) & 0xff);
    hdr[1] = (unsigned char)((len >> 16) & 0xff);
    hdr[2] = (unsigned char)((len >> 8) & 0xff);
    hdr[3] = (unsigned char)(len & 0xff);
    if (write_all(fd, hdr, 4) != 0) return -1;
    return write_all(fd, s, len);
}

static int ask_verifier(const char *sock_path, const char *endpoint, const char *user,
                        const char *token, int timeout_s) {
    struct sockaddr_un addr;
    struct timeval tv;
    char reply[64];
    size_t got = 0;
    int fd;

    if (strlen(sock_path) >= sizeof(addr.sun_path)) return 0;
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) return 0;
    tv.tv_sec = timeout_s;
    tv.tv_usec = 0;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    strncpy(addr.sun_path, sock_path, sizeof(addr.sun_path) - 1);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
        close(fd);
        return 0;
    }
    if (write_all(fd, "AIAM1", 5) != 0 || write_field(fd, endpoint) != 0 ||
        write_field(fd, user) != 0 || write_field(fd, token) != 0) {
        close(fd);
        return 0;
    }
    shutdown(fd, SHUT_WR);
    while (got < sizeof(reply) - 1) {
        ssize_t n = recv(fd, reply + got, sizeof(reply) - 1 - got, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        got += (size_t)n;
    }
    close(fd);
    reply[got] = '\0';
    return got >= 2 && reply[0] == 'O' && reply[1] == 'K';
}

PAM_EXTERN int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    const char *sock_path = NULL;
    const char *endpoint = NULL;
    const char *user = NULL;
    const char *token = NULL;
    int timeout_s = 10;
    int i;
    (void)flags;

    for (i = 0; i < argc; i++) {
        if (strncmp(argv[i], "socket=", 7) == 0) sock_path = argv[i] + 7;
        else if (strncmp(argv[i], "endpoint=", 9) == 0) endpoint = argv[i] + 9;
        else if (strncmp(argv[i], "timeout=", 8) == 0) timeout_s = atoi(argv[i] + 8);
    }
    if (sock_path == NULL || endpoint == NULL) {
        pam_syslog(pamh, LOG_ERR, "pam_aurora_iam: socket= and endpoint= are required");
        return PAM_AUTH_ERR;
    }
    if (timeout_s <= 0) timeout_s = 10;
    if (pam_get_user(pamh, &user, NULL) != PAM_SUCCESS || user == NULL || user[0] == '\0')
        return PAM_AUTH_ERR;
    if (pam_get_authtok(pamh, PAM_AUTHTOK, &token, NULL) != PAM_SUCCESS || token == NULL ||
        token[0] == '\0')
        return PAM_AUTH_ERR;
    return ask_verifier(sock_path, endpoint, user, token, timeout_s) ? PAM_SUCCESS : PAM_AUTH_ERR;
}

PAM_EXTERN int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_SUCCESS;
}

PAM_EXTERN int pam_sm_acct_mgmt(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_SUCCESS;
}
