/* tests/train/test_checkpoint.c: train/checkpoint.h without a model: write/open round trip of
 * the manifest and per-file crc32s, a flipped byte / truncated / missing file refused naming the
 * file, a folder without manifest ignored by find_latest, rotation keeping the newest N complete
 * checkpoints by step number (10 after 9; an incomplete newer folder does not count, incomplete
 * older ones go), and the key-field check naming the field. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/core.h"
#include "tests/test_util.h"
#include "train/checkpoint.h"

static qlr_ckpt_meta meta_for(uint64_t step) {
    qlr_ckpt_meta m;
    memset(&m, 0, sizeof m);
    m.step = step;
    m.epoch = 1;
    m.batch = 17;
    m.rng = 0xfedcba9876543210ull; /* above INT64_MAX: must survive the JSON */
    m.tokens_seen = 12345;
    m.elapsed = 1.5;
    snprintf(m.base_model, sizeof m.base_model, "/models/x.gguf");
    m.lora_r = 16;
    m.lora_targets = 0x7f;
    m.sequence_len = 256;
    return m;
}

static void write_ckpt(const char *out, uint64_t step) {
    qlr_ckpt_writer w;
    CHECK_OK(qlr_ckpt_begin(&w, out, step));
    char data[1000];
    for (int i = 0; i < 1000; i++) data[i] = (char)(i * 7 + (int)step);
    CHECK_OK(qlr_ckpt_add_buffer(&w, "optimizer.bin", data, sizeof data));
    CHECK_OK(qlr_ckpt_add_buffer(&w, "adapter/a.bin", data, 10));
    CHECK_OK(qlr_ckpt_add_buffer(&w, "recipe.yaml", "lora_r: 16\n", 11));
    qlr_ckpt_meta m = meta_for(step);
    CHECK_OK(qlr_ckpt_commit(&w, &m));
}

