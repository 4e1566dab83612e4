// Helpers shared by the CPU capture and sparse-loss kernels (csrc/cpu/capture.cpp,
// csrc/cpu/sparse_kd.cpp): element conversions, the exp used on max-shifted arguments (a scalar and
// an 8-lane GCC vector form), the online log-sum-exp over 512-element blocks, block maxima with a
// NaN flag, the static row-block runner over OpenMP threads and the dtype dispatch.
//
// Everything here is inline (always_inline) or a template, so each kernel file compiles it into its
// own row functions: those are cloned for x86-64-v3 (AVX2 + FMA) and baseline x86-64 with
// FKC_CLONES, and the helpers are compiled once per clone. ("arch=haswell" is not used because it
// also requires RDRND, which some virtual CPUs hide, silently leaving them on the baseline clone.)
// The dense kd kernel (csrc/cpu/kd.cpp) has its own exp and its own run-time ISA dispatch.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/problems.h"

// FKC_CLONES: compile a row function for x86-64-v3 and the baseline, picked by an ifunc at load.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FKC_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FKC_CLONES
#endif
#define FKC_INLINE inline __attribute__((always_inline))

namespace fastkd {
namespace cpu_cache {

constexpr int kBlock = 512;  // elements per block: a few float buffers of 2 KB, resident in L1

struct half_bf16 {
  uint16_t bits;
};

FKC_INLINE float widen(float x) { return x; }
FKC_INLINE double widen(double x) { return x; }
FKC_INLINE float widen(half_bf16 x) {
  const uint32_t b = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
FKC_INLINE float widen(_Float16 x) { return float(x); }

FKC_INLINE void narrow(float* o, float x) { *o = x; }
FKC_INLINE void narrow(double* o, double x) { *o = x; }
FKC_INLINE void narrow(half_bf16* o, float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;  // nearest, ties to even
  o->bits = (x != x) ? uint16_t(0x7fc0) : uint16_t(rounded);
}
FKC_INLINE void narrow(_Float16* o, float x) { *o = _Float16(x); }

// exp for arguments <= 0 (the only ones the kernels form: x − running max), vectorisable:
// x = n·ln2 + r with a two-constant reduction, e^r by a degree-6 Taylor-like minimax polynomial
// (Cephes coefficients), 2^n assembled in the exponent bits. Below −87 the result flushes to 0.
FKC_INLINE float vexp(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float magic = 12582912.0f;  // 1.5·2^23: x·log2e + magic holds round(x·log2e) in its mantissa
  const float shifted = xc * 1.44269504088896341f + magic;
  const float n = shifted - magic;
  int32_t ni;
  std::memcpy(&ni, &shifted, 4);
  ni -= 0x4B400000;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  float y = poly * r * r + r + 1.0f;
  const int32_t ebits = (ni + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &ebits, 4);
  y *= two_n;
  y = x < -87.0f ? 0.0f : y;
  return (x != x) ? x : y;
}
FKC_INLINE double vexp(double x) { return std::exp(x); }

template <typename Acc>
constexpr Acc ninf() {
  return -std::numeric_limits<Acc>::infinity();
}

// e^(m_old − m_new) for m_new >= m_old; 1 when both are still −inf (the sum is empty anyway).
template <typename Acc>
FKC_INLINE Acc rescale_factor(Acc m_old, Acc m_new) {
  return m_old == m_new ? Acc(1) : std::exp(m_old - m_new);
}

// out[i] = e^(x[i] − shift). The float version runs 8 lanes at a time through GCC vector types:
// plain loops calling vexp stayed scalar inside the target clones.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

FKC_INLINE v8f vexp8(v8f x) {
  const v8f zero = {};
  const v8f lo = zero - 87.0f;
  const v8f xc = x < lo ? lo : x;
  const v8f magic = zero + 12582912.0f;
  const v8f shifted = xc * 1.44269504088896341f + magic;
  const v8f n = shifted - magic;
  v8i ni;
  std::memcpy(&ni, &shifted, sizeof(ni));
  ni -= 0x4B400000;
  v8f r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  v8f poly = zero + 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  v8f y = poly * r * r + r + 1.0f;
  const v8i ebits = (ni + 127) << 23;
  v8f two_n;
  std::memcpy(&two_n, &ebits, sizeof(two_n));
  y = y * two_n;
  y = x < lo ? zero : y;
  return x != x ? x : y;
}

FKC_INLINE void exp_block(const float* x, int n, float shift, float* out) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f v;
    std::memcpy(&v, x + i, sizeof(v));
    v = vexp8(v - shift);
    std::memcpy(out + i, &v, sizeof(v));
  }
  for (; i < n; ++i) out[i] = vexp(x[i] - shift);
}
FKC_INLINE void exp_block(const double* x, int n, double shift, double* out) {
  for (int i = 0; i < n; ++i) out[i] = std::exp(x[i] - shift);
}

// Σ e^(x_i − m): the exponentials in a plain simd loop, then 8 independent partial sums (GCC turns
// the fixed 8-lane body into one vector add; an `omp simd reduction` here stayed scalar).
template <typename Acc>
FKC_INLINE Acc lane_sum(const Acc* e, int n) {
  Acc lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lane[l] += e[i + l];
  for (int l = 0; i + l < n; ++l) lane[l] += e[i + l];
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

template <typename Acc>
FKC_INLINE Acc sum_exp_shifted(const Acc* x, int n, Acc m) {
  alignas(64) Acc e[kBlock];
  exp_block(x, n, m, e);
  return lane_sum(e, n);
}

// Online (max, Σ e^(x − max)) over blocks; `absorb` folds one block of already scaled values.
template <typename Acc>
struct OnlineLse {
  Acc m = ninf<Acc>();
  Acc d = Acc(0);

  FKC_INLINE void absorb(const Acc* x, int n, Acc block_max) {
    if (block_max > m) {
      d *= rescale_factor(m, block_max);
      m = block_max;
    }
    if (m == ninf<Acc>()) return;  // everything so far is −inf: no mass
    d += sum_exp_shifted(x, n, m);
  }
  FKC_INLINE Acc value() const { return m + std::log(d); }
};

// Max of x[0, n), and nan_flag |= 1 if any of them is NaN.
template <typename Acc>
FKC_INLINE Acc block_max(const Acc* x, int n, int& nan_flag) {
  Acc mx = ninf<Acc>();
  int nanf = 0;
#pragma omp simd reduction(max : mx) reduction(| : nanf)
  for (int i = 0; i < n; ++i) {
    mx = x[i] > mx ? x[i] : mx;
    nanf |= int(x[i] != x[i]);
  }
  nan_flag |= nanf;
  return mx;
}

// fn over rows [0, P.n) in static contiguous blocks, one per OpenMP thread (P.num_threads, at most
// one per row): deterministic results independent of scheduling.
template <typename Problem>
void run_blocks(const Problem& P, void (*fn)(const Problem&, int64_t, int64_t)) {
  const int64_t n = P.n;
  if (n <= 0 || fn == nullptr) return;
  int nt = P.num_threads > 0 ? P.num_threads : 1;
  if (nt > n) nt = int(n);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    fn(P, n * tid / nth, n * (tid + 1) / nth);
  }
#else
  fn(P, 0, n);
#endif
}

template <typename Problem>
using RowsFn = void (*)(const Problem&, int64_t, int64_t);

// The row function of a dtype code (null for an unknown code: run_blocks then does nothing).
template <typename Problem>
RowsFn<Problem> pick(int dtype, RowsFn<Problem> f32, RowsFn<Problem> f64, RowsFn<Problem> bf16,
                     RowsFn<Problem> f16) {
  switch (dtype) {
    case kF32: return f32;
    case kF64: return f64;
    case kBF16: return bf16;
    case kF16: return f16;
    default: return nullptr;
  }
}

}  // namespace cpu_cache
}  // namespace fastkd
