/* The disk tier of a placement (DESIGN "Tiers and placement"; reference/hybrid.md 4-6): FFN neurons that do not
 * fit the RAM budget live in a neuron-bundle file (per neuron its gate row, up row and down_t row, contiguous and
 * padded to 4 KiB for O_DIRECT). Per token and layer, once the active set is known (the exact ReLU gate over the
 * resident gate matrix, or the predictor), the active disk neurons missing from the neuron cache are read in one
 * batch by a pread thread pool into cache slots; the sparse kernels then read every neuron's rows through a
 * per-layer neuron -> slot map, with the slot size as the row stride, so resident and cached neurons go through
 * the same gathers and axpys as the all-RAM path (same neurons, same order: same sums). */
#ifndef PI_DISK_H
#define PI_DISK_H

#include <stdint.h>

#include "pi.h"

typedef struct pi_io pi_io;

/* One layer's disk state: where each neuron's bundle is, and its rows' formats and places inside a bundle. */
typedef struct pi_disk_layer {
    int32_t *where;        /* [n_ff] slot in the arena (resident or cached), or -1: on disk, not cached */
    uint32_t *read_at;     /* [n_ff] token (1-based) of the neuron's last read from disk, 0: never */
    int64_t *off;          /* [n_ff] byte offset of the neuron's bundle in the file, or -1 (resident) */
    size_t bundle_bytes;   /* bytes read per bundle (a multiple of the device's block, >= 512) */
    pi_mat gate, up, down; /* views of the arena: row i at base + slot * slot_bytes + the row's offset */
} pi_disk_layer;

typedef struct { int64_t off; uint8_t *dst; size_t len; } pi_disk_read;

typedef struct pi_disk {
    int fd, fd_buffered;   /* fd is O_DIRECT when the filesystem allows it (else the buffered one) */
    int direct;            /* reads go through O_DIRECT (0 after a fallback) */
    size_t slot_bytes;     /* arena stride: the largest bundle */
    uint8_t *base;         /* arena: n_res resident bundles, then n_cache cache slots (mmap'd, page-aligned) */
    size_t arena_bytes;
    int n_res, n_cache;    /* the arena also has n_ff overflow slots past the cache (see fetch in disk.c) */
    int32_t *over_layer, *over_neuron; /* neurons placed in overflow slots by the last layer call */
    int n_over;
    /* the neuron cache (index c = slot - n_res), 2Q: list 0 a FIFO for neurons read once, list 1 an LRU for
     * neurons read again within PI_DISK_WINDOW tokens (see disk.c); each slot knows its neuron */
    int32_t *own_layer, *own_neuron, *prev, *next;
    uint8_t *list;         /* which list the slot is on */
    uint32_t *stamp;       /* the epoch (layer call) that last used the slot: never evicted within it */
    uint32_t epoch, token;
    int head[2], tail[2];  /* head = most recently inserted / used */
    pi_disk_layer *layers;  /* [n_layer], layers with where == NULL are all-RAM */
    int n_layer;
    pi_disk_read *reads;    /* this layer's misses (n_ff at most) */
    int n_reads;
    int32_t *nc;            /* [PI_MAX_THREADS] candidates each thread found */
    int32_t *slots[64];     /* per thread: slot of each candidate (n_ff) */
    pi_io *io;
    int err;                /* errno of the first failed read (0: none); the runner raises it after the step */
    /* counters since the last reset */
    uint64_t bytes, reads_issued, bundles, hits, misses, wait_ns, resident_hits, overflow;
} pi_disk;

struct pi_decoder;
/* New disk tier over `path`: arena of n_res + n_cache (+ n_ff overflow) slots of slot_bytes, n_io reader threads.
 * NULL + errno. */
pi_disk *pi_disk_new(const char *path, int n_layer, int n_ff, size_t slot_bytes, int n_res, int n_cache, int n_io,
                     int try_direct);
void pi_disk_free(pi_disk *K);
/* Bind layer il: where/off are copied ([n_ff] each); rows: gate (qtype, offset in bundle; gqt < 0: no gate), up,
 * down_t (neuron-major, d columns). 0 ok, -1 bad arguments or out of memory. */
int pi_disk_set_layer(pi_disk *K, int il, int n_ff, int d, const int32_t *where, const int64_t *off,
                      size_t bundle_bytes, int gqt, size_t goff, int uqt, size_t uoff, int dqt, size_t doff);
/* The FFN of layer il on the disk tier, SPMD over the decoder's pool (called from the decoder's FFN phase). */
void pi_ffn_disk(struct pi_decoder *D, int il, const float *x, float *xout, int ith, int nth);

#endif