int main(void) {
    char out[600], dir[700], path[800];
    snprintf(out, sizeof out, "%s/run", test_tmpdir());
    write_ckpt(out, 9);
    write_ckpt(out, 10);
    write_ckpt(out, 2);

    /* round trip */
    snprintf(dir, sizeof dir, "%s/checkpoint-10", out);
    qlr_ckpt_meta m, want = meta_for(10);
    qlr_ckpt_file files[QLR_CKPT_MAX_FILES];
    int nf = 0;
    CHECK_OK(qlr_ckpt_open(dir, &m, files, &nf));
    CHECK_EQ_INT(nf, 3);
    CHECK(m.step == 10 && m.epoch == 1 && m.batch == 17 && m.tokens_seen == 12345);
    CHECK(m.rng == want.rng);
    CHECK(m.elapsed == 1.5);
    CHECK(!strcmp(m.base_model, want.base_model));
    CHECK_OK(qlr_ckpt_check_compatible(dir, &m, &want));
    uint8_t *buf;
    size_t n;
    CHECK_OK(qlr_ckpt_read(dir, files, nf, "adapter/a.bin", &buf, &n));
    CHECK_EQ_INT(n, 10);
    free(buf);

    /* latest by number: 10, not 9 or 2 (a string sort would give 9) */
    char *latest = NULL;
    CHECK_OK(qlr_ckpt_find_latest(out, &latest));
    CHECK_MSG(latest && strstr(latest, "checkpoint-10"), "latest %s", latest ? latest : "(null)");
    free(latest);

    /* a flipped byte is refused naming the file */
    snprintf(path, sizeof path, "%s/optimizer.bin", dir);
    FILE *f = fopen(path, "r+b");
    CHECK(f != NULL);
    if (f) {
        fseek(f, 500, SEEK_SET);
        fputc(0, f);
        fputc(1, f);
        fclose(f);
    }
    CHECK(qlr_ckpt_open(dir, &m, NULL, NULL) == QLR_ERR_FORMAT);
    CHECK_MSG(strstr(qlr_error_msg(), "checkpoint-10/optimizer.bin") && strstr(qlr_error_msg(), "crc32") &&
                  strstr(qlr_error_msg(), "corrupt"),
              "message: %s", qlr_error_msg());
    /* truncated */
    CHECK(truncate(path, 400) == 0);
    CHECK(qlr_ckpt_open(dir, &m, NULL, NULL) == QLR_ERR_FORMAT);
    CHECK_MSG(strstr(qlr_error_msg(), "optimizer.bin") && strstr(qlr_error_msg(), "bytes"), "message: %s",
              qlr_error_msg());
    /* missing */
    CHECK(unlink(path) == 0);
    CHECK(qlr_ckpt_open(dir, &m, NULL, NULL) == QLR_ERR_IO);
    CHECK_MSG(strstr(qlr_error_msg(), "optimizer.bin") && strstr(qlr_error_msg(), "missing"), "message: %s",
              qlr_error_msg());

    /* without a manifest it is not a checkpoint */
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    CHECK(unlink(path) == 0);
    CHECK(qlr_ckpt_open(dir, &m, NULL, NULL) == QLR_ERR_NOT_FOUND);
    CHECK_OK(qlr_ckpt_find_latest(out, &latest));
    CHECK_MSG(latest && strstr(latest, "checkpoint-9"), "latest %s", latest ? latest : "(null)");
    free(latest);
    /* a garbage manifest is ignored too */
    snprintf(path, sizeof path, "%s/checkpoint-9/manifest.json", out);
    f = fopen(path, "w");
    if (f) {
        fputs("{\"format\": \"something else\"}", f);
        fclose(f);
    }
    CHECK_OK(qlr_ckpt_find_latest(out, &latest));
    CHECK_MSG(latest && strstr(latest, "checkpoint-2"), "latest %s", latest ? latest : "(null)");
    free(latest);

    /* rotation keeps the newest 2 complete checkpoints by number: 10 and 2; 9, whose manifest is
     * garbage, is an incomplete folder older than the newest complete one and goes too */
    write_ckpt(out, 10);
    CHECK_OK(qlr_ckpt_rotate(out, 2));
    snprintf(path, sizeof path, "%s/checkpoint-9", out);
    CHECK_MSG(!qlr_path_exists(path), "%s (incomplete, older than checkpoint-10) should be gone", path);
    snprintf(path, sizeof path, "%s/checkpoint-2/manifest.json", out);
    CHECK(qlr_path_exists(path));
    snprintf(path, sizeof path, "%s/checkpoint-10/adapter/a.bin", out);
    CHECK(qlr_path_exists(path));
    CHECK_OK(qlr_ckpt_rotate(out, 1));
    snprintf(path, sizeof path, "%s/checkpoint-2", out);
    CHECK(!qlr_path_exists(path));
    CHECK_OK(qlr_ckpt_rotate(out, 0)); /* 0 = keep all */
    snprintf(path, sizeof path, "%s/checkpoint-10", out);
    CHECK(qlr_path_exists(path));
    /* an incomplete folder newer than every complete checkpoint (a run killed while writing
     * checkpoint-12) does not count: with keep 1 the complete checkpoint-10 stays */
    snprintf(path, sizeof path, "%s/checkpoint-12/adapter", out);
    CHECK_OK(qlr_mkdir_p(path));
    CHECK_OK(qlr_ckpt_rotate(out, 1));
    snprintf(path, sizeof path, "%s/checkpoint-10/manifest.json", out);
    CHECK_MSG(qlr_path_exists(path), "rotation removed the only complete checkpoint");
    snprintf(path, sizeof path, "%s/checkpoint-12", out);
    CHECK(qlr_path_exists(path));
    write_ckpt(out, 12); /* rewritten and complete: now 10 goes */
    CHECK_OK(qlr_ckpt_rotate(out, 1));
    snprintf(path, sizeof path, "%s/checkpoint-10", out);
    CHECK(!qlr_path_exists(path));
    snprintf(path, sizeof path, "%s/checkpoint-12/manifest.json", out);
    CHECK(qlr_path_exists(path));

    /* key fields */
    qlr_ckpt_meta a = meta_for(1), b = meta_for(1);
    b.lora_r = 8;
    CHECK(qlr_ckpt_check_compatible("ck", &a, &b) == QLR_ERR_INVALID);
    CHECK_MSG(strstr(qlr_error_msg(), "lora_r 16") && strstr(qlr_error_msg(), "says 8"), "message: %s", qlr_error_msg());
    b = meta_for(1);
    b.lora_targets = 0x5;
    CHECK(qlr_ckpt_check_compatible("ck", &a, &b) == QLR_ERR_INVALID);
    CHECK_MSG(strstr(qlr_error_msg(), "lora_target_modules [q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]") &&
                  strstr(qlr_error_msg(), "[q_proj,v_proj]"),
              "message: %s", qlr_error_msg());
    b = meta_for(1);
    snprintf(b.base_model, sizeof b.base_model, "/models/y.gguf");
    CHECK(qlr_ckpt_check_compatible("ck", &a, &b) == QLR_ERR_INVALID);
    CHECK_MSG(strstr(qlr_error_msg(), "base_model") != NULL, "message: %s", qlr_error_msg());
    b = meta_for(1);
    b.sequence_len = 512;
    CHECK(qlr_ckpt_check_compatible("ck", &a, &b) == QLR_ERR_INVALID);
    CHECK_MSG(strstr(qlr_error_msg(), "sequence_len 256") != NULL, "message: %s", qlr_error_msg());

    /* nothing to resume from */
    snprintf(path, sizeof path, "%s/empty", test_tmpdir());
    CHECK_OK(qlr_mkdir_p(path));
    CHECK(qlr_ckpt_find_latest(path, &latest) == QLR_ERR_NOT_FOUND);
    return test_finish();
}
