/* train/checkpoint.h: training checkpoints on disk — output_dir/checkpoint-N/.
 *
 * Owns: the folder layout, the manifest (manifest.json, written LAST: a checkpoint without a
 * valid manifest is ignored), per-file crc32 checks, finding the latest checkpoint, rotation
 * (keep the newest save_total_limit) and the key-field compatibility check on resume. Every file
 * is written atomically (core/file.h qlr_afile: temp file, fsync, rename) and its crc32 and size
 * recorded in the manifest. What goes into the files (adapter, optimizer state bytes, ...) is
 * the trainer's business; this module only names, writes, verifies and deletes them.
 *
 * Layout of checkpoint-N/ (N = optimizer steps done):
 *   adapter/adapter_config.json, adapter/adapter_model.safetensors  the fp32 masters (PEFT)
 *   optimizer.bin    optim/ qlr_adamw_states_write bytes (its own crc trailer too)
 *   recipe.yaml      the effective recipe (absolute paths)
 *   manifest.json    {"format": "qlora-checkpoint", "version": 1, "step", "epoch", "batch",
 *                     "rng", "tokens_seen", key fields, "files": {name: {"bytes", "crc32"}}} */
#ifndef QLR_TRAIN_CHECKPOINT_H
#define QLR_TRAIN_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

#define QLR_CKPT_MANIFEST "manifest.json" /* = adapters/lora.h QLR_RUN_CHECKPOINT_MANIFEST */
#define QLR_CKPT_MAX_FILES 16

/* The trainer state and the key fields a resume must agree on. */
typedef struct qlr_ckpt_meta {
    uint64_t step;              /* optimizer steps done */
    uint64_t epoch, batch;      /* data cursor: the next micro-batch */
    uint64_t rng;               /* trainer RNG state (dropout seeds) */
    uint64_t tokens_seen;       /* real tokens trained on so far */
    double elapsed;             /* training seconds before this checkpoint (for the summary) */
    /* key fields (refused on mismatch) */
    char base_model[4096];      /* canonical path of the base model */
    uint32_t lora_r;
    uint32_t lora_targets;      /* QLR_LORA_TARGET mask */
    uint32_t sequence_len;
} qlr_ckpt_meta;

typedef struct qlr_ckpt_file {
    char name[128];             /* relative to the checkpoint folder ("adapter/adapter_config.json") */
    uint64_t bytes;
    uint32_t crc32;
} qlr_ckpt_file;

/* A checkpoint being written. */
typedef struct qlr_ckpt_writer {
    char dir[4096];
    qlr_ckpt_file files[QLR_CKPT_MAX_FILES];
    int n_files;
} qlr_ckpt_writer;

/* Creates output_dir/checkpoint-<step>/ (and output_dir) and removes a stale manifest there,
 * so the folder counts as a checkpoint only once qlr_ckpt_commit has run. */
qlr_status qlr_ckpt_begin(qlr_ckpt_writer *w, const char *output_dir, uint64_t step);
/* Writes `name` (relative; folders created) atomically and records its crc32 and size. */
qlr_status qlr_ckpt_add_buffer(qlr_ckpt_writer *w, const char *name, const void *data, size_t n);
/* Records a file someone else already wrote atomically into the folder (reads it back for the
 * crc32). QLR_ERR_IO naming the file when it cannot be read. */
qlr_status qlr_ckpt_add_file(qlr_ckpt_writer *w, const char *name);
/* Writes manifest.json (atomically, last). */
qlr_status qlr_ckpt_commit(qlr_ckpt_writer *w, const qlr_ckpt_meta *meta);

/* Reads dir/manifest.json into *meta (and the file list when `files` is not NULL, up to
 * QLR_CKPT_MAX_FILES) and verifies the size and crc32 of every listed file. QLR_ERR_NOT_FOUND
 * when there is no manifest, QLR_ERR_FORMAT for a malformed manifest or a file whose crc32 or
 * size differs ("checkpoint-3/optimizer.bin: crc32 0x... but the manifest says 0x...: the file
 * is corrupt"), QLR_ERR_IO for a missing file (named). */
qlr_status qlr_ckpt_open(const char *dir, qlr_ckpt_meta *meta, qlr_ckpt_file *files, int *n_files);
/* Reads one listed file into a malloc'ed buffer, checking its crc32 against the manifest again
 * (it was verified by qlr_ckpt_open; this guards against a change in between). */
qlr_status qlr_ckpt_read(const char *dir, const qlr_ckpt_file *files, int n_files, const char *name,
                         uint8_t **data, size_t *n);

/* The checkpoint-N folder of output_dir with the largest N whose manifest parses (crc32s are
 * checked later by qlr_ckpt_open). *dir malloc'ed. QLR_ERR_NOT_FOUND when there is none. */
qlr_status qlr_ckpt_find_latest(const char *output_dir, char **dir);
/* Keeps the newest `keep` complete checkpoints of output_dir (by N, those whose manifest parses)
 * and deletes the older ones, and every incomplete folder (no valid manifest) older than the newest
 * complete one; incomplete folders newer than that are left to be rewritten. A deleted folder
 * loses its manifest first. keep 0 = keep everything. */
qlr_status qlr_ckpt_rotate(const char *output_dir, uint32_t keep);

/* QLR_ERR_INVALID when a key field differs, naming it: "cannot resume from <dir>: it was made
 * with lora_r 8, the recipe says 16 (key fields must match: base_model, lora_r,
 * lora_target_modules, sequence_len)". */
qlr_status qlr_ckpt_check_compatible(const char *dir, const qlr_ckpt_meta *ckpt, const qlr_ckpt_meta *now);

#endif
