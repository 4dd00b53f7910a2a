// Fused block-circulant product for few rows (decode) on the CPU: bcllm.kernel builds this file
// on first use through torch's extension mechanism. Conventions as in bcllm/circulant.py
// (docs/DESIGN.md sections 1 and 4): x (n, in) float32, planar spectra (2, F, q, p) float32 (real
// parts, then imaginary parts), F = b/2 + 1,
//
//   x_hat[r, i, f] = sum_t x[r, i*b + t] exp(-2 pi i f t / b)              (real DFT of each block)
//   y_hat[r, j, f] = sum_i x_hat[r, i, f] spec[f, i, j]                     (complex multiply-accumulate)
//   y[r, j*b + t]  = irfft(y_hat[r, j, :])[t]                               (inverse real DFT)
//
// in one pass that reads every spectrum value once, in memory order (two streams, real and
// imaginary). The complex products are real multiply-adds on the planar parts, Re += xr Sr - xi Si
// and Im += xr Si + xi Sr, four input blocks at a time: no shuffles in the inner loop. With
// several threads each takes a contiguous range of frequencies and adds its frequencies' share of
// the inverse DFT into its own output, summed at the end: the inverse DFT is linear in y_hat.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

namespace {

struct Tables {
  std::vector<float> fwd_re, fwd_im;  // (b, F): cos(2 pi f t / b), -sin(2 pi f t / b)
  std::vector<float> inv_re, inv_im;  // (F, b): w_f cos(2 pi f t / b) / b, -w_f sin(2 pi f t / b) / b
};

// DFT tables for block size b, computed once (in double) and kept for the life of the process.
const Tables& tables(int64_t b) {
  static std::mutex mutex;
  static std::map<int64_t, Tables> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(b);
  if (found != cache.end()) return found->second;
  const int64_t F = b / 2 + 1;
  Tables t;
  t.fwd_re.resize(b * F); t.fwd_im.resize(b * F); t.inv_re.resize(F * b); t.inv_im.resize(F * b);
  for (int64_t f = 0; f < F; ++f) {
    // irfft counts each frequency twice (its mirror), except f = 0 and the Nyquist frequency
    const double w = (f == 0 || (b % 2 == 0 && f == b / 2)) ? 1.0 : 2.0;
    for (int64_t s = 0; s < b; ++s) {
      const double angle = 2.0 * M_PI * double((f * s) % b) / double(b);
      t.fwd_re[s * F + f] = float(std::cos(angle));
      t.fwd_im[s * F + f] = float(-std::sin(angle));
      t.inv_re[f * b + s] = float(w * std::cos(angle) / b);
      t.inv_im[f * b + s] = float(-w * std::sin(angle) / b);
    }
  }
  return cache.emplace(b, std::move(t)).first->second;
}

struct Problem {
  const float* x;     // (n, in)
  const float* spec;  // (2, F, q, p): real parts, then imaginary parts
  int64_t n, in, out, b, F, q, p;
};

// 16 floats (one AVX-512 register, two AVX ones): GCC/Clang vector extensions, unaligned access.
typedef float vec __attribute__((vector_size(64), aligned(4)));
constexpr int64_t V = 16;
inline __attribute__((always_inline)) vec load(const float* p) { vec v; std::memcpy(&v, p, sizeof v); return v; }
inline __attribute__((always_inline)) void store(float* p, const vec& v) { std::memcpy(p, &v, sizeof v); }

// x_hat, frequency-major per row: xr[(r * F + f) * q + i] (and xi); the last block is zero-padded.
// Vectorised over input blocks: the row is first transposed to xt[t][i] (b x q, q rounded up).
// Inputs t and b - t share cos and have opposite sin, so their sum and difference halve the work:
// Re = x[0] + sum_s (x[s] + x[b-s]) cos + [b even] x[b/2] cos(pi f), Im = -sum_s (x[s] - x[b-s]) sin.
void forward_dft(const Problem& P, const Tables& t, float* xr, float* xi) {
  const int64_t b = P.b, F = P.F, q = P.q, qv = (q + V - 1) / V * V, h = (b - 1) / 2;
  std::vector<float> xt(b * qv), sum(h * qv), diff(h * qv);
  for (int64_t r = 0; r < P.n; ++r) {
    std::fill(xt.begin(), xt.end(), 0.f);
    const float* xs = P.x + r * P.in;
    for (int64_t i = 0; i < q; ++i) {
      for (int64_t s = 0, len = std::min(b, P.in - i * b); s < len; ++s) xt[s * qv + i] = xs[i * b + s];
    }
    for (int64_t s = 1; s <= h; ++s) {
      for (int64_t l = 0; l < qv; ++l) {
        sum[(s - 1) * qv + l] = xt[s * qv + l] + xt[(b - s) * qv + l];
        diff[(s - 1) * qv + l] = xt[s * qv + l] - xt[(b - s) * qv + l];
      }
    }
    for (int64_t i0 = 0; i0 < q; i0 += V) {
      const int64_t width = std::min(V, q - i0);
      for (int64_t f = 0; f < F; ++f) {
        vec re = load(xt.data() + i0), im = {};
        for (int64_t s = 1; s <= h; ++s) {
          re += t.fwd_re[s * F + f] * load(sum.data() + (s - 1) * qv + i0);
          im += t.fwd_im[s * F + f] * load(diff.data() + (s - 1) * qv + i0);
        }
        if (b % 2 == 0 && b > 1) re += t.fwd_re[b / 2 * F + f] * load(xt.data() + b / 2 * qv + i0);
        float out[2 * V];
        store(out, re);
        store(out + V, im);
        std::copy(out, out + width, xr + (r * P.F + f) * q + i0);
        std::copy(out + V, out + V + width, xi + (r * P.F + f) * q + i0);
      }
    }
  }
}

// acc_r[r] += Re(x_hat) Sr - Im(x_hat) Si and acc_i[r] += Re(x_hat) Si + Im(x_hat) Sr over a group
// of G consecutive input blocks i: G rows of the real and G of the imaginary spectra (p contiguous
// floats each), read once per call.
template <int G>
void accumulate_group(const Problem& P, const float* xr, const float* xi, int64_t f, int64_t i, float* acc_r,
                      float* acc_i) {
  const int64_t p = P.p, q = P.q, pv = p / V * V;
  const float* __restrict__ sr = P.spec + (f * q + i) * p;
  const float* __restrict__ si = P.spec + ((P.F + f) * q + i) * p;
  for (int64_t r = 0; r < P.n; ++r) {
    float a[G], c[G];  // held in registers across the loop (the stores below cannot change them)
    for (int g = 0; g < G; ++g) {
      a[g] = xr[(r * P.F + f) * q + i + g];
      c[g] = xi[(r * P.F + f) * q + i + g];
    }
    float* __restrict__ pr = acc_r + r * p;
    float* __restrict__ pi = acc_i + r * p;
    int64_t k = 0;
    for (; k < pv; k += V) {
      vec vr[G], vi[G];  // all loads first: the compiler need not prove the stores below alias none of them
      for (int g = 0; g < G; ++g) {
        if (r == 0) {  // the next group's lines: keeps memory busy
          __builtin_prefetch(sr + (G + g) * p + k);
          __builtin_prefetch(si + (G + g) * p + k);
        }
        vr[g] = load(sr + g * p + k);
        vi[g] = load(si + g * p + k);
      }
      vec yr = load(pr + k), yi = load(pi + k);
      for (int g = 0; g < G; ++g) {
        yr += a[g] * vr[g] - c[g] * vi[g];
        yi += a[g] * vi[g] + c[g] * vr[g];
      }
      store(pr + k, yr);
      store(pi + k, yi);
    }
    if (k < p) {  // the last partial vector: through zero-padded copies, still vectorised
      const int64_t left = p - k;
      float tr[G][V] = {}, ti[G][V] = {}, ar[V] = {}, ai[V] = {};
      for (int g = 0; g < G; ++g) {
        std::copy(sr + g * p + k, sr + g * p + p, tr[g]);
        std::copy(si + g * p + k, si + g * p + p, ti[g]);
      }
      std::copy(pr + k, pr + p, ar);
      std::copy(pi + k, pi + p, ai);
      vec yr = load(ar), yi = load(ai);
      for (int g = 0; g < G; ++g) {
        const vec vr = load(tr[g]), vi = load(ti[g]);
        yr += a[g] * vr - c[g] * vi;
        yi += a[g] * vi + c[g] * vr;
      }
      store(ar, yr);
      store(ai, yi);
      std::copy(ar, ar + left, pr + k);
      std::copy(ai, ai + left, pi + k);
    }
  }
}

void multiply_accumulate(const Problem& P, const float* xr, const float* xi, int64_t f, float* acc_r,
                         float* acc_i) {
  int64_t i = 0;
  for (; i + 4 <= P.q; i += 4) accumulate_group<4>(P, xr, xi, f, i, acc_r, acc_i);
  for (; i < P.q; ++i) accumulate_group<1>(P, xr, xi, f, i, acc_r, acc_i);
}

// y[r, j*b + t] = sum over f in [f0, f1) of the inverse DFT terms of y_hat[r, j, f], cropped to
// `out` columns. B > 0: the block size, a multiple of V known at compile time (held in registers).
template <int64_t B>
void inverse_dft(const Problem& P, const Tables& t, const float* yr, const float* yi, int64_t f0, int64_t f1,
                 float* y) {
  const int64_t b = B > 0 ? B : P.b, nf = f1 - f0;
  std::vector<float> acc(b);
  for (int64_t r = 0; r < P.n; ++r) {
    for (int64_t j = 0; j < P.p; ++j) {
      const int64_t start = j * b, len = std::min(b, P.out - start);
      if (len <= 0) break;
      const float* a = yr + (r * P.p + j) * nf;
      const float* c = yi + (r * P.p + j) * nf;
      if constexpr (B > 0) {
        vec sum[B / V] = {};
        for (int64_t f = 0; f < nf; ++f) {
          const float* u = t.inv_re.data() + (f0 + f) * B;
          const float* v = t.inv_im.data() + (f0 + f) * B;
          for (int64_t k = 0; k < B / V; ++k) sum[k] += a[f] * load(u + k * V) + c[f] * load(v + k * V);
        }
        for (int64_t k = 0; k < B / V; ++k) store(acc.data() + k * V, sum[k]);
      } else {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t f = 0; f < nf; ++f) {
          const float* u = t.inv_re.data() + (f0 + f) * b;
          const float* v = t.inv_im.data() + (f0 + f) * b;
          for (int64_t s = 0; s < b; ++s) acc[s] += a[f] * u[s] + c[f] * v[s];
        }
      }
      std::copy(acc.begin(), acc.begin() + len, y + r * P.out + start);
    }
  }
}

