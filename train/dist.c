/* train/dist.c: data-parallel ranks (see dist.h): the launcher environment, the TCP star between
 * rank 0 and the others, the backend communicator, the sums and the `--nproc` launcher.
 *
 * Wire format on a link (host byte order: the ranks of a run are one build on one kind of host):
 * a peer's hello is {magic u32, rank i32, world i32}; a collective is the raw bytes of the buffer,
 * peer -> rank 0, then the result rank 0 -> every peer, in rank order; the communicator id is
 * QLR_COMM_ID_BYTES sent by rank 0 after the hellos. Every read has a deadline (QLR_DIST_TIMEOUT)
 * and a closed link names its rank, so a dead peer never hangs the others. */
#define _GNU_SOURCE
#include "train/dist.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/core.h"

#define DIST_MAGIC 0x514c5244u /* "QLRD" */

struct qlr_dist {
    qlr_dist_env env;
    qlr_backend *be;
    int *fd;          /* rank 0: [world] links to each rank (fd[0] unused); others: fd[0] to rank 0 */
    void *comm;       /* the backend's communicator, or NULL */
    double timeout_s;
    float *host;      /* staging for host-path sums */
    int64_t host_cap;
};

static double dist_timeout(void) {
    const char *t = getenv("QLR_DIST_TIMEOUT");
    double v = t ? atof(t) : 0;
    return v > 0 ? v : 300.0;
}

/* ------------------------------------------------------------------ environment */

static int env_int(const char *name, int *out) {
    const char *v = getenv(name);
    if (!v || !*v) return 0;
    char *end;
    long x = strtol(v, &end, 10);
    if (*end || x < 0 || x > 1000000) return -1;
    *out = (int)x;
    return 1;
}

