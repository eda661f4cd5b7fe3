// Fused CPU kernels of ssd4rec_torchrec (built on first use by ssd4rec_torchrec/ops/native.py).
//
// Each op has a pure-torch reference in the Python package; tests compare the two. Ops are registered
// under torch.ops.ssd4rec_cpu (schema below) and take contiguous float32/float64 CPU tensors.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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


// ---- gated RMSNorm (Mamba-2 RMSNormGated, norm_before_gate=False): y = u * rsqrt(mean_group(u^2) + eps) * w,
// u = x * silu(z). fp32; x and z may have a row stride (column slices of a wider tensor), y is contiguous.

using ssd4rec_math::exp_approx;
using ssd4rec_math::sigmoid_approx;

// Sum of a[0..n) in 16 independent lanes (vectorisable without reassociating one accumulator).
inline float lane_sum(const float* __restrict a, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j];
  float s = 0;
  for (; i < n; ++i) s += a[i];
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

void gated_rms_forward_rows(const float* __restrict x, int64_t sx, const float* __restrict z, int64_t sz,
                            const float* __restrict w, float* __restrict y, float* __restrict r, int64_t H,
                            int64_t n, float eps, int64_t t0, int64_t t1, float* __restrict sq) {
  const int64_t G = H / n;
  for (int64_t t = t0; t < t1; ++t) {
    const float* xr = x + t * sx;
    const float* zr = z + t * sz;
    float* yr = y + t * H;
    for (int64_t c = 0; c < H; ++c) {
      const float u = xr[c] * (zr[c] * sigmoid_approx(zr[c]));
      yr[c] = u;
      sq[c] = u * u;
    }
    for (int64_t g = 0; g < G; ++g) {
      const float rr = 1.0f / std::sqrt(lane_sum(sq + g * n, n) / float(n) + eps);
      r[t * G + g] = rr;
      float* yg = yr + g * n;
      const float* wg = w + g * n;
      for (int64_t c = 0; c < n; ++c) yg[c] = yg[c] * rr * wg[c];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> gated_rms_norm_forward(const at::Tensor& x, const at::Tensor& z,
                                                          const at::Tensor& weight, double eps,
                                                          int64_t group_size) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && z.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "gated_rms_norm_forward: float32 x, z, weight expected");
  TORCH_CHECK(x.dim() == 2 && z.sizes() == x.sizes() && x.stride(1) == 1 && z.stride(1) == 1,
              "gated_rms_norm_forward: x, z must be (T, H) with unit column stride");
  const int64_t T = x.size(0), H = x.size(1), n = group_size;
  TORCH_CHECK(n > 0 && H % n == 0 && weight.numel() == H && weight.is_contiguous(),
              "gated_rms_norm_forward: bad group_size or weight");
  at::Tensor y = at::empty({T, H}, x.options());
  at::Tensor r = at::empty({T, H / n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* rp = r.data_ptr<float>();
  const int64_t sx = x.stride(0), sz = z.stride(0);
  at::parallel_for(0, T, 256, [&](int64_t a, int64_t b) {
    std::vector<float> sq(H);
    gated_rms_forward_rows(xp, sx, zp, sz, wp, yp, rp, H, n, float(eps), a, b, sq.data());
  });
  return {y, r};
}

// Backward with g = silu(z), u = x g, P = dy u, m = r^3 sum_group(P w) / n:
// dw = sum_t r P, du = r w dy - m u, dx = du g, dz = silu'(z) du x.
void gated_rms_backward_rows(const float* __restrict dy, const float* __restrict x, int64_t sx,
                             const float* __restrict z, int64_t sz, const float* __restrict w,
                             const float* __restrict r, float* __restrict dx, float* __restrict dz,
                             float* __restrict dw, int64_t H, int64_t n, int64_t t0, int64_t t1,
                             float* __restrict p, float* __restrict u, float* __restrict sg,
                             float* __restrict pw) {
  const int64_t G = H / n;
  for (int64_t t = t0; t < t1; ++t) {
    const float* xr = x + t * sx;
    const float* zr = z + t * sz;
    const float* dyr = dy + t * H;
    for (int64_t c = 0; c < H; ++c) {
      const float s = sigmoid_approx(zr[c]);
      sg[c] = s;
      u[c] = xr[c] * (zr[c] * s);
      p[c] = dyr[c] * u[c];
      pw[c] = p[c] * w[c];
    }
    float* dxr = dx + t * H;
    float* dzr = dz + t * H;
    for (int64_t g = 0; g < G; ++g) {
      const float rr = r[t * G + g];
      const float m = rr * rr * rr * lane_sum(pw + g * n, n) / float(n);
      for (int64_t c = g * n; c < (g + 1) * n; ++c) {
        dw[c] += rr * p[c];
        const float du = rr * w[c] * dyr[c] - m * u[c];
        const float s = sg[c];
        dxr[c] = du * (zr[c] * s);
        dzr[c] = du * xr[c] * (s * (1.0f + zr[c] * (1.0f - s)));
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_rms_norm_backward(const at::Tensor& grad_in,
                                                                       const at::Tensor& x, const at::Tensor& z,
                                                                       const at::Tensor& weight,
                                                                       const at::Tensor& r, int64_t group_size) {
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat, "gated_rms_norm_backward: float32 grad expected");
  const at::Tensor dy = grad_in.contiguous();
  const int64_t T = x.size(0), H = x.size(1), n = group_size;
  TORCH_CHECK(dy.sizes() == x.sizes() && r.is_contiguous() && r.size(0) == T && r.size(1) == H / n,
              "gated_rms_norm_backward: shape mismatch");
  at::Tensor dx = at::empty({T, H}, x.options());
  at::Tensor dz = at::empty({T, H}, x.options());
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (T + 255) / 256));
  at::Tensor dw_parts = at::zeros({chunks, H}, x.options());
  const float* dyp = dy.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* rp = r.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  float* dzp = dz.data_ptr<float>();
  float* dwp = dw_parts.data_ptr<float>();
  const int64_t sx = x.stride(0), sz = z.stride(0);
  const int64_t per = (T + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t a, int64_t b) {
    std::vector<float> scratch(4 * H);
    for (int64_t k = a; k < b; ++k) {
      const int64_t t0 = k * per, t1 = std::min(T, t0 + per);
      if (t0 < t1)
        gated_rms_backward_rows(dyp, xp, sx, zp, sz, wp, rp, dxp, dzp, dwp + k * H, H, n, t0, t1, scratch.data(),
                                scratch.data() + H, scratch.data() + 2 * H, scratch.data() + 3 * H);
    }
  });
  return {dx, dz, dw_parts.sum(0)};
}

// ---- segment-resetting causal depthwise conv1d (+ SiLU) over packed rows (Mamba-2's short conv with seq_idx):
// pre[t] = bias + sum_{k <= min(W-1, pos[t])} wT[W-1-k] * x[t-k], y = silu(pre) (or pre). pos[t]: the row's
// position in its segment, so a row never reads another segment. fp32; x may have a row stride.

void conv_pre_row(const float* __restrict x, int64_t sx, const float* __restrict wT, const float* __restrict bias,
                  int64_t W, int64_t C, int64_t t, int32_t pos, float* __restrict acc) {
  const float* xr = x + t * sx;
  const float* wl = wT + (W - 1) * C;
  if (bias != nullptr) {
    for (int64_t c = 0; c < C; ++c) acc[c] = bias[c] + wl[c] * xr[c];
  } else {
    for (int64_t c = 0; c < C; ++c) acc[c] = wl[c] * xr[c];
  }
  const int64_t kmax = std::min<int64_t>(W - 1, pos);
  for (int64_t k = 1; k <= kmax; ++k) {
    const float* xk = x + (t - k) * sx;
    const float* wk = wT + (W - 1 - k) * C;
    for (int64_t c = 0; c < C; ++c) acc[c] += wk[c] * xk[c];
  }
}

at::Tensor varlen_conv_forward(const at::Tensor& x, const at::Tensor& wT_in, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& pos_in, bool silu) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "varlen_conv_forward: float32 (T, C) x with unit column stride expected");
  const at::Tensor wT = wT_in.contiguous();
  const at::Tensor pos = pos_in.contiguous();
  const int64_t T = x.size(0), C = x.size(1), W = wT.size(0);
  TORCH_CHECK(wT.scalar_type() == at::kFloat && wT.size(1) == C && pos.scalar_type() == at::kInt &&
              pos.numel() == T, "varlen_conv_forward: bad weight or positions");
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();
  at::Tensor y = at::empty({T, C}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = wT.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int32_t* pp = pos.data_ptr<int32_t>();
  float* yp = y.data_ptr<float>();
  const int64_t sx = x.stride(0);
  at::parallel_for(0, T, 256, [&](int64_t a, int64_t e) {
    for (int64_t t = a; t < e; ++t) {
      float* yr = yp + t * C;
      conv_pre_row(xp, sx, wp, bp, W, C, t, pp[t], yr);
      if (silu)
        for (int64_t c = 0; c < C; ++c) yr[c] = yr[c] * sigmoid_approx(yr[c]);
    }
  });
  return y;
}

// Backward: gpre = dy * silu'(pre) (pre recomputed from x), dx[t] = sum_k [pos[t+k] >= k] wT[W-1-k] * gpre[t+k],
// dwT[W-1-k] = sum_t [k <= pos[t]] gpre[t] * x[t-k], dbias = sum_t gpre[t]. dy comes as column blocks (`grads`,
// widths summing to C) joined per row. Rows are processed in blocks of kRows (gpre of a block and its W-1
// following rows in a small buffer); per-thread partial sums for dwT and dbias.
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_conv_backward(at::TensorList grads, const at::Tensor& x,
                                                                    const at::Tensor& wT_in,
                                                                    const c10::optional<at::Tensor>& bias,
                                                                    const at::Tensor& pos_in, bool silu) {
  const at::Tensor wT = wT_in.contiguous();
  const at::Tensor pos = pos_in.contiguous();
  const int64_t T = x.size(0), C = x.size(1), W = wT.size(0);
  std::vector<const float*> gptr;
  std::vector<int64_t> gstride, gcol;
  int64_t col = 0;
  for (const auto& g : grads) {
    TORCH_CHECK(g.scalar_type() == at::kFloat && g.dim() == 2 && g.size(0) == T && g.stride(1) == 1,
                "varlen_conv_backward: float32 (T, c) gradient blocks with unit column stride expected");
    gptr.push_back(g.data_ptr<float>());
    gstride.push_back(g.stride(0));
    gcol.push_back(col);
    col += g.size(1);
  }
  TORCH_CHECK(col == C, "varlen_conv_backward: gradient blocks must cover the C columns");
  gcol.push_back(C);
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();
  at::Tensor dx = at::empty({T, C}, x.options());
  constexpr int64_t kRows = 128;
  const int64_t nblocks = (T + kRows - 1) / kRows;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
  at::Tensor dw_parts = at::zeros({chunks, W, C}, x.options());
  at::Tensor db_parts = at::zeros({chunks, C}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = wT.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int32_t* pp = pos.data_ptr<int32_t>();
  float* dxp = dx.data_ptr<float>();
  float* dwp_all = dw_parts.data_ptr<float>();
  float* dbp_all = db_parts.data_ptr<float>();
  const int64_t sx = x.stride(0);
  const int64_t per = (nblocks + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t ca, int64_t cb) {
    std::vector<float> gbuf((kRows + W) * C);
    std::vector<float> pre(C);
    for (int64_t chunk = ca; chunk < cb; ++chunk) {
      float* __restrict dwT = dwp_all + chunk * W * C;
      float* __restrict db = dbp_all + chunk * C;
      const int64_t blk_end = std::min(nblocks, (chunk + 1) * per);
      for (int64_t blk = chunk * per; blk < blk_end; ++blk) {
        const int64_t s = blk * kRows, e = std::min(T, s + kRows), ext = std::min(T, e + W - 1);
        for (int64_t t = s; t < ext; ++t) {  // gpre of rows s .. ext-1 (rows >= e feed dx of rows < e)
          float* __restrict gr = gbuf.data() + (t - s) * C;
          for (size_t i = 0; i + 1 < gcol.size(); ++i) {
            const float* __restrict src = gptr[i] + t * gstride[i];
            const int64_t c0 = gcol[i], c1 = gcol[i + 1];
            for (int64_t c = c0; c < c1; ++c) gr[c] = src[c - c0];
          }
          if (silu) {
            float* __restrict pr = pre.data();
            conv_pre_row(xp, sx, wp, bp, W, C, t, pp[t], pr);
            for (int64_t c = 0; c < C; ++c) {
              const float sg = sigmoid_approx(pr[c]);
              gr[c] = gr[c] * (sg * (1.0f + pr[c] * (1.0f - sg)));
            }
          }
        }
        for (int64_t t = s; t < e; ++t) {
          const float* __restrict g0 = gbuf.data() + (t - s) * C;
          float* __restrict dxr = dxp + t * C;
          const float* __restrict wl = wp + (W - 1) * C;
          for (int64_t c = 0; c < C; ++c) dxr[c] = wl[c] * g0[c];
          for (int64_t k = 1; k < W && t + k < ext; ++k) {
            if (pp[t + k] < k) break;  // row t+k starts a later segment (so do all rows after it)
            const float* __restrict gk = g0 + k * C;
            const float* __restrict wk = wp + (W - 1 - k) * C;
            for (int64_t c = 0; c < C; ++c) dxr[c] += wk[c] * gk[c];
          }
          const int64_t kmax = std::min<int64_t>(W - 1, pp[t]);
          for (int64_t k = 0; k <= kmax; ++k) {
            const float* __restrict xk = xp + (t - k) * sx;
            float* __restrict dwk = dwT + (W - 1 - k) * C;
            for (int64_t c = 0; c < C; ++c) dwk[c] += g0[c] * xk[c];
          }
          for (int64_t c = 0; c < C; ++c) db[c] += g0[c];
        }
      }
    }
  });
  return {dx, dw_parts.sum(0), db_parts.sum(0)};
}

}  // namespace

TORCH_LIBRARY(ssd4rec_cpu, m) {
  m.def("dropout_forward(Tensor x, int seed, int threshold, float scale) -> (Tensor, Tensor)");
  m.def("scale_by_mask(Tensor grad, Tensor mask, float scale) -> Tensor");
  m.def("gated_rms_norm_forward(Tensor x, Tensor z, Tensor weight, float eps, int group_size) -> (Tensor, Tensor)");
  m.def("varlen_conv_forward(Tensor x, Tensor wT, Tensor? bias, Tensor pos, bool silu) -> Tensor");
  m.def("varlen_conv_backward(Tensor[] grads, Tensor x, Tensor wT, Tensor? bias, Tensor pos, bool silu) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("gated_rms_norm_backward(Tensor grad, Tensor x, Tensor z, Tensor weight, Tensor r, int group_size) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ssd4rec_cpu, CPU, m) {
  m.impl("dropout_forward", &dropout_forward);
  m.impl("scale_by_mask", &scale_by_mask);
  m.impl("gated_rms_norm_forward", &gated_rms_norm_forward);
  m.impl("gated_rms_norm_backward", &gated_rms_norm_backward);
  m.impl("varlen_conv_forward", &varlen_conv_forward);
  m.impl("varlen_conv_backward", &varlen_conv_backward);
}