// Frequencies [f0, f1): their multiply-accumulate over all blocks, then their share of the
// inverse DFT, written (not added) into y (n, out).
void frequency_range(const Problem& P, const Tables& t, const float* xr, const float* xi, int64_t f0, int64_t f1,
                     float* y) {
  const int64_t nf = f1 - f0;
  std::vector<float> acc_r(P.n * P.p), acc_i(P.n * P.p), yr(P.n * P.p * nf), yi(P.n * P.p * nf);
  for (int64_t f = f0; f < f1; ++f) {
    std::fill(acc_r.begin(), acc_r.end(), 0.f);
    std::fill(acc_i.begin(), acc_i.end(), 0.f);
    multiply_accumulate(P, xr, xi, f, acc_r.data(), acc_i.data());
    for (int64_t e = 0; e < P.n * P.p; ++e) {
      yr[e * nf + f - f0] = acc_r[e];
      yi[e * nf + f - f0] = acc_i[e];
    }
  }
  switch (P.b) {
    case 16: inverse_dft<16>(P, t, yr.data(), yi.data(), f0, f1, y); break;
    case 32: inverse_dft<32>(P, t, yr.data(), yi.data(), f0, f1, y); break;
    case 64: inverse_dft<64>(P, t, yr.data(), yi.data(), f0, f1, y); break;
    case 128: inverse_dft<128>(P, t, yr.data(), yi.data(), f0, f1, y); break;
    default: inverse_dft<0>(P, t, yr.data(), yi.data(), f0, f1, y);
  }
}

}  // namespace

