// Native kernels of ops/prefix_reverse.py (the reverse SSD scan of every prefix) and a per-segment cumulative sum,
// registered into torch.ops.ssd4rec_cpu next to cpu_kernels.cpp's ops. The Python module states the mathematics
// and holds the torch reference the tests compare these with.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "simd_math.h"

namespace {

using ssd4rec_math::sigmoid_approx;

// ---- per-segment cumulative sum over rows: out[t] = sum of x over t's segment up to t (reverse: from t to the
// segment's end). fp32 in and out, double accumulators per column; segments run in parallel. Segments are the
// rows offsets[s]..offsets[s+1].

at::Tensor segment_cumsum(const at::Tensor& x_in, const at::Tensor& offsets_in, bool reverse) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "segment_cumsum: float32 (T, C) x expected");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t T = x.size(0), C = x.size(1), S = offsets.numel() - 1;
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(S >= 0 && (S == 0 || off[S] == T), "segment_cumsum: offsets must end at T");
  at::Tensor y = at::empty({T, C}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, S, 1, [&](int64_t a, int64_t e) {
    std::vector<double> acc(C);
    for (int64_t s = a; s < e; ++s) {
      std::fill(acc.begin(), acc.end(), 0.0);
      const int64_t lo = off[s], hi = off[s + 1];
      for (int64_t i = 0; i < hi - lo; ++i) {
        const int64_t t = reverse ? hi - 1 - i : lo + i;
        const float* xr = xp + t * C;
        float* yr = yp + t * C;
        for (int64_t c = 0; c < C; ++c) {
          acc[c] += xr[c];
          yr[c] = static_cast<float>(acc[c]);
        }
      }
    }
  });
  return y;
}


// ---- reverse SSD scan of every prefix, read at its end (ops/prefix_reverse.py states the math). Per segment
// (segments in parallel), one streaming pass over its rows with O(channels) scratch: the anti-causal conv of row
// k with its first j+1 taps, U_j(k) = SiLU(b + sum_{m<=j} w[:, W-1-m] x[k+m]), is recomputed where it is used,
// the decay-weighted coefficients are c_k = exp(sum_{i<k} dt_i A) dt_k, and every row t gets
//   y_t = sum_{k <= t-W+1} c_k (C^_s . B^_k) x^_k  +  sum_{j < W-1, j <= t-s} c_{t-j} (q_t . B^j_{t-j}) x^j_{t-j}
//         + D x_first(t)
// with q_t / x_first(t) the first token's C / x cut at t (its full conv U_{W-1} once t >= s+W-1). Double
// accumulators; decays below exp(-60) are 0 (as in the torch path). xBC (T, Ch), w (Ch, W), bias (Ch), dt (T, H),
// A (H), D (H, P) (zeros when the model has none), offsets (S+1) int64.

