/* backend/cuda/nccl.cu: the collectives of data-parallel training through NCCL (backend.h
 * "collectives"): communicator ids and creation, an in-place sum of f32 buffers queued on the
 * backend's stream, a non-blocking poll (so the caller can watch its peers while it waits) and
 * destruction, with ncclCommAbort when a peer failed. NVLink multicast (NVLS) is turned off before
 * the first communicator (NCCL_NVLS_ENABLE=0 unless the user set it). */
#include "backend/cuda/cuda_internal.h"

#include <stdlib.h>
#include <string.h>

static_assert(sizeof(ncclUniqueId) == QLR_COMM_ID_BYTES, "NCCL's unique id size");

qlr_status qlr_cuda_comm_id(qlr_backend *be, uint8_t id[QLR_COMM_ID_BYTES]) {
    (void)be;
    setenv("NCCL_NVLS_ENABLE", "0", 0);
    ncclUniqueId u;
    QLR_CK(ncclGetUniqueId(&u));
    memcpy(id, &u, sizeof u);
    return QLR_OK;
}

qlr_status qlr_cuda_comm_create(qlr_backend *be, const uint8_t id[QLR_COMM_ID_BYTES], int rank,
                                int world, void **comm) {
    *comm = NULL;
    setenv("NCCL_NVLS_ENABLE", "0", 0);
    QLR_CK(cudaSetDevice(qlr_cuda_im(be)->device));
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    ncclComm_t c;
    QLR_CK(ncclCommInitRank(&c, world, u, rank));
    *comm = (void *)c;
    return QLR_OK;
}

void qlr_cuda_comm_destroy(qlr_backend *be, void *comm, int abort_) {
    (void)be;
    if (!comm) return;
    if (abort_) ncclCommAbort((ncclComm_t)comm);
    else ncclCommDestroy((ncclComm_t)comm);
}

qlr_status qlr_cuda_allreduce_sum_f32(qlr_backend *be, void *comm, float *x, int64_t n) {
    if (n <= 0) return QLR_OK;
    QLR_CK(ncclAllReduce(x, x, (size_t)n, ncclFloat32, ncclSum, (ncclComm_t)comm,
                         qlr_cuda_im(be)->stream));
    return QLR_OK;
}

qlr_status qlr_cuda_comm_poll(qlr_backend *be, void *comm) {
    ncclResult_t async = ncclSuccess;
    if (comm) QLR_CK(ncclCommGetAsyncError((ncclComm_t)comm, &async));
    QLR_CK(async);
    cudaError_t e = cudaStreamQuery(qlr_cuda_im(be)->stream);
    if (e == cudaErrorNotReady) return QLR_ERR_BUSY;
    QLR_CK(e);
    return QLR_OK;
}
