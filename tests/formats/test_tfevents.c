/* tests/formats/test_tfevents.c: formats/tfevents.h. crc32c against its standard check value,
 * the TFRecord framing (lengths and masked crc32c of every record) and the Event bytes of a
 * scalar and a restart event against bytes written out by hand from the protobuf encoding
 * rules. (tests/e2e/test_e2e_quickstart.py reads a training run's files with the tensorboard
 * package.) */
#define _GNU_SOURCE
#include "core/core.h"
#include "formats/tfevents.h"
#include "tests/test_util.h"

#include <stdlib.h>
#include <string.h>

static uint32_t le32(const uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

int main(void) {
    CHECK_EQ_INT(qlr_crc32c(0, "123456789", 9), 0xE3069283u); /* the crc32c check value */
    CHECK_EQ_INT(qlr_crc32c(qlr_crc32c(0, "1234", 4), "56789", 5), 0xE3069283u);
    CHECK_EQ_INT(qlr_crc32c(0, "", 0), 0);
    CHECK_EQ_INT(qlr_tfrecord_mask(0), 0xa282ead8u);
    CHECK_EQ_INT(qlr_tfrecord_mask(0x12345678u), ((0x12345678u >> 15) | (0x12345678u << 17)) + 0xa282ead8u);

    char dir[512];
    snprintf(dir, sizeof dir, "%s/runs/deep", test_tmpdir());
    qlr_tfevents *w = NULL;
    CHECK_OK(qlr_tfevents_open(dir, &w));
    if (!w) return test_finish();
    char path[1024];
    snprintf(path, sizeof path, "%s", qlr_tfevents_path(w));
    CHECK_MSG(strstr(path, "/runs/deep/events.out.tfevents.") && strstr(path, ".qlora"), "%s", path);
    const char *tags[] = {"a", "train/loss"};
    const float vals[] = {2.0f, 0.5f};
    CHECK_OK(qlr_tfevents_scalars(w, 3, 1.5, tags, vals, 1));
    CHECK_OK(qlr_tfevents_scalars(w, 4, 2.0, tags, vals, 2));
    CHECK_OK(qlr_tfevents_restart(w, 300, 1.5));
    qlr_tfevents_close(w);

    /* the payloads, from the protobuf wire format (key = field << 3 | wire type) */
    static const uint8_t head15[] = {0x09, 0, 0, 0, 0, 0, 0, 0xF8, 0x3F}; /* wall_time 1.5 */
    static const uint8_t ev3[] = {0x09, 0,    0,    0,    0,    0,    0,    0xF8, 0x3F, /* wall_time */
                                  0x10, 0x03,                                       /* step 3 */
                                  0x2A, 0x0A,                                       /* summary, 10 bytes */
                                  0x0A, 0x08,                                       /* value, 8 bytes */
                                  0x0A, 0x01, 'a',                                  /* tag "a" */
                                  0x15, 0x00, 0x00, 0x00, 0x40};                    /* simple_value 2.0f */
    static const uint8_t restart[] = {0x09, 0, 0, 0, 0, 0, 0, 0xF8, 0x3F, 0x10, 0xAC, 0x02, /* step 300 */
                                      0x3A, 0x02, 0x08, 0x01}; /* session_log (7) { status: START } */
    char *data = NULL;
    size_t n = 0;
    CHECK_OK(qlr_file_read_all(path, 1 << 20, &data, &n));
    const uint8_t *p = (const uint8_t *)data;
    size_t off = 0;
    int rec = 0;
    while (data && off + 12 <= n) {
        uint64_t len = 0;
        for (int i = 0; i < 8; i++) len |= (uint64_t)p[off + i] << (8 * i);
        CHECK_EQ_INT(le32(p + off + 8), qlr_tfrecord_mask(qlr_crc32c(0, p + off, 8)));
        CHECK_MSG(off + 12 + len + 4 <= n, "record %d runs past the end", rec);
        if (off + 12 + len + 4 > n) break;
        const uint8_t *d = p + off + 12;
        CHECK_EQ_INT(le32(d + len), qlr_tfrecord_mask(qlr_crc32c(0, d, len)));
        if (rec == 0) /* file_version "brain.Event:2" after wall_time and step 0 */
            CHECK(len == 9 + 2 + 2 + 13 && d[9] == 0x10 && d[10] == 0 && d[11] == 0x1A && d[12] == 13 &&
                  !memcmp(d + 13, "brain.Event:2", 13));
        if (rec == 1) CHECK(len == sizeof ev3 && !memcmp(d, ev3, sizeof ev3));
        if (rec == 2) /* two values; the second tag is "train/loss" with 0.5f */
            CHECK(!memcmp(d, (const uint8_t[]){0x09, 0, 0, 0, 0, 0, 0, 0, 0x40}, 9) && d[9] == 0x10 && d[10] == 4 &&
                  memmem(d, len, "\x0A\x0Atrain/loss\x15\x00\x00\x00\x3F", 17) != NULL);
        if (rec == 3) CHECK(len == sizeof restart && !memcmp(d, restart, sizeof restart) && !memcmp(d, head15, 9));
        off += 12 + len + 4;
        rec++;
    }
    CHECK_EQ_INT(rec, 4);
    CHECK_EQ_INT(off, n);
    free(data);

    /* a folder that cannot be made: the path in the message */
    CHECK(qlr_tfevents_open("/proc/no/such/dir", &w) != QLR_OK && w == NULL);
    CHECK_MSG(strstr(qlr_error_msg(), "/proc/no") != NULL, "%s", qlr_error_msg());
    qlr_error_clear();
    return test_finish();
}