qlr_status qlr_dist_env_read(qlr_dist_env *e) {
    memset(e, 0, sizeof e[0]);
    e->world = 1;
    e->source = "none";
    static const struct {
        const char *rank, *world, *local, *source;
    } k[] = {{"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "mpirun"},
             {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "srun"},
             {"RANK", "WORLD_SIZE", "LOCAL_RANK", "torchrun"}};
    for (size_t i = 0; i < sizeof k / sizeof k[0]; i++) {
        int r = 0, w = 0, l = 0;
        int hr = env_int(k[i].rank, &r), hw = env_int(k[i].world, &w), hl = env_int(k[i].local, &l);
        if (!hr && !hw) continue;
        if (hr < 0 || hw < 0 || hl < 0 || hr == 0 || hw == 0)
            return qlr_errorf(QLR_ERR_INVALID, "%s=%s, %s=%s: both must be set to whole numbers "
                              "(%s launcher)", k[i].rank, getenv(k[i].rank) ? getenv(k[i].rank) : "",
                              k[i].world, getenv(k[i].world) ? getenv(k[i].world) : "", k[i].source);
        if (w < 1 || r >= w)
            return qlr_errorf(QLR_ERR_INVALID, "%s=%d is outside the world of %s=%d", k[i].rank, r,
                              k[i].world, w);
        e->rank = r;
        e->world = w;
        e->local_rank = hl ? l : r;
        e->source = getenv("QLR_DIST_LAUNCHER") ? "qlora --nproc" : k[i].source;
        break;
    }
    const char *addr = getenv("MASTER_ADDR");
    if (!addr && !strcmp(e->source, "srun")) addr = getenv("SLURM_LAUNCH_NODE_IPADDR");
    snprintf(e->master_addr, sizeof e->master_addr, "%s", addr ? addr : "127.0.0.1");
    int port = 29500, hp = env_int("MASTER_PORT", &port);
    if (hp < 0 || (hp && (port < 1 || port > 65535)))
        return qlr_errorf(QLR_ERR_INVALID, "MASTER_PORT=%s: expected a port number 1..65535",
                          getenv("MASTER_PORT"));
    e->master_port = port;
    if (e->world > 1 && !addr)
        return qlr_errorf(QLR_ERR_INVALID, "%d ranks (%s) but no MASTER_ADDR: set MASTER_ADDR and "
                          "MASTER_PORT to rank 0's address (or use qlora train --nproc N on one host)",
                          e->world, e->source);
    return QLR_OK;
}

/* ------------------------------------------------------------------ links */

/* Waits until fd is readable (or writable) or the deadline passes. */
static qlr_status wait_fd(qlr_dist *d, int fd, short ev, int peer) {
    struct pollfd p = {fd, ev, 0};
    int ms = (int)(d->timeout_s * 1000);
    for (;;) {
        int r = poll(&p, 1, ms);
        if (r > 0) return QLR_OK;
        if (r == 0)
            return qlr_errorf(QLR_ERR_IO, "rank %d: no answer from rank %d for %.0f s (QLR_DIST_TIMEOUT)",
                              d->env.rank, peer, d->timeout_s);
        if (errno != EINTR) return qlr_errorf(QLR_ERR_IO, "poll: %s", strerror(errno));
    }
}

static qlr_status send_all(qlr_dist *d, int fd, const void *buf, size_t n, int peer) {
    const char *p = buf;
    while (n) {
        QLR_TRY(wait_fd(d, fd, POLLOUT, peer));
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (w <= 0)
            return qlr_errorf(QLR_ERR_IO, "rank %d: the link to rank %d broke (%s): it stopped or died",
                              d->env.rank, peer, w < 0 ? strerror(errno) : "closed");
        p += w, n -= (size_t)w;
    }
    return QLR_OK;
}

static qlr_status recv_all(qlr_dist *d, int fd, void *buf, size_t n, int peer) {
    char *p = buf;
    while (n) {
        QLR_TRY(wait_fd(d, fd, POLLIN, peer));
        ssize_t r = recv(fd, p, n, 0);
        if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (r <= 0)
            return qlr_errorf(QLR_ERR_IO, "rank %d: rank %d closed its link (%s): it stopped or died",
                              d->env.rank, peer, r < 0 ? strerror(errno) : "end of stream");
        p += r, n -= (size_t)r;
    }
    return QLR_OK;
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static qlr_status listen_accept(qlr_dist *d) {
    const qlr_dist_env *e = &d->env;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) return qlr_errorf(QLR_ERR_IO, "socket: %s", strerror(errno));
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)e->master_port);
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, e->world)) {
        qlr_status st = qlr_errorf(QLR_ERR_IO, "rank 0: cannot listen on port %d (MASTER_PORT): %s",
                                   e->master_port, strerror(errno));
        close(s);
        return st;
    }
    qlr_status st = QLR_OK;
    for (int got = 1; got < e->world && st == QLR_OK; got++) {
        if ((st = wait_fd(d, s, POLLIN, -1))) {
            qlr_error_prefix("rank 0: %d of %d ranks connected", got - 1, e->world - 1);
            break;
        }
        int c = accept(s, NULL, NULL);
        if (c < 0) {
            st = qlr_errorf(QLR_ERR_IO, "accept: %s", strerror(errno));
            break;
        }
        nodelay(c);
        int32_t hello[3];
        if ((st = recv_all(d, c, hello, sizeof hello, -1))) {
            close(c);
            break;
        }
        if ((uint32_t)hello[0] != DIST_MAGIC || hello[2] != e->world || hello[1] < 1 ||
            hello[1] >= e->world || d->fd[hello[1]] >= 0) {
            st = qlr_errorf(QLR_ERR_INVALID, "rank 0: a peer introduced itself as rank %d of %d "
                            "(this run has %d ranks; another run on port %d?)", hello[1], hello[2],
                            e->world, e->master_port);
            close(c);
            break;
        }
        d->fd[hello[1]] = c;
    }
    close(s);
    return st;
}