// y = x @ W.T for the block-circulant W whose spectra are `spec`; `threads` > 1 splits the
// frequencies over that many tasks on torch's intra-op thread pool.
torch::Tensor circulant_decode(const torch::Tensor& x, const torch::Tensor& spec, int64_t out_features,
                               int64_t in_features, int64_t block_size, int64_t threads) {
  TORCH_CHECK(x.device().is_cpu() && spec.device().is_cpu(), "circulant_decode: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "circulant_decode: x must be (n, in) float32");
  TORCH_CHECK(spec.dim() == 4 && spec.size(0) == 2 && spec.scalar_type() == torch::kFloat32 && spec.is_contiguous(),
              "circulant_decode: spectra must be contiguous planar (2, F, q, p) float32");
  const int64_t b = block_size, F = spec.size(1), q = spec.size(2), p = spec.size(3);
  TORCH_CHECK(b >= 1 && F == b / 2 + 1, "circulant_decode: spectra have ", F, " frequencies, block size ", b);
  TORCH_CHECK(x.size(1) == in_features && q == (in_features + b - 1) / b,
              "circulant_decode: x has ", x.size(1), " columns, in_features ", in_features, ", ", q, " input blocks");
  TORCH_CHECK(out_features >= 1 && out_features <= p * b, "circulant_decode: out_features ", out_features,
              " does not fit ", p, " output blocks of ", b);
  const torch::Tensor xc = x.contiguous();
  const int64_t n = xc.size(0);
  torch::Tensor y = torch::empty({n, out_features}, xc.options());
  if (n == 0) return y;
  const Problem P{xc.data_ptr<float>(), spec.data_ptr<float>(),
                  n, in_features, out_features, b, F, q, p};
  const Tables& t = tables(b);
  std::vector<float> xr(n * F * q), xi(n * F * q);
  forward_dft(P, t, xr.data(), xi.data());
  const int64_t parts = std::max<int64_t>(1, std::min(threads, F));
  if (parts == 1) {
    frequency_range(P, t, xr.data(), xi.data(), 0, F, y.data_ptr<float>());
    return y;
  }
  std::vector<std::vector<float>> partial(parts);  // part 0 writes y itself
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      float* dst = y.data_ptr<float>();
      if (k > 0) { partial[k].resize(n * out_features); dst = partial[k].data(); }
      frequency_range(P, t, xr.data(), xi.data(), k * F / parts, (k + 1) * F / parts, dst);
    }
  });
  float* __restrict__ dst = y.data_ptr<float>();
  for (int64_t k = 1; k < parts; ++k) {
    const float* __restrict__ src = partial[k].data();
    for (int64_t e = 0; e < n * out_features; ++e) dst[e] += src[e];
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("circulant_decode", &circulant_decode, "fused block-circulant product for few rows (CPU, float32)");
}
