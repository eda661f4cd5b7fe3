// Fused CPU kernels of ssd4rec_torchrec (built on first use by ssd4rec_torchrec/ops/native.py).
//
// Each op has a pure-torch reference in the Python package; tests compare the two. Ops are registered
// under torch.ops.ssd4rec_cpu (schema below) and take contiguous float32/float64 CPU tensors.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

namespace {

// Counter-based 32-bit mixer ("lowbias32", C. Wellons): a stateless hash of (seed, element index), so the
// mask does not depend on the thread count or on how the work is split.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// 15 uniform bits for element i under a 64-bit seed.
inline uint32_t field15(uint64_t i, uint32_t s0, uint32_t s1) {
  const uint32_t h = mix32(uint32_t(i) ^ s0);
  return mix32(h ^ (s1 + uint32_t(i >> 32) * 0x9E3779B9U)) >> 17;
}

template <typename scalar_t>
void dropout_forward_range(const scalar_t* __restrict x, scalar_t* __restrict y, uint8_t* __restrict mask,
                           int64_t begin, int64_t end, uint32_t s0, uint32_t s1, uint32_t threshold,
                           scalar_t scale) {
  for (int64_t i = begin; i < end; ++i) {
    const bool keep = field15(uint64_t(i), s0, s1) >= threshold;
    mask[i] = keep;
    y[i] = x[i] * (keep ? scale : scalar_t(0));
  }
}

template <typename scalar_t>
void scale_by_mask_range(const scalar_t* __restrict g, const uint8_t* __restrict mask, scalar_t* __restrict out,
                         int64_t n, scalar_t scale) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] * (mask[i] ? scale : scalar_t(0));
}

void check_float_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, ": expected a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, what,
              ": expected float32 or float64, got ", t.scalar_type());
}

// y = x * keep * scale with keep = (15-bit hash field of (seed, i)) >= threshold; returns (y, keep mask).
std::tuple<at::Tensor, at::Tensor> dropout_forward(const at::Tensor& x_in, int64_t seed, int64_t threshold,
                                                   double scale) {
  check_float_cpu(x_in, "dropout_forward");
  TORCH_CHECK(threshold >= 0 && threshold <= (1 << 15), "dropout_forward: threshold out of [0, 2^15]");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor mask = at::empty(x.sizes(), x.options().dtype(at::kBool));
  const uint64_t s = uint64_t(seed);
  const uint32_t s0 = uint32_t(s), s1 = uint32_t(s >> 32), thr = uint32_t(threshold);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dropout_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    uint8_t* mp = reinterpret_cast<uint8_t*>(mask.data_ptr<bool>());
    const scalar_t sc = scalar_t(scale);
    at::parallel_for(0, x.numel(), 1 << 15, [&](int64_t a, int64_t b) {
      dropout_forward_range<scalar_t>(xp, yp, mp, a, b, s0, s1, thr, sc);
    });
  });
  return {y, mask};
}

// grad * mask * scale (the dropout backward) in one pass.
at::Tensor scale_by_mask(const at::Tensor& grad_in, const at::Tensor& mask_in, double scale) {
  check_float_cpu(grad_in, "scale_by_mask");
  TORCH_CHECK(mask_in.scalar_type() == at::kBool && mask_in.sizes() == grad_in.sizes(),
              "scale_by_mask: mask must be a bool tensor of grad's shape");
  const at::Tensor g = grad_in.contiguous();
  const at::Tensor m = mask_in.contiguous();
  at::Tensor out = at::empty_like(g, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "scale_by_mask", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const uint8_t* mp = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t sc = scalar_t(scale);
    at::parallel_for(0, g.numel(), 1 << 15, [&](int64_t a, int64_t b) {
      scale_by_mask_range<scalar_t>(gp + a, mp + a, op + a, b - a, sc);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(ssd4rec_cpu, m) {
  m.def("dropout_forward(Tensor x, int seed, int threshold, float scale) -> (Tensor, Tensor)");
  m.def("scale_by_mask(Tensor grad, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ssd4rec_cpu, CPU, m) {
  m.impl("dropout_forward", &dropout_forward);
  m.impl("scale_by_mask", &scale_by_mask);
}
