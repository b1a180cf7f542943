/* The disk tier (disk.h): the neuron cache, the batched reads and the FFN over resident + cached bundles.
 *
 * Reads: one batch per layer, issued right after the active set is known, by a pread thread pool (PI_IO_THREADS
 * blocking readers plus the calling thread). Measured on this machine type (reference/hybrid.md 5.3): a cold
 * 16 KiB read takes ~40-100 us at queue depth 1 and parallel reads give 2.5-3x the throughput (8 threads 488-516
 * MB/s, 32 threads 765 MB/s buffered); io_uring at the same depth measured the same, so a pread pool is the
 * portable choice. Bundles adjacent in the file (neurons next to each other on disk) go in one preadv of up to
 * PI_IO_GROUP bundles. The file is opened O_DIRECT when the filesystem allows (the page cache cannot stand in
 * for the disk, and the model larger than RAM would thrash it); a filesystem that refuses O_DIRECT (tmpfs) is
 * read buffered.
 *
 * Cache: fixed-size slots under 2Q (Johnson and Shasha, VLDB 1994), with LLM in a flash's window as its memory
 * of past reads. A plain LRU (SmallThinker's expert cache, PowerInfer-2's "LRU-like" cold region) thrashes here:
 * each token reads every layer's misses in turn, and when one token's misses outnumber the slots (4 layers of a
 * 7B-shaped synthetic at 10% firing: 3,900 bundles a token into 2,500 slots) the LRU evicts every neuron before
 * its next use, hit rate 0%. So a neuron read for the first time in PI_DISK_WINDOW tokens goes to a FIFO of a
 * quarter of the slots, and one read again within the window (it fires often: LLM in a flash keeps the last k = 5
 * tokens' neurons, reference/hybrid.md 4.2) goes to an LRU of the other three quarters, which cold one-off
 * neurons cannot flush. A slot used by the current layer is never evicted within that layer; when a
 * layer fires more disk neurons than the cache has slots, the rest are read into overflow slots past the cache
 * (virtual memory that costs RAM only if a layer ever needs it) and forgotten after the layer. */
#define _GNU_SOURCE
#include "disk.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include "decoder.h"

#define PI_IO_GROUP 32 /* bundles per preadv at most (256-384 KiB for 7B-shaped bundles) */
#define PI_DISK_WINDOW 5 /* tokens: a neuron read again within them is a frequent one (LLM in a flash's k = 5) */

struct pi_io {
    int n;
    pthread_t *th;
    sem_t go;
    pthread_mutex_t mu;
    pthread_cond_t done;
    int active, stop;
    pi_disk *K;
    int32_t *gstart; /* [n_groups + 1] first read of each group */
    int ngroups;
    _Atomic int next;
};