static qlr_status connect_rank0(qlr_dist *d) {
    const qlr_dist_env *e = &d->env;
    char port[16];
    snprintf(port, sizeof port, "%d", e->master_port);
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    int g = getaddrinfo(e->master_addr, port, &hints, &res);
    if (g) return qlr_errorf(QLR_ERR_IO, "MASTER_ADDR=%s: %s", e->master_addr, gai_strerror(g));
    double t0 = qlr_now();
    int fd = -1;
    while (fd < 0) {
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0) break;
        if (fd >= 0) close(fd);
        fd = -1;
        if (qlr_now() - t0 > d->timeout_s) {
            freeaddrinfo(res);
            return qlr_errorf(QLR_ERR_IO, "rank %d: rank 0 is not listening at %s:%d after %.0f s",
                              e->rank, e->master_addr, e->master_port, d->timeout_s);
        }
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    freeaddrinfo(res);
    nodelay(fd);
    d->fd[0] = fd;
    int32_t hello[3] = {(int32_t)DIST_MAGIC, e->rank, e->world};
    return send_all(d, fd, hello, sizeof hello, 0);
}

/* ------------------------------------------------------------------ open / close */

qlr_status qlr_dist_open(const qlr_dist_env *e, qlr_backend *be, int force_comm, qlr_dist **out) {
    *out = NULL;
    qlr_dist *d = calloc(1, sizeof *d);
    if (!d) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    d->env = *e;
    d->be = be;
    d->timeout_s = dist_timeout();
    d->fd = malloc(sizeof(int) * (size_t)(e->world > 1 ? e->world : 1));
    if (!d->fd) {
        free(d);
        return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    for (int i = 0; i < (e->world > 1 ? e->world : 1); i++) d->fd[i] = -1;
    qlr_status st = QLR_OK;
    if (e->world > 1) st = e->rank == 0 ? listen_accept(d) : connect_rank0(d);
    int want_comm = be->ops.comm_create && (e->world > 1 || force_comm);
    if (st == QLR_OK && want_comm) {
        uint8_t id[QLR_COMM_ID_BYTES];
        if (e->rank == 0) {
            st = be->ops.comm_id(be, id);
            for (int r = 1; st == QLR_OK && r < e->world; r++) st = send_all(d, d->fd[r], id, sizeof id, r);
        } else {
            st = recv_all(d, d->fd[0], id, sizeof id, 0);
        }
        if (st == QLR_OK) st = be->ops.comm_create(be, id, e->rank, e->world, &d->comm);
    }
    if (st) {
        qlr_error_prefix("rank %d of %d (%s)", e->rank, e->world, e->source);
        qlr_dist_close(d, 1);
        return st;
    }
    QLR_LOGI("data parallel: rank %d of %d (%s, %s)", e->rank, e->world, e->source,
             d->comm ? "gradients through the backend's communicator" : "gradients through TCP");
    *out = d;
    return QLR_OK;
}

void qlr_dist_close(qlr_dist *d, int abort) {
    if (!d) return;
    if (d->comm) d->be->ops.comm_destroy(d->be, d->comm, abort);
    for (int i = 0; i < (d->env.world > 1 ? d->env.world : 1); i++)
        if (d->fd[i] >= 0) close(d->fd[i]);
    free(d->fd);
    free(d->host);
    free(d);
}

int qlr_dist_rank(const qlr_dist *d) { return d ? d->env.rank : 0; }
int qlr_dist_world(const qlr_dist *d) { return d ? d->env.world : 1; }
int qlr_dist_device_comm(const qlr_dist *d) { return d && d->comm; }

/* ------------------------------------------------------------------ sums */

/* A peer whose link reached end of stream (it died or exited), or -1. Never blocks. */
static int dead_peer(const qlr_dist *d) {
    int lo = d->env.rank == 0 ? 1 : 0, hi = d->env.rank == 0 ? d->env.world : 1;
    for (int r = lo; r < hi; r++) {
        char c;
        ssize_t n = recv(d->fd[r], &c, 1, MSG_PEEK | MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            return d->env.rank == 0 ? r : 0;
    }
    return -1;
}

/* The host path: rank 0 adds every rank's buffer in rank order and sends the result back. */
static qlr_status host_sum(qlr_dist *d, void *buf, int64_t n, size_t elem, qlr_dist_op op) {
    size_t bytes = (size_t)n * elem;
    if (d->env.rank != 0) {
        QLR_TRY(send_all(d, d->fd[0], buf, bytes, 0));
        return recv_all(d, d->fd[0], buf, bytes, 0);
    }
    void *tmp = malloc(bytes ? bytes : 1);
    if (!tmp) return qlr_errorf(QLR_ERR_NOMEM, "out of memory (%zu bytes)", bytes);
    qlr_status st = QLR_OK;
    for (int r = 1; r < d->env.world && st == QLR_OK; r++) {
        if ((st = recv_all(d, d->fd[r], tmp, bytes, r))) break;
        for (int64_t i = 0; i < n; i++) {
            if (elem == 4) ((float *)buf)[i] += ((const float *)tmp)[i];
            else if (op == QLR_DIST_MAX) {
                double a = ((double *)buf)[i], b = ((const double *)tmp)[i];
                ((double *)buf)[i] = b > a ? b : a;
            } else {
                ((double *)buf)[i] += ((const double *)tmp)[i];
            }
        }
    }
    free(tmp);
    for (int r = 1; r < d->env.world && st == QLR_OK; r++) st = send_all(d, d->fd[r], buf, bytes, r);
    return st;
}

qlr_status qlr_dist_allreduce_f32(qlr_dist *d, float *x, int64_t n) {
    if (!d || n <= 0) return QLR_OK;
    qlr_backend *be = d->be;
    if (d->comm) {
        QLR_TRY(be->ops.allreduce_sum_f32(be, d->comm, x, n));
        /* wait for it while watching the peers: a dead one never completes the sum */
        double t0 = qlr_now();
        for (;;) {
            qlr_status st = be->ops.comm_poll(be, d->comm);
            if (st == QLR_OK) return QLR_OK;
            if (st != QLR_ERR_BUSY) return qlr_error_prefix("rank %d: gradient sum", d->env.rank);
            qlr_error_clear();
            int dead = d->env.world > 1 ? dead_peer(d) : -1;
            if (dead >= 0)
                return qlr_errorf(QLR_ERR_IO, "rank %d: rank %d stopped or died during the gradient "
                                  "sum", d->env.rank, dead);
            if (qlr_now() - t0 > d->timeout_s)
                return qlr_errorf(QLR_ERR_IO, "rank %d: the gradient sum did not finish in %.0f s "
                                  "(QLR_DIST_TIMEOUT)", d->env.rank, d->timeout_s);
            struct timespec ts = {0, 200 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    if (d->env.world == 1) return QLR_OK;
    float *h = x;
    if (!be->host_visible) {
        if (n > d->host_cap) {
            float *nh = realloc(d->host, (size_t)n * 4);
            if (!nh) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
            d->host = nh;
            d->host_cap = n;
        }
        h = d->host;
        QLR_TRY(be->mem.d2h(be, h, x, (size_t)n * 4));
        QLR_TRY(be->mem.sync(be));
    } else {
        QLR_TRY(be->mem.sync(be));
    }
    QLR_TRY(host_sum(d, h, n, 4, QLR_DIST_SUM));
    if (!be->host_visible) QLR_TRY(be->mem.h2d(be, x, h, (size_t)n * 4));
    return QLR_OK;
}

qlr_status qlr_dist_allreduce_host(qlr_dist *d, double *x, int n, qlr_dist_op op) {
    if (!d || d->env.world == 1 || n <= 0) return QLR_OK;
    return host_sum(d, x, n, 8, op);
}

/* ------------------------------------------------------------------ --nproc */

static volatile sig_atomic_t g_fwd_sig;
static void on_sig(int s) { g_fwd_sig = s; }

static int free_port(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    int port = 0;
    if (s >= 0 && bind(s, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(s, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    if (s >= 0) close(s);
    return port;
}

static const char *status_text(int status, char *buf, size_t n) {
    if (WIFEXITED(status)) snprintf(buf, n, "exit status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status)) snprintf(buf, n, "signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
    else snprintf(buf, n, "status %d", status);
    return buf;
}

int qlr_dist_launch(int nproc, char **argv) {
    int port = free_port();
    if (!port) {
        fprintf(stderr, "qlora: --nproc: no free port on 127.0.0.1\n");
        return 1;
    }
    pid_t *pid = calloc((size_t)nproc, sizeof *pid);
    if (!pid) return 1;
    struct sigaction sa, old_int, old_term;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sig;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    char portbuf[16], world[16];
    snprintf(portbuf, sizeof portbuf, "%d", port);
    snprintf(world, sizeof world, "%d", nproc);
    for (int r = 0; r < nproc; r++) {
        pid[r] = fork();
        if (pid[r] == 0) {
            char rank[16];
            snprintf(rank, sizeof rank, "%d", r);
            setenv("RANK", rank, 1);
            setenv("LOCAL_RANK", rank, 1);
            setenv("WORLD_SIZE", world, 1);
            setenv("MASTER_ADDR", "127.0.0.1", 1);
            setenv("MASTER_PORT", portbuf, 1);
            setenv("QLR_DIST_LAUNCHER", "1", 1);
            signal(SIGINT, SIG_DFL);
            signal(SIGTERM, SIG_DFL);
            /* its own process group: a terminal's Ctrl-C reaches the launcher, which forwards it
             * once; and it ends when the launcher dies */
            setpgid(0, 0);
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            execv("/proc/self/exe", argv);
            fprintf(stderr, "qlora: --nproc: cannot run /proc/self/exe: %s\n", strerror(errno));
            _exit(127);
        }
        if (pid[r] < 0) {
            fprintf(stderr, "qlora: --nproc: fork: %s\n", strerror(errno));
            for (int k = 0; k < r; k++) kill(pid[k], SIGKILL);
            free(pid);
            return 1;
        }
    }
    int left = nproc, rc = 0, failed = -1;
    double kill_at = 0;
    while (left > 0) {
        if (g_fwd_sig) {
            for (int r = 0; r < nproc; r++)
                if (pid[r] > 0) kill(pid[r], g_fwd_sig);
            g_fwd_sig = 0;
        }
        int status;
        pid_t p = waitpid(-1, &status, WNOHANG);
        if (p > 0) {
            int r = 0;
            while (r < nproc && pid[r] != p) r++;
            if (r == nproc) continue;
            pid[r] = 0;
            left--;
            int bad = !WIFEXITED(status) || WEXITSTATUS(status) != 0;
            if (bad && failed < 0) {
                char why[96];
                failed = r;
                rc = WIFEXITED(status) ? WEXITSTATUS(status) : 1;
                fprintf(stderr, "qlora: rank %d of %d failed (%s): stopping the other ranks\n", r, nproc,
                        status_text(status, why, sizeof why));
                for (int k = 0; k < nproc; k++)
                    if (pid[k] > 0) kill(pid[k], SIGTERM);
                kill_at = qlr_now() + 30;
            }
            continue;
        }
        if (kill_at > 0 && qlr_now() > kill_at) {
            for (int k = 0; k < nproc; k++)
                if (pid[k] > 0) kill(pid[k], SIGKILL);
            kill_at = 0;
        }
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    free(pid);
    return rc ? rc : (failed >= 0 ? 1 : 0);
}