namespace prefix_rev {

constexpr double kLogDecayFloor = -60.0;

struct Dims {
  int64_t T, Ch, W, H, G, N, P, hpg, d_inner;
};

// pre = b + sum_{m<=j} w[:, W-1-m] x[k+m] (wT: (W, Ch) rows), u = silu(pre); rows k..k+j exist.
inline void conv_taps(const Dims& d, const float* x, const float* wT, const float* b, int64_t k, int64_t j,
                      float* __restrict pre, float* __restrict u) {
  const int64_t Ch = d.Ch, W = d.W;
  const float* xr = x + k * Ch;
  const float* wl = wT + (W - 1) * Ch;
  for (int64_t c = 0; c < Ch; ++c) pre[c] = b[c] + wl[c] * xr[c];
  for (int64_t m = 1; m <= j; ++m) {
    const float* xm = x + (k + m) * Ch;
    const float* wm = wT + (W - 1 - m) * Ch;
    for (int64_t c = 0; c < Ch; ++c) pre[c] += wm[c] * xm[c];
  }
  for (int64_t c = 0; c < Ch; ++c) u[c] = pre[c] * sigmoid_approx(pre[c]);
}

// Gradient of conv_taps: g = du * silu'(pre) for the columns [0, ncols); dx rows k..k+j, dwT, db.
inline void conv_taps_backward(const Dims& d, const float* x, const float* wT, int64_t k, int64_t j,
                               const float* __restrict pre, const float* __restrict du, int64_t ncols,
                               float* __restrict g, float* dx, double* dwT, double* db) {
  const int64_t Ch = d.Ch, W = d.W;
  for (int64_t c = 0; c < ncols; ++c) {
    const float sg = sigmoid_approx(pre[c]);
    g[c] = du[c] * (sg * (1.0f + pre[c] * (1.0f - sg)));
  }
  for (int64_t c = 0; c < ncols; ++c) db[c] += g[c];
  for (int64_t m = 0; m <= j; ++m) {
    const float* __restrict xm = x + (k + m) * Ch;
    float* __restrict dxm = dx + (k + m) * Ch;
    const float* __restrict wm = wT + (W - 1 - m) * Ch;
    double* __restrict dwm = dwT + (W - 1 - m) * Ch;
    for (int64_t c = 0; c < ncols; ++c) {
      dwm[c] += g[c] * xm[c];
      dxm[c] += g[c] * wm[c];
    }
  }
}

// c_k and E_k = exp(excl_k) for the rows of one segment, (L, H) row-major.
void decay_coefs(const Dims& d, const float* dt, const float* A, int64_t lo, int64_t L, std::vector<float>& E,
                 std::vector<float>& c) {
  E.assign(L * d.H, 0.0f);
  c.assign(L * d.H, 0.0f);
  for (int64_t h = 0; h < d.H; ++h) {
    double run = 0.0;
    for (int64_t i = 0; i < L; ++i) {
      const double dti = dt[(lo + i) * d.H + h];
      const float e = run > kLogDecayFloor ? static_cast<float>(std::exp(run)) : 0.0f;
      E[i * d.H + h] = e;
      c[i * d.H + h] = e * static_cast<float>(dti);
      run += dti * static_cast<double>(A[h]);
    }
  }
}

// The first token's convs cut after j taps (j < min(W, L)): pre (W, Ch) and U (W, Ch).
void first_rows(const Dims& d, const float* x, const float* wT, const float* b, int64_t lo, int64_t L,
                std::vector<float>& pre, std::vector<float>& U) {
  pre.assign(d.W * d.Ch, 0.0f);
  U.assign(d.W * d.Ch, 0.0f);
  for (int64_t j = 0; j < d.W; ++j)
    conv_taps(d, x + lo * d.Ch, wT, b, 0, std::min<int64_t>(j, L - 1), pre.data() + j * d.Ch, U.data() + j * d.Ch);
}

// r[g] = q_g · B_g for every group g (N values each) of a query row q (C columns) and a conv output's B columns,
// accumulated in Acc: double for the whole-window sum, float for the cut-conv terms.
template <typename Acc>
inline void group_dots(const Dims& d, const float* q, const float* uB, std::vector<double>& r) {
  for (int64_t gg = 0; gg < d.G; ++gg) {
    Acc dot = 0;
    for (int64_t n = 0; n < d.N; ++n) dot += static_cast<Acc>(q[gg * d.N + n]) * uB[gg * d.N + n];
    r[gg] = dot;
  }
}

std::vector<float> transpose_w(const float* w, int64_t Ch, int64_t W) {
  std::vector<float> wT(W * Ch);
  for (int64_t c = 0; c < Ch; ++c)
    for (int64_t m = 0; m < W; ++m) wT[m * Ch + c] = w[c * W + m];
  return wT;
}

}  // namespace prefix_rev

