/* train/dist.h: data-parallel training over several processes (one per GPU, or CPU processes).
 *
 * Owns: reading rank and world from the launcher's environment (mpirun: OMPI_COMM_WORLD_*;
 * srun: SLURM_*; torchrun-style: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT),
 * the TCP rendezvous at MASTER_ADDR:MASTER_PORT (rank 0 listens, the others connect: a star of
 * links that carries the communicator id, small host values, and, on backends without
 * collectives, the gradients themselves), the backend's communicator (NCCL on CUDA), the sums the
 * trainer needs (gradients in device memory; loss sums and stop flags on the host), watching the
 * peers while a collective runs (a peer that dies ends the wait with an error naming its rank:
 * no hang), and `qlora train --nproc N`'s launcher. It does not own what is summed (the trainer). */
#ifndef QLR_TRAIN_DIST_H
#define QLR_TRAIN_DIST_H

#include <stdint.h>

#include "backend/backend.h"
#include "core/status.h"

typedef struct qlr_dist_env {
    int rank, world, local_rank;
    char master_addr[256];
    int master_port;
    const char *source;        /* "mpirun", "srun", "torchrun", "qlora --nproc" or "none" */
} qlr_dist_env;

/* Reads the environment; world 1 (rank 0) when no launcher variables are set. QLR_ERR_INVALID
 * naming the variable when they are malformed or inconsistent (rank outside the world, a world
 * above 1 without MASTER_ADDR/MASTER_PORT where the launcher gives none). */
qlr_status qlr_dist_env_read(qlr_dist_env *e);

typedef struct qlr_dist qlr_dist;

/* Connects the ranks of e (world > 1): rank 0 accepts the others at master_addr:master_port, which
 * retry for up to QLR_DIST_TIMEOUT seconds (default 300). Then, when `be` has collectives (CUDA),
 * every rank joins the backend's communicator; with world 1 only when `force_comm` (the
 * world-size-1 path through NCCL, for tests). *out NULL on failure (the message names the address
 * or the rank). */
qlr_status qlr_dist_open(const qlr_dist_env *e, qlr_backend *be, int force_comm, qlr_dist **out);
/* Closes links and communicator; abort = 1 after a failure (pending collectives dropped). Safe
 * on NULL. */
void qlr_dist_close(qlr_dist *d, int abort);

int qlr_dist_rank(const qlr_dist *d);   /* 0 on NULL */
int qlr_dist_world(const qlr_dist *d);  /* 1 on NULL */
/* 1 when the gradients go through the backend's communicator (else through the TCP links). */
int qlr_dist_device_comm(const qlr_dist *d);

/* x[n] f32 in `be`'s memory = the sum over the ranks, in place; every rank gets the same bits.
 * Through the communicator (waiting while watching the peers), else through host memory: rank 0
 * adds the ranks' buffers in rank order and sends the sum back. A dead peer or a timeout:
 * QLR_ERR_IO naming the rank. A no-op with world 1 and no communicator. */
qlr_status qlr_dist_allreduce_f32(qlr_dist *d, float *x, int64_t n);

typedef enum qlr_dist_op { QLR_DIST_SUM = 0, QLR_DIST_MAX = 1 } qlr_dist_op;
/* x[n] f64 on the host = the sum (in rank order) or the max over the ranks. */
qlr_status qlr_dist_allreduce_host(qlr_dist *d, double *x, int n, qlr_dist_op op);

/* `qlora train --nproc N`: runs argv (the program re-executed, without --nproc) as N processes on
 * this host with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT;
 * forwards SIGINT/SIGTERM to them; when one fails, stops the others and says which rank failed
 * and how. Returns the exit status for the command (0 when every rank exited 0). */
int qlr_dist_launch(int nproc, char **argv);

#endif
