// Host emulation of cuda_bf16.h for tests/test_cuda_emulated.py: storage + round-to-nearest-even.
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = uint32_t(b.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float g) {
  uint32_t u;
  std::memcpy(&u, &g, 4);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return __nv_bfloat16{(g != g) ? uint16_t(0x7fc0) : uint16_t(r)};
}