static void set_err(pi_disk *K, int e) {
    int zero = 0;
    __atomic_compare_exchange_n(&K->err, &zero, e ? e : EIO, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

static int pread_full(int fd, uint8_t *dst, size_t len, int64_t off) {
    while (len) {
        const ssize_t r = pread(fd, dst, len, off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return r == 0 ? EIO : errno; /* 0: past the end (a truncated file) */
        dst += r; len -= (size_t)r; off += r;
    }
    return 0;
}

static void read_group(pi_disk *K, int a, int b) {
    struct iovec iov[PI_IO_GROUP];
    size_t total = 0;
    for (int k = a; k < b; k++) {
        iov[k - a].iov_base = K->reads[k].dst;
        iov[k - a].iov_len = K->reads[k].len;
        total += K->reads[k].len;
    }
    const int64_t off = K->reads[a].off;
    ssize_t r;
    do r = preadv(__atomic_load_n(&K->direct, __ATOMIC_RELAXED) ? K->fd : K->fd_buffered, iov, b - a, off);
    while (r < 0 && errno == EINTR);
    if (r < 0 && errno == EINVAL && __atomic_load_n(&K->direct, __ATOMIC_RELAXED)) {
        __atomic_store_n(&K->direct, 0, __ATOMIC_RELAXED); /* O_DIRECT refused at read time: buffered from now on */
        do r = preadv(K->fd_buffered, iov, b - a, off);
        while (r < 0 && errno == EINTR);
    }
    if (r == (ssize_t)total) return;
    for (int k = a; k < b; k++) { /* a short read: each bundle on its own, to the end or to the error */
        const int e = pread_full(K->fd_buffered, K->reads[k].dst, K->reads[k].len, K->reads[k].off);
        if (e) { set_err(K, e); return; }
    }
}

static void run_groups(pi_io *io) {
    for (;;) {
        const int g = atomic_fetch_add(&io->next, 1);
        if (g >= io->ngroups) return;
        read_group(io->K, io->gstart[g], io->gstart[g + 1]);
    }
}

static void *io_worker(void *arg) {
    pi_io *io = arg;
    for (;;) {
        while (sem_wait(&io->go) != 0) {}
        if (__atomic_load_n(&io->stop, __ATOMIC_ACQUIRE)) return NULL;
        run_groups(io);
        pthread_mutex_lock(&io->mu);
        if (--io->active == 0) pthread_cond_signal(&io->done);
        pthread_mutex_unlock(&io->mu);
    }
}

static void io_free(pi_io *io) {
    if (!io) return;
    __atomic_store_n(&io->stop, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < io->n; i++) sem_post(&io->go);
    for (int i = 0; i < io->n; i++) pthread_join(io->th[i], NULL);
    sem_destroy(&io->go);
    pthread_mutex_destroy(&io->mu);
    pthread_cond_destroy(&io->done);
    free(io->th);
    free(io->gstart);
    free(io);
}

static pi_io *io_new(pi_disk *K, int n, int max_reads) {
    pi_io *io = calloc(1, sizeof *io);
    if (!io) return NULL;
    io->K = K;
    io->th = calloc((size_t)(n > 0 ? n : 1), sizeof(pthread_t));
    io->gstart = malloc((size_t)(max_reads + 1) * sizeof(int32_t));
    if (!io->th || !io->gstart || sem_init(&io->go, 0, 0)) { free(io->th); free(io->gstart); free(io); return NULL; }
    pthread_mutex_init(&io->mu, NULL);
    pthread_cond_init(&io->done, NULL);
    for (int i = 0; i < n; i++) {
        if (pthread_create(&io->th[i], NULL, io_worker, io)) break;
        io->n++;
    }
    return io;
}

/* Read K->reads[0..n_reads) (sorted by file offset): adjacent bundles grouped, groups spread over the readers. */
static void io_batch(pi_disk *K) {
    pi_io *io = K->io;
    int ng = 0;
    for (int k = 0; k < K->n_reads; k++) {
        const pi_disk_read *r = &K->reads[k];
        if (k == 0 || k - io->gstart[ng - 1] >= PI_IO_GROUP || r->off != r[-1].off + (int64_t)r[-1].len)
            io->gstart[ng++] = k;
    }
    io->gstart[ng] = K->n_reads;
    io->ngroups = ng;
    atomic_store(&io->next, 0);
    const int want = ng - 1 < io->n ? ng - 1 : io->n; /* the caller reads too */
    pthread_mutex_lock(&io->mu);
    io->active = want;
    pthread_mutex_unlock(&io->mu);
    for (int i = 0; i < want; i++) sem_post(&io->go);
    run_groups(io);
    pthread_mutex_lock(&io->mu);
    while (io->active) pthread_cond_wait(&io->done, &io->mu);
    pthread_mutex_unlock(&io->mu);
    K->reads_issued += (uint64_t)ng;
}

/* ---- the cache's two lists over slots ---- */
static void list_unlink(pi_disk *K, int c) {
    const int l = K->list[c], p = K->prev[c], n = K->next[c];
    if (p >= 0) K->next[p] = n; else K->head[l] = n;
    if (n >= 0) K->prev[n] = p; else K->tail[l] = p;
}

static void list_front(pi_disk *K, int c, int l) {
    if (K->list[c] == l && K->head[l] == c) return;
    list_unlink(K, c);
    K->list[c] = (uint8_t)l;
    K->prev[c] = -1;
    K->next[c] = K->head[l];
    if (K->head[l] >= 0) K->prev[K->head[l]] = c;
    K->head[l] = c;
    if (K->tail[l] < 0) K->tail[l] = c;
}

pi_disk *pi_disk_new(const char *path, int n_layer, int n_ff, size_t slot_bytes, int n_res, int n_cache, int n_io,
                     int try_direct) {
    if (n_layer <= 0 || n_ff <= 0 || !slot_bytes || slot_bytes % 512 || n_res < 0 || n_cache < 1 || n_io < 0) {
        errno = EINVAL;
        return NULL;
    }
    pi_disk *K = calloc(1, sizeof *K);
    if (!K) return NULL;
    K->fd = K->fd_buffered = -1;
    K->fd_buffered = open(path, O_RDONLY | O_CLOEXEC);
    if (K->fd_buffered < 0) { free(K); return NULL; }
    K->fd = try_direct ? open(path, O_RDONLY | O_CLOEXEC | O_DIRECT) : -1;
    K->direct = K->fd >= 0;
    if (K->fd < 0) K->fd = K->fd_buffered;
    K->slot_bytes = slot_bytes;
    K->n_res = n_res;
    K->n_cache = n_cache;
    K->n_layer = n_layer;
    K->arena_bytes = slot_bytes * ((size_t)n_res + (size_t)n_cache + (size_t)n_ff);
    /* anonymous pages: a cache slot costs memory only once a bundle is read into it */
    void *base = mmap(NULL, K->arena_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    K->base = base == MAP_FAILED ? NULL : base;
    K->own_layer = malloc((size_t)n_cache * 4);
    K->own_neuron = malloc((size_t)n_cache * 4);
    K->prev = malloc((size_t)n_cache * 4);
    K->list = calloc((size_t)n_cache, 1);
    K->next = malloc((size_t)n_cache * 4);
    K->stamp = calloc((size_t)n_cache, 4);
    K->over_layer = malloc((size_t)n_ff * 4);
    K->over_neuron = malloc((size_t)n_ff * 4);
    K->layers = calloc((size_t)n_layer, sizeof(pi_disk_layer));
    K->reads = malloc((size_t)n_ff * sizeof(pi_disk_read));
    K->nc = calloc(PI_MAX_THREADS, sizeof(int32_t));
    int ok = K->base && K->own_layer && K->own_neuron && K->prev && K->next && K->list && K->stamp && K->layers &&
             K->reads &&
             K->nc && K->over_layer && K->over_neuron;
    for (int t = 0; ok && t < PI_MAX_THREADS; t++) ok = (K->slots[t] = malloc((size_t)n_ff * 4)) != NULL;
    if (ok) ok = (K->io = io_new(K, n_io, n_ff)) != NULL;
    if (!ok) { pi_disk_free(K); errno = ENOMEM; return NULL; }
    const int n_fifo = n_cache / 4 > 0 ? n_cache / 4 : 1; /* 2Q's Kin: a quarter of the slots */
    for (int c = 0; c < n_cache; c++) {
        const int l = c >= n_fifo;
        K->own_layer[c] = K->own_neuron[c] = -1;
        K->list[c] = (uint8_t)l;
        K->prev[c] = c == 0 || c == n_fifo ? -1 : c - 1;
        K->next[c] = c + 1 == n_cache || c + 1 == n_fifo ? -1 : c + 1;
    }
    K->head[0] = 0;
    K->tail[0] = n_fifo - 1;
    K->head[1] = n_fifo < n_cache ? n_fifo : -1;
    K->tail[1] = n_fifo < n_cache ? n_cache - 1 : -1;
    return K;
}

void pi_disk_free(pi_disk *K) {
    if (!K) return;
    io_free(K->io);
    if (K->fd >= 0 && K->fd != K->fd_buffered) close(K->fd);
    if (K->fd_buffered >= 0) close(K->fd_buffered);
    if (K->base) munmap(K->base, K->arena_bytes);
    for (int il = 0; K->layers && il < K->n_layer; il++) {
        free(K->layers[il].where); free(K->layers[il].off); free(K->layers[il].read_at);
    }
    for (int t = 0; t < PI_MAX_THREADS; t++) free(K->slots[t]);
    free(K->over_layer); free(K->over_neuron);
    free(K->own_layer); free(K->own_neuron); free(K->prev); free(K->next); free(K->list); free(K->stamp);
    free(K->layers); free(K->reads); free(K->nc);
    free(K);
}

static int view(pi_mat *m, const pi_disk *K, int qtype, size_t off, int d) {
    memset(m, 0, sizeof *m);
    if (qtype < 0) return 0;
    const size_t rb = pi_row_bytes(qtype, d);
    if (!rb || off + rb > K->slot_bytes) return -1;
    m->qtype = qtype;
    m->rows = (int)(K->arena_bytes / K->slot_bytes);
    m->cols = d;
    m->raw = K->base + off;
    m->row_bytes = K->slot_bytes; /* the stride of the arena: row i lives in slot i */
    return 0;
}

int pi_disk_set_layer(pi_disk *K, int il, int n_ff, int d, const int32_t *where, const int64_t *off,
                      size_t bundle_bytes, int gqt, size_t goff, int uqt, size_t uoff, int dqt, size_t doff) {
    if (il < 0 || il >= K->n_layer || !bundle_bytes || bundle_bytes % 512 || bundle_bytes > K->slot_bytes) return -1;
    pi_disk_layer *L = &K->layers[il];
    for (int i = 0; i < n_ff; i++) { /* every neuron resident (a valid resident slot) or on disk, never both */
        const int ok = off[i] < 0 ? where[i] >= 0 && where[i] < K->n_res : where[i] == -1 && off[i] % 512 == 0;
        if (!ok) return -1;
    }
    pi_disk_layer nl = {0};
    if (view(&nl.gate, K, gqt, goff, d) || view(&nl.up, K, uqt, uoff, d) || view(&nl.down, K, dqt, doff, d) ||
        uqt < 0 || dqt < 0)
        return -1;
    nl.where = malloc((size_t)n_ff * 4);
    nl.off = malloc((size_t)n_ff * 8);
    nl.read_at = calloc((size_t)n_ff, 4);
    if (!nl.where || !nl.off || !nl.read_at) { free(nl.where); free(nl.off); free(nl.read_at); return -1; }
    memcpy(nl.where, where, (size_t)n_ff * 4);
    memcpy(nl.off, off, (size_t)n_ff * 8);
    nl.bundle_bytes = bundle_bytes;
    for (int c = 0; c < K->n_cache; c++) /* slots holding this layer's old neurons are free again */
        if (K->own_layer[c] == il) K->own_layer[c] = K->own_neuron[c] = -1;
    int keep = 0;
    for (int k = 0; k < K->n_over; k++)
        if (K->over_layer[k] != il) { K->over_layer[keep] = K->over_layer[k]; K->over_neuron[keep++] = K->over_neuron[k]; }
    K->n_over = keep;
    free(L->where); free(L->off); free(L->read_at);
    *L = nl;
    return 0;
}

/* Thread 0, between barriers: every thread's candidates get a slot; the missing ones are read in one batch. */
static void fetch(pi_decoder *D, int il, int nth) {
    pi_disk *K = D->disk;
    pi_disk_layer *dl = &K->layers[il];
    const uint32_t epoch = ++K->epoch ? K->epoch : ++K->epoch; /* 0 marks a slot never used */
    if (il == 0) K->token++;
    K->n_reads = 0;
    if (K->n_over) { /* the last layer's overflow is forgotten, and its memory given back: it is past the budget */
        for (int k = 0; k < K->n_over; k++) K->layers[K->over_layer[k]].where[K->over_neuron[k]] = -1;
        madvise(K->base + (size_t)(K->n_res + K->n_cache) * K->slot_bytes, (size_t)K->n_over * K->slot_bytes,
                MADV_DONTNEED);
        K->n_over = 0;
    }
    for (int t = 0; t < nth; t++) {
        const int32_t *idx = D->tw[t].idx;
        for (int j = 0; j < K->nc[t]; j++) {
            const int i = idx[j], s = dl->where[i];
            if (s >= 0) {
                if (s < K->n_res) { K->resident_hits++; continue; }
                const int c = s - K->n_res;
                K->hits++;
                K->stamp[c] = epoch;
                if (K->list[c]) list_front(K, c, 1); /* the FIFO keeps its order (2Q: A1in hits are correlated) */
                continue;
            }
            /* a miss: the LRU if the neuron was read within the window, else the FIFO; the other list when the
             * chosen one's oldest slot already serves this layer */
            const uint32_t last = dl->read_at[i];
            dl->read_at[i] = K->token;
            int l = last && K->token - last <= PI_DISK_WINDOW;
            if (K->tail[l] < 0 || K->stamp[K->tail[l]] == epoch ||
                (K->own_layer[K->tail[l]] >= 0 && K->tail[!l] >= 0 && K->own_layer[K->tail[!l]] < 0))
                l = !l; /* also: a free slot (they sit at the lists' tails) before evicting anything */
            const int c = K->tail[l];
            int slot;
            if (c < 0 || K->stamp[c] == epoch) { /* every cache slot already serves this layer: an overflow slot */
                slot = K->n_res + K->n_cache + K->n_over;
                K->over_layer[K->n_over] = il;
                K->over_neuron[K->n_over++] = i;
                K->overflow++;
            } else {
                if (K->own_layer[c] >= 0) K->layers[K->own_layer[c]].where[K->own_neuron[c]] = -1;
                K->own_layer[c] = il;
                K->own_neuron[c] = i;
                K->stamp[c] = epoch;
                list_front(K, c, l);
                slot = K->n_res + c;
            }
            dl->where[i] = slot;
            K->reads[K->n_reads++] = (pi_disk_read){dl->off[i], K->base + (size_t)slot * K->slot_bytes,
                                                    dl->bundle_bytes};
            K->misses++;
        }
    }
    if (!K->n_reads) return;
    const uint64_t t0 = pi_now_ns();
    io_batch(K);
    K->wait_ns += pi_now_ns() - t0;
    K->bundles += (uint64_t)K->n_reads;
    K->bytes += (uint64_t)K->n_reads * dl->bundle_bytes;
}

static inline int keep_h(float h, float t_h) { return h != 0.0f && fabsf(h) >= t_h; }

void pi_ffn_disk(pi_decoder *D, int il, const float *x, float *xout, int ith, int nth) {
    const pi_layer *L = &D->L[il];
    pi_disk *K = D->disk;
    const pi_disk_layer *dl = &K->layers[il];
    pi_tws *w = &D->tw[ith];
    const int d = D->d, relu_gate = D->act == ACT_RELU && D->ffn_kind != FFN_MLP;
    float *xn = w->xn, *g = D->g, *u = D->u, *gv = w->hv;
    int32_t *idx = w->idx, *s = K->slots[ith];
    pi_rmsnorm(x, L->ffn_norm, d, D->eps, xn);
    int c0, c1;
    pi_split((D->n_ff + PI_QK - 1) / PI_QK, ith, nth, &c0, &c1);
    const int n0 = c0 * PI_QK, n1 = c1 * PI_QK < D->n_ff ? c1 * PI_QK : D->n_ff;
    memset(w->yp, 0, (size_t)d * sizeof(float));
    int nc = 0;
    /* 1. the active set of this thread's chunk: the predictor's candidates, or the exact ReLU gate over the
     * resident gate matrix (as ffn_sparse in decoder.c computes them) */
    if (L->fc1.raw) {
        nc = pi_predict_chunk(D, L, w, x, n0, n1, u, NULL, idx, ith, nth);
    } else if (n1 > n0) {
        pi_act_fill(&w->act, xn, 0, 0, d, L->need_ffn);
        pi_mat_run_seg(&L->gate, &L->seg[MGATE][ith], &w->act, 1, g, 0);
        for (int i = n0; i < n1; i++)
            if (g[i] > 0.0f) { idx[nc] = i; gv[nc++] = g[i]; }
    }
    K->nc[ith] = nc;
    /* 2. one batch of reads for the layer's missing bundles */
    pi_dec_barrier(D, ith);
    if (ith == 0) fetch(D, il, nth);
    pi_dec_barrier(D, ith);
    /* 3. the sparse FFN over the candidates' slots */
    for (int j = 0; j < nc; j++) s[j] = dl->where[idx[j]];
    int nk = 0;
    w->kept_g[il] = 0;
    if (L->fc1.raw) {
        if (nc) pi_act_fill(&w->act, xn, 0, 0, d, L->need_ffn);
        if (dl->gate.raw && nc) {
            w->kept_g[il] = nc;
            pi_mat_gather(&dl->gate, s, nc, &w->act, gv);
            if (relu_gate) {
                int np = 0;
                for (int j = 0; j < nc; j++)
                    if (gv[j] > 0.0f) { idx[np] = idx[j]; s[np] = s[j]; gv[np++] = gv[j]; }
                nc = np;
            }
        }
        w->kept_u[il] = nc;
        pi_mat_gather(&dl->up, s, nc, &w->act, w->uv);
        for (int j = 0; j < nc; j++) {
            float gj = dl->gate.raw ? gv[j] : 0.0f, uj = w->uv[j];
            pi_ffn_act(D, &gj, &uj, 1);
            if (keep_h(gj, L->t_h)) { idx[nk] = idx[j]; s[nk] = s[j]; w->hv[nk++] = gj; }
        }
    } else {
        w->kept_u[il] = nc;
        pi_mat_gather(&dl->up, s, nc, &w->act, w->uv);
        for (int j = 0; j < nc; j++) {
            const float uj = w->uv[j];
            const float hj = D->ffn_kind == FFN_DGLU ? gv[j] * (uj > 0.0f ? uj : 0.0f) : gv[j] * uj;
            if (keep_h(hj, L->t_h)) { idx[nk] = idx[j]; s[nk] = s[j]; w->hv[nk++] = hj; }
        }
    }
    pi_mat_axpy(&dl->down, s, w->hv, nk, 0, d, w->yp);
    w->kept_h[il] = nk;
    w->kept_x[il] = ith == 0 ? d : 0;
    pi_reduce_partials(D, xout, NULL, ith, nth);
}
