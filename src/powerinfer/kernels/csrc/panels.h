/* Neuron panels (panels.c): a lossless neuron-major copy of a row-major Q4_0/Q4_1/Q8_0 down [d, n_ff]. */
#ifndef PI_PANELS_H
#define PI_PANELS_H

#include "pi.h"

/* Matrix types of panel copies: 100 + the source's GGML type (no GGML type is that large). A pi_mat of one has
 * rows = n_ff, cols = d and row_bytes = the source format's bytes for d values (a panel is 32 of those). */
enum { PI_Q4_0_PANELS = 102, PI_Q4_1_PANELS = 103, PI_Q8_0_PANELS = 108 };

int pi_panel_base(int qtype);  /* the source type of a panel type, or -1 */
int pi_panels_of(int qtype);   /* the panel type of a source type, or -1 */
/* Regroup row-major src [d, n_ff] (qtype) into panels at dst (n_ff/32 * 32 * pi_row_bytes(qtype, d) bytes).
 * 0 ok, -1 unsupported type or sizes not multiples of 32. */
int pi_make_panels(int qtype, const uint8_t *src, int d, int n_ff, uint8_t *dst);
/* y[c] += sum_j h[j] W[idx[j]][c] for c in [c0, c1) (multiples of 32, or c1 = cols); idx ascending (a panel's
 * neurons are grouped only while they are adjacent in idx: any order is correct, sorted is fast). */
void pi_axpy_panels(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y);

#endif
