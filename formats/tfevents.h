/* formats/tfevents.h: TensorBoard event files (`report_to: tensorboard`), written directly.
 *
 * An event file is a sequence of TFRecords: uint64 length (little-endian), the masked crc32c of
 * those 8 bytes, the payload, the masked crc32c of the payload. Each payload is one serialized
 * tensorflow.Event protobuf; we write the few fields scalars need by hand:
 *   Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
 *             Summary summary = 5; SessionLog session_log = 7; }
 *   Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }
 *   SessionLog { Status status = 1; }        (START = 1: TensorBoard drops what an earlier
 *                                             file logged at this step or later, as on a resume)
 * The first record is file_version "brain.Event:2". Every record is flushed, so TensorBoard can
 * watch a run live; a crash can only cut the last record short, which readers skip. Reading is
 * not ours: the test reads the files back with the `tensorboard` package. */
#ifndef QLR_FORMATS_TFEVENTS_H
#define QLR_FORMATS_TFEVENTS_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

typedef struct qlr_tfevents qlr_tfevents;

/* Creates `dir` (mkdir -p) and a new file events.out.tfevents.<unix seconds>.<host>.<pid>.qlora
 * in it, holding the file_version record. QLR_ERR_IO with the path on failure. */
qlr_status qlr_tfevents_open(const char *dir, qlr_tfevents **w);
/* The file's path (valid until close). */
const char *qlr_tfevents_path(const qlr_tfevents *w);
/* One event at `step` holding n scalars (tags[i] -> values[i]); wall_time in seconds since the
 * epoch. Tags are written as given ("train/loss"). QLR_ERR_IO on a failed write. */
qlr_status qlr_tfevents_scalars(qlr_tfevents *w, int64_t step, double wall_time, const char *const *tags,
                                const float *values, int n);
/* A SessionLog START at `step`: a resumed run says where it restarts. */
qlr_status qlr_tfevents_restart(qlr_tfevents *w, int64_t step, double wall_time);
/* Closes the file; safe on NULL. */
void qlr_tfevents_close(qlr_tfevents *w);

/* crc32c (Castagnoli, reflected 0x82F63B78) continuing from `crc` (start with 0), and TFRecord's
 * mask of it: ((crc >> 15) | (crc << 17)) + 0xa282ead8. */
uint32_t qlr_crc32c(uint32_t crc, const void *data, size_t n);
uint32_t qlr_tfrecord_mask(uint32_t crc);

#endif
