/* tests/gpu/test_cuda_alloc_cap.c: the CUDA backend's allocation cap (qlr_cuda_set_alloc_cap, what
 * `qlora bench train --longest` runs under): an allocation or a workspace growth that would pass
 * the cap fails with QLR_ERR_NOMEM and a message naming the cap, nothing is counted for it, what
 * fits under the cap still allocates, a freed block makes room again, and 0 removes the cap. */
#include <string.h>

#include "core/core.h"
#include "tests/gpu/gpu_harness.h"
#include "tests/test_util.h"

static void test_cap(void) {
    qlr_backend *be = g_gpu;
    size_t base = qlr_cuda_peak_bytes(be);
    /* the peak is the high-water mark: room for 64 MiB above what the backend holds now at most */
    qlr_cuda_set_alloc_cap(be, base + (64u << 20));
    void *a = be->mem.alloc(be, 48u << 20);
    CHECK_MSG(a != NULL, "48 MiB under a 64 MiB headroom: %s", qlr_error_msg());
    qlr_error_clear();
    void *b = be->mem.alloc(be, 32u << 20);
    CHECK_MSG(b == NULL, "48 + 32 MiB passed a 64 MiB headroom");
    CHECK(qlr_error_status() == QLR_ERR_NOMEM);
    CHECK_MSG(strstr(qlr_error_msg(), "allocation cap") != NULL, "the message names the cap: %s", qlr_error_msg());
    qlr_error_clear();
    /* the op workspace is under the same cap */
    qlr_status st = qlr_cuda_reserve(be, 32u << 20);
    CHECK_MSG(st == QLR_ERR_NOMEM, "a 32 MiB workspace passed the cap: status %d", (int)st);
    qlr_error_clear();
    be->mem.free(be, a);
    b = be->mem.alloc(be, 32u << 20);
    CHECK_MSG(b != NULL, "32 MiB after the 48 were freed: %s", qlr_error_msg());
    qlr_error_clear();
    qlr_cuda_set_alloc_cap(be, 0);
    void *c = be->mem.alloc(be, 128u << 20);
    CHECK_MSG(c != NULL, "no cap: %s", qlr_error_msg());
    if (b) be->mem.free(be, b);
    if (c) be->mem.free(be, c);
    size_t fr = 0, tot = 0;
    CHECK_OK(qlr_cuda_mem_info(be, &fr, &tot));
    CHECK(tot > 0 && fr <= tot);
}

int main(void) {
    if (!gh_init()) {
        CHECK_MSG(0, "no usable CUDA device (this test is label gpu: run it on a GPU machine)");
        return test_finish();
    }
    test_cap();
    gh_done();
    return test_finish();
}
