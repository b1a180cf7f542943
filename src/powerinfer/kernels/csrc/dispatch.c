/* Runtime ISA selection: the best table the CPU supports, or a forced one (parity tests). */
#include "pi.h"

const pi_kernels *pi_k = &pi_kernels_portable;

static int have(const char *name) {
#if defined(PI_X86)
    __builtin_cpu_init();
    if (!strcmp(name, "avx512"))
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c" /* implied by every AVX-512 CPU */);
    if (!strcmp(name, "avx2"))
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    return !strcmp(name, "portable");
}

int pi_select_isa(const char *name) {
    if (!strcmp(name, "auto")) {
        const char *order[] = {"avx512", "avx2", "portable"};
        for (int i = 0; i < 3; i++)
            if (!pi_select_isa(order[i])) return 0;
        return -1;
    }
    if (!have(name)) return -1;
#if defined(PI_X86)
    if (!strcmp(name, "avx512")) { pi_k = &pi_kernels_avx512; return 0; }
    if (!strcmp(name, "avx2")) { pi_k = &pi_kernels_avx2; return 0; }
#endif
    pi_k = &pi_kernels_portable;
    return 0;
}

int pi_cpu_feature(const char *name) {
#if defined(PI_X86)
    __builtin_cpu_init();
#define F(s) if (!strcmp(name, s)) return __builtin_cpu_supports(s) ? 1 : 0;
    F("sse4.2") F("avx") F("avx2") F("fma") F("f16c") F("avx512f") F("avx512bw") F("avx512vl") F("avx512dq")
    F("avx512vnni") F("avx512bf16")
#undef F
#endif
    (void)name;
    return 0;
}
