/* formats/tfevents.c: TensorBoard event files (see tfevents.h): the protobuf fields written by
 * hand (varints, fixed64/fixed32 little-endian, length-delimited), framed as TFRecords with
 * crc32c. */
#define _GNU_SOURCE
#include "formats/tfevents.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/file.h"
#include "core/strbuf.h"

struct qlr_tfevents {
    FILE *f;
    char *path;
};

/* ------------------------------------------------------------------ crc32c */

static uint32_t g_crc32c[256];

static void crc32c_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        g_crc32c[i] = c;
    }
}

uint32_t qlr_crc32c(uint32_t crc, const void *data, size_t n) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, crc32c_init);
    const uint8_t *p = data;
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = g_crc32c[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}

uint32_t qlr_tfrecord_mask(uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; }

/* ------------------------------------------------------------------ protobuf fields */

static void put_varint(qlr_strbuf *b, uint64_t v) {
    char buf[10];
    int n = 0;
    do {
        buf[n++] = (char)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
        v >>= 7;
    } while (v);
    qlr_strbuf_put(b, buf, (size_t)n);
}

static void put_le(qlr_strbuf *b, uint64_t v, int bytes) {
    char buf[8];
    for (int i = 0; i < bytes; i++) buf[i] = (char)(v >> (8 * i));
    qlr_strbuf_put(b, buf, (size_t)bytes);
}

/* key = field number << 3 | wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32) */
static void put_key(qlr_strbuf *b, int field, int wire) { put_varint(b, (uint64_t)(field << 3 | wire)); }

static void put_bytes_field(qlr_strbuf *b, int field, const char *data, size_t n) {
    put_key(b, field, 2);
    put_varint(b, n);
    qlr_strbuf_put(b, data, n);
}

/* Event.wall_time (1, double) and Event.step (2, int64). */
static void put_event_head(qlr_strbuf *b, double wall_time, int64_t step) {
    uint64_t bits;
    memcpy(&bits, &wall_time, 8);
    put_key(b, 1, 1);
    put_le(b, bits, 8);
    put_key(b, 2, 0);
    put_varint(b, (uint64_t)step);
}

/* ------------------------------------------------------------------ records */

static qlr_status write_record(qlr_tfevents *w, const qlr_strbuf *payload) {
    if (payload->oom) return qlr_errorf(QLR_ERR_NOMEM, "out of memory writing %s", w->path);
    uint8_t head[12];
    uint64_t n = payload->n;
    for (int i = 0; i < 8; i++) head[i] = (uint8_t)(n >> (8 * i));
    uint32_t hc = qlr_tfrecord_mask(qlr_crc32c(0, head, 8));
    for (int i = 0; i < 4; i++) head[8 + i] = (uint8_t)(hc >> (8 * i));
    uint32_t dc = qlr_tfrecord_mask(qlr_crc32c(0, payload->p, payload->n));
    uint8_t tail[4];
    for (int i = 0; i < 4; i++) tail[i] = (uint8_t)(dc >> (8 * i));
    int ok = fwrite(head, 1, 12, w->f) == 12 && (!n || fwrite(payload->p, 1, n, w->f) == n) &&
             fwrite(tail, 1, 4, w->f) == 4 && fflush(w->f) == 0;
    return ok ? QLR_OK : qlr_errorf(QLR_ERR_IO, "%s: write failed: %s", w->path, strerror(errno));
}

qlr_status qlr_tfevents_open(const char *dir, qlr_tfevents **out) {
    *out = NULL;
    QLR_TRY(qlr_mkdir_p(dir));
    char host[256] = "localhost";
    if (gethostname(host, sizeof host - 1) != 0) snprintf(host, sizeof host, "localhost");
    host[sizeof host - 1] = 0;
    for (char *c = host; *c; c++)
        if (*c == '/') *c = '_';
    qlr_tfevents *w = calloc(1, sizeof *w);
    if (!w || asprintf(&w->path, "%s/events.out.tfevents.%lld.%s.%d.qlora", dir, (long long)time(NULL), host,
                       (int)getpid()) < 0) {
        free(w);
        return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    w->f = fopen(w->path, "wbx");
    if (!w->f) {
        qlr_status st = qlr_errorf(QLR_ERR_IO, "%s: cannot create: %s", w->path, strerror(errno));
        free(w->path);
        free(w);
        return st;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    qlr_strbuf b = {0};
    put_event_head(&b, (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec, 0);
    put_bytes_field(&b, 3, "brain.Event:2", 13);
    qlr_status st = write_record(w, &b);
    qlr_strbuf_free(&b);
    if (st) {
        qlr_tfevents_close(w);
        return st;
    }
    *out = w;
    return QLR_OK;
}

const char *qlr_tfevents_path(const qlr_tfevents *w) { return w->path; }

qlr_status qlr_tfevents_scalars(qlr_tfevents *w, int64_t step, double wall_time, const char *const *tags,
                                const float *values, int n) {
    qlr_strbuf sum = {0}, val = {0}, ev = {0};
    for (int i = 0; i < n; i++) {
        val.n = 0;
        put_bytes_field(&val, 1, tags[i], strlen(tags[i]));
        uint32_t bits;
        memcpy(&bits, &values[i], 4);
        put_key(&val, 2, 5);
        put_le(&val, bits, 4);
        put_bytes_field(&sum, 1, val.p ? val.p : "", val.n);
        sum.oom |= val.oom;
    }
    put_event_head(&ev, wall_time, step);
    put_bytes_field(&ev, 5, sum.p ? sum.p : "", sum.n);
    ev.oom |= sum.oom;
    qlr_status st = write_record(w, &ev);
    qlr_strbuf_free(&sum);
    qlr_strbuf_free(&val);
    qlr_strbuf_free(&ev);
    return st;
}

qlr_status qlr_tfevents_restart(qlr_tfevents *w, int64_t step, double wall_time) {
    qlr_strbuf log = {0}, ev = {0};
    put_key(&log, 1, 0);
    put_varint(&log, 1); /* SessionLog.START */
    put_event_head(&ev, wall_time, step);
    put_bytes_field(&ev, 7, log.p, log.n); /* Event.session_log (6 is the deprecated log_message) */
    ev.oom |= log.oom;
    qlr_status st = write_record(w, &ev);
    qlr_strbuf_free(&log);
    qlr_strbuf_free(&ev);
    return st;
}

void qlr_tfevents_close(qlr_tfevents *w) {
    if (!w) return;
    if (w->f) fclose(w->f);
    free(w->path);
    free(w);
}
