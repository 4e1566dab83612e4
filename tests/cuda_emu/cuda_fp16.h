// Host emulation of cuda_fp16.h for tests/test_cuda_emulated.py (GCC's _Float16 rounds to nearest).
#pragma once
typedef _Float16 __half;
inline float __half2float(__half h) { return float(h); }
inline __half __float2half_rn(float f) { return __half(f); }
