/* core/testhook.h: named kill points, a TEST HOOK for the crash-safety test
 * (tests/e2e/test_e2e_sigkill.c). It is compiled into every build on purpose: the test kills the
 * real `qlora` binary, not a special one.
 *
 *   QLR_TEST_KILL_AT=<label>:<n>   the process raises SIGKILL on itself the n-th time (counted from
 *                                  its start, n >= 1) it reaches the point named <label>; the
 *                                  label "*" counts every point
 *   QLR_TEST_KILL_TRACE=<file>     appends each point's label, one per line, to <file> (written
 *                                  with write(2), so the lines survive the kill)
 *
 * Points: afile.write (after each write into a temp file), afile.synced (temp file complete,
 * before the rename), afile.renamed (after the rename, before the folder's fsync); ckpt.begin,
 * ckpt.file (after each checkpoint file, between files), ckpt.manifest (all files written, no
 * manifest yet), ckpt.committed (manifest written, before rotation), ckpt.remove (rotation,
 * after each removed file); train.micro (after a micro-batch's forward+backward), train.step
 * (after an optimizer step), train.export (final PEFT folder written, GGUF not yet);
 * peft.tensors (a PEFT folder's tensors written, its config not yet).
 * Without the variables a point costs a once-initialized load and a branch. */
#ifndef QLR_CORE_TESTHOOK_H
#define QLR_CORE_TESTHOOK_H

/* Marks the point `label` (a string literal). Returns unless the environment asks for a kill
 * here, in which case it does not return. Thread-safe. */
void qlr_kill_point(const char *label);

#endif
