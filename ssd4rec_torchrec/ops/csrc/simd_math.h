// Vectorisable float math shared by the fused CPU kernels (cpu_kernels.cpp, prefix_reverse.cpp).
#pragma once

#include <cstdint>
#include <cstring>

namespace ssd4rec_math {

// exp(x) in float, Cephes' range reduction and degree-5 polynomial (about 1 ulp), written branch-free so
// that the compiler vectorises the loops that call it (std::exp does not vectorise without -ffast-math; the
// clamps need -fno-trapping-math to be if-converted).
inline float exp_approx(float x) {
  x = x < -87.3365478515625f ? -87.3365478515625f : x;  // exp underflows to 0 / overflows beyond these
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  const float t = x * 1.44269504088896341f;              // x / ln 2, in [-126, 127.5]
  const int32_t k = int32_t(t + 128.5f) - 128;           // round(t): truncating a positive value is floor
  const float fk = float(k);
  float r = x - fk * 0.693359375f;                       // x - k ln 2, ln 2 split in two for exactness
  r = r + fk * 2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (k + 127) << 23;                  // 2^k (k >= -126: a normal float)
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return y * two_k;
}

inline float sigmoid_approx(float z) { return 1.0f / (1.0f + exp_approx(-z)); }

}  // namespace ssd4rec_math