at::Tensor prefix_reverse_forward(const at::Tensor& xBC_in, const at::Tensor& w_in, const at::Tensor& b_in,
                                  const at::Tensor& dt_in, const at::Tensor& A_in, const at::Tensor& D_in,
                                  const at::Tensor& offsets_in, int64_t H, int64_t G, int64_t N) {
  using namespace prefix_rev;
  const at::Tensor xBC = xBC_in.contiguous(), w = w_in.contiguous(), b = b_in.contiguous();
  const at::Tensor dt = dt_in.contiguous(), A = A_in.contiguous(), D = D_in.contiguous();
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  for (const auto* t : {&xBC, &w, &b, &dt, &A, &D})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "prefix_reverse_forward: float32 tensors expected");
  Dims d{xBC.size(0), xBC.size(1), w.size(1), H, G, N, 0, H / G, xBC.size(1) - 2 * G * N};
  d.P = d.d_inner / H;
  const int64_t S = offsets.numel() - 1, Ch = d.Ch, W = d.W, P = d.P, Bo = d.d_inner, Co = d.d_inner + G * N;
  at::Tensor y = at::zeros({d.T, H, P}, xBC.options());
  const float *xp = xBC.data_ptr<float>(), *bp = b.data_ptr<float>();
  const float *dtp = dt.data_ptr<float>(), *Ap = A.data_ptr<float>(), *Dp = D.data_ptr<float>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  const std::vector<float> wT = transpose_w(w.data_ptr<float>(), Ch, W);
  at::parallel_for(0, S, 1, [&](int64_t sa, int64_t sb) {
    std::vector<float> E, c, fpre, first, pre(Ch), u(Ch);
    std::vector<double> acc(H * P), r(G);
    for (int64_t s = sa; s < sb; ++s) {
      const int64_t lo = off[s], L = off[s + 1] - lo;
      if (L == 0) continue;
      const float* xs = xp + lo * Ch;
      decay_coefs(d, dtp, Ap, lo, L, E, c);
      first_rows(d, xp, wT.data(), bp, lo, L, fpre, first);
      const float* Cs = first.data() + (W - 1) * Ch + Co;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t t = 0; t < L; ++t) {
        float* out = yp + (lo + t) * H * P;
        if (t >= W - 1) {  // the whole-window sum gains row k = t-W+1
          const int64_t k = t - W + 1;
          conv_taps(d, xs, wT.data(), bp, k, W - 1, pre.data(), u.data());
          group_dots<double>(d, Cs, u.data() + Bo, r);
          for (int64_t h = 0; h < H; ++h) {
            const double a = static_cast<double>(c[k * H + h]) * r[h / d.hpg];
            for (int64_t q = 0; q < P; ++q) acc[h * P + q] += a * u[h * P + q];
          }
          for (int64_t e = 0; e < H * P; ++e) out[e] = static_cast<float>(acc[e]);
        }
        const float* qrow = first.data() + std::min<int64_t>(t, W - 1) * Ch;
        for (int64_t j = 0; j <= std::min<int64_t>(W - 2, t); ++j) {
          const int64_t k = t - j;
          conv_taps(d, xs, wT.data(), bp, k, j, pre.data(), u.data());
          group_dots<float>(d, qrow + Co, u.data() + Bo, r);
          for (int64_t h = 0; h < H; ++h) {
            const float coef = static_cast<float>(c[k * H + h] * r[h / d.hpg]);
            for (int64_t q = 0; q < P; ++q) out[h * P + q] += coef * u[h * P + q];
          }
        }
        for (int64_t e = 0; e < H * P; ++e) out[e] += Dp[e] * qrow[e];
      }
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_reverse_backward(
    const at::Tensor& dy_in, const at::Tensor& xBC_in, const at::Tensor& w_in, const at::Tensor& b_in,
    const at::Tensor& dt_in, const at::Tensor& A_in, const at::Tensor& D_in, const at::Tensor& offsets_in,
    int64_t H, int64_t G, int64_t N) {
  using namespace prefix_rev;
  const at::Tensor dy = dy_in.contiguous(), xBC = xBC_in.contiguous(), w = w_in.contiguous(), b = b_in.contiguous();
  const at::Tensor dt = dt_in.contiguous(), A = A_in.contiguous(), D = D_in.contiguous();
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  Dims d{xBC.size(0), xBC.size(1), w.size(1), H, G, N, 0, H / G, xBC.size(1) - 2 * G * N};
  d.P = d.d_inner / H;
  const int64_t S = offsets.numel() - 1, T = d.T, Ch = d.Ch, W = d.W, P = d.P;
  const int64_t Bo = d.d_inner, Co = d.d_inner + G * N;
  at::Tensor dx = at::zeros({T, Ch}, xBC.options());
  at::Tensor ddt = at::zeros({T, H}, xBC.options());
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), S));
  at::Tensor dwT_parts = at::zeros({chunks, W, Ch}, at::kDouble);
  at::Tensor db_parts = at::zeros({chunks, Ch}, at::kDouble);
  at::Tensor dA_parts = at::zeros({chunks, H}, at::kDouble);
  at::Tensor dD_parts = at::zeros({chunks, H * P}, at::kDouble);
  const float *dyp = dy.data_ptr<float>(), *xp = xBC.data_ptr<float>(), *bp = b.data_ptr<float>();
  const float *dtp = dt.data_ptr<float>(), *Ap = A.data_ptr<float>(), *Dp = D.data_ptr<float>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  float *dxp = dx.data_ptr<float>(), *ddtp = ddt.data_ptr<float>();
  const std::vector<float> wT = transpose_w(w.data_ptr<float>(), Ch, W);
  const int64_t per = (S + chunks - 1) / chunks;
  const int64_t xB = d.d_inner + G * N;  // columns of x and B (the C columns of a non-first row get no gradient)
  at::parallel_for(0, chunks, 1, [&](int64_t ca, int64_t cb) {
    std::vector<float> E, c, fpre, first, dfirst, dcs, pre(Ch), u(Ch), du(Ch), gbuf(Ch);
    std::vector<double> R(H * P), r(G), dr(G), later(H);
    for (int64_t chunk = ca; chunk < cb; ++chunk) {
      double* dwT = dwT_parts.data_ptr<double>() + chunk * W * Ch;
      double* db = db_parts.data_ptr<double>() + chunk * Ch;
      double* dA = dA_parts.data_ptr<double>() + chunk * H;
      double* dD = dD_parts.data_ptr<double>() + chunk * H * P;
      for (int64_t s = chunk * per; s < std::min(S, (chunk + 1) * per); ++s) {
        const int64_t lo = off[s], L = off[s + 1] - lo;
        if (L == 0) continue;
        const float* xs = xp + lo * Ch;
        float* dxs = dxp + lo * Ch;
        decay_coefs(d, dtp, Ap, lo, L, E, c);
        first_rows(d, xp, wT.data(), bp, lo, L, fpre, first);
        dfirst.assign(W * Ch, 0.0f);  // extra gradient of the first token's U_j (query, skip input, C^_s)
        dcs.assign(L * H, 0.0f);      // dL/dc_k
        const float* Cs = first.data() + (W - 1) * Ch + Co;
        std::fill(R.begin(), R.end(), 0.0);
        std::fill(later.begin(), later.end(), 0.0);
        for (int64_t t = L - 1; t >= 0; --t) {
          const float* gy = dyp + (lo + t) * H * P;
          const int64_t jq = std::min<int64_t>(t, W - 1);
          const float* qrow = first.data() + jq * Ch;
          float* dqrow = dfirst.data() + jq * Ch;
          for (int64_t e = 0; e < H * P; ++e) {
            dD[e] += static_cast<double>(gy[e]) * qrow[e];
            dqrow[e] += Dp[e] * gy[e];
          }
          for (int64_t j = 0; j <= std::min<int64_t>(W - 2, t); ++j) {  // cut-conv terms of row t
            const int64_t k = t - j;
            conv_taps(d, xs, wT.data(), bp, k, j, pre.data(), u.data());
            group_dots<float>(d, qrow + Co, u.data() + Bo, r);
            std::fill(dr.begin(), dr.end(), 0.0);
            for (int64_t h = 0; h < H; ++h) {
              const float coef = static_cast<float>(c[k * H + h] * r[h / d.hpg]);
              float sdot = 0.0f;
              for (int64_t q = 0; q < P; ++q) {
                sdot += gy[h * P + q] * u[h * P + q];
                du[h * P + q] = coef * gy[h * P + q];
              }
              dcs[k * H + h] += static_cast<float>(sdot * r[h / d.hpg]);
              dr[h / d.hpg] += static_cast<double>(sdot) * c[k * H + h];
            }
            for (int64_t gg = 0; gg < G; ++gg)
              for (int64_t n = 0; n < N; ++n) {
                du[Bo + gg * N + n] = static_cast<float>(dr[gg]) * qrow[Co + gg * N + n];
                dqrow[Co + gg * N + n] += static_cast<float>(dr[gg]) * u[Bo + gg * N + n];
              }
            conv_taps_backward(d, xs, wT.data(), k, j, pre.data(), du.data(), xB, gbuf.data(), dxs, dwT, db);
          }
          if (t >= W - 1) {  // whole-window sum: row k = t-W+1 gets the sum of dy over rows >= t
            for (int64_t e = 0; e < H * P; ++e) R[e] += gy[e];
            const int64_t k = t - W + 1;
            conv_taps(d, xs, wT.data(), bp, k, W - 1, pre.data(), u.data());
            group_dots<double>(d, Cs, u.data() + Bo, r);
            std::fill(dr.begin(), dr.end(), 0.0);
            for (int64_t h = 0; h < H; ++h) {
              const double a = static_cast<double>(c[k * H + h]) * r[h / d.hpg];
              double dah = 0.0;
              for (int64_t q = 0; q < P; ++q) {
                dah += R[h * P + q] * u[h * P + q];
                du[h * P + q] = static_cast<float>(a * R[h * P + q]);
              }
              dcs[k * H + h] += static_cast<float>(dah * r[h / d.hpg]);
              dr[h / d.hpg] += dah * c[k * H + h];
            }
            float* dCs = dfirst.data() + (W - 1) * Ch + Co;
            for (int64_t gg = 0; gg < G; ++gg)
              for (int64_t n = 0; n < N; ++n) {
                du[Bo + gg * N + n] = static_cast<float>(dr[gg]) * Cs[gg * N + n];
                dCs[gg * N + n] += static_cast<float>(dr[gg]) * u[Bo + gg * N + n];
              }
            conv_taps_backward(d, xs, wT.data(), k, W - 1, pre.data(), du.data(), xB, gbuf.data(), dxs, dwT, db);
          }
          // dc_t is complete: c_t = E_t dt_t, E_t = exp(sum_{i<t} dt_i A)
          for (int64_t h = 0; h < H; ++h) {
            const double dct = dcs[t * H + h];
            ddtp[(lo + t) * H + h] = static_cast<float>(dct * E[t * H + h] + later[h] * Ap[h]);
            dA[h] += later[h] * dtp[(lo + t) * H + h];
            later[h] += dct * c[t * H + h];
          }
        }
        for (int64_t j = 0; j < W; ++j)  // the first token's U_j: query, skip input and C^_s gradients
          conv_taps_backward(d, xs, wT.data(), 0, std::min<int64_t>(j, L - 1), fpre.data() + j * Ch,
                             dfirst.data() + j * Ch, Ch, gbuf.data(), dxs, dwT, db);
      }
    }
  });
  at::Tensor dw = dwT_parts.sum(0).t().contiguous().to(at::kFloat);
  return {dx, dw, db_parts.sum(0).to(at::kFloat), ddt, dA_parts.sum(0).to(at::kFloat),
          dD_parts.sum(0).to(at::kFloat).view({H, P})};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ssd4rec_cpu, m) {
  m.def("segment_cumsum(Tensor x, Tensor offsets, bool reverse) -> Tensor");
  m.def("prefix_reverse_forward(Tensor xBC, Tensor w, Tensor b, Tensor dt, Tensor A, Tensor D, Tensor offsets, "
        "int H, int G, int N) -> Tensor");
  m.def("prefix_reverse_backward(Tensor dy, Tensor xBC, Tensor w, Tensor b, Tensor dt, Tensor A, Tensor D, "
        "Tensor offsets, int H, int G, int N) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ssd4rec_cpu, CPU, m) {
  m.impl("segment_cumsum", &segment_cumsum);
  m.impl("prefix_reverse_forward", &prefix_reverse_forward);
  m.impl("prefix_reverse_backward", &prefix_reverse_backward);
}
