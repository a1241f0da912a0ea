#include "core/sketch.h"

#include <ATen/Parallel.h>

#include <cstring>

namespace amalgam::core {
namespace {

// Eight lanes of float64 (and the float32 they are converted from): the
// compiler maps them onto the widest vectors the code is built for.
typedef double Doubles __attribute__((vector_size(64)));
typedef float Floats __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

// Built for x86-64 baseline, AVX2 and AVX-512, chosen when the library
// loads (the AVX-512 build runs the products 4x faster than SSE2 on the
// bench machine); one build elsewhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 11
#define AMALGAM_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AMALGAM_VECTOR_CLONES
#endif

// Loads eight lanes (inlined into each build: a vector passed by value
// would cross the baseline's calling convention).
inline __attribute__((always_inline)) void Load(const float* p, Doubles& d) {
  Floats f;
  std::memcpy(&f, p, sizeof f);
  d = __builtin_convertvector(f, Doubles);
}

inline __attribute__((always_inline)) void Load(const double* p, Doubles& d) {
  std::memcpy(&d, p, sizeof d);
}

// Rows of m taken together (fewer passes over the output, or over s).
constexpr int kRowBlock = 4;

// out[j][k] += sum over the rows i of m of s[j][i] m[i][k], for the columns
// k in [begin, end), rows in order (kRows of them at row `i`).
template <int kRows>
inline __attribute__((always_inline)) void AddRowsTimes(
    const double* s, const float* m, int64_t r, int64_t c, int64_t i,
    double* out, int64_t begin, int64_t end) {
  double w[kRows][kSketchRows];
  for (int q = 0; q < kRows; ++q) {
    for (int64_t j = 0; j < kSketchRows; ++j) w[q][j] = s[j * r + i + q];
  }
  int64_t k = begin;
  for (; k + kLanes <= end; k += kLanes) {
    Doubles v[kRows];
    for (int q = 0; q < kRows; ++q) Load(m + (i + q) * c + k, v[q]);
    for (int64_t j = 0; j < kSketchRows; ++j) {
      Doubles o;
      Load(out + j * c + k, o);
      for (int q = 0; q < kRows; ++q) o += v[q] * w[q][j];
      std::memcpy(out + j * c + k, &o, sizeof o);
    }
  }
  for (; k < end; ++k) {
    for (int64_t j = 0; j < kSketchRows; ++j) {
      for (int q = 0; q < kRows; ++q) {
        out[j * c + k] += static_cast<double>(m[(i + q) * c + k]) * w[q][j];
      }
    }
  }
}

AMALGAM_VECTOR_CLONES void SketchTimesColumns(const double* s, const float* m,
                                              int64_t r, int64_t c, double* out,
                                              int64_t begin, int64_t end) {
  int64_t i = 0;
  for (; i + kRowBlock <= r; i += kRowBlock) {
    AddRowsTimes<kRowBlock>(s, m, r, c, i, out, begin, end);
  }
  for (; i < r; ++i) AddRowsTimes<1>(s, m, r, c, i, out, begin, end);
}

// out[j][i] = sum over k of s[j][k] m[i][k] for kRows rows from row `i`:
// eight partial sums (k mod 8) added in lane order, then the last columns.
template <int kRows>
inline __attribute__((always_inline)) void DotRows(const double* s,
                                                   const float* m, int64_t r,
                                                   int64_t c, int64_t i,
                                                   double* out) {
  Doubles acc[kRows][kSketchRows] = {};
  int64_t k = 0;
  for (; k + kLanes <= c; k += kLanes) {
    Doubles sv[kSketchRows];
    for (int64_t j = 0; j < kSketchRows; ++j) Load(s + j * c + k, sv[j]);
    for (int q = 0; q < kRows; ++q) {
      Doubles v;
      Load(m + (i + q) * c + k, v);
      for (int64_t j = 0; j < kSketchRows; ++j) acc[q][j] += v * sv[j];
    }
  }
  for (int q = 0; q < kRows; ++q) {
    for (int64_t j = 0; j < kSketchRows; ++j) {
      double sum = 0;
      for (int64_t l = 0; l < kLanes; ++l) sum += acc[q][j][l];
      for (int64_t t = k; t < c; ++t) {
        sum += static_cast<double>(m[(i + q) * c + t]) * s[j * c + t];
      }
      out[j * r + i + q] = sum;
    }
  }
}

AMALGAM_VECTOR_CLONES void SketchTimesRows(const double* s, const float* m,
                                           int64_t r, int64_t c, double* out,
                                           int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + kRowBlock <= end; i += kRowBlock) {
    DotRows<kRowBlock>(s, m, r, c, i, out);
  }
  for (; i < end; ++i) DotRows<1>(s, m, r, c, i, out);
}

// Work items per thread at the least: columns, and rows of c elements.
constexpr int64_t kColumnGrain = 512;
constexpr int64_t kRowGrain = 16;

}  // namespace

at::Tensor SketchTimes(const at::Tensor& s, const at::Tensor& m) {
  if (!m.is_cpu()) return s.matmul(m.to(at::kDouble));
  const at::Tensor sc = s.contiguous(), mc = m.contiguous();
  const int64_t r = mc.size(0), c = mc.size(1);
  at::Tensor out = at::zeros({kSketchRows, c}, sc.options());
  const double* ps = sc.data_ptr<double>();
  const float* pm = mc.data_ptr<float>();
  double* po = out.data_ptr<double>();
  at::parallel_for(0, c, kColumnGrain, [&](int64_t begin, int64_t end) {
    SketchTimesColumns(ps, pm, r, c, po, begin, end);
  });
  return out;
}

at::Tensor SketchTimesTransposed(const at::Tensor& s, const at::Tensor& m) {
  if (!m.is_cpu()) return s.matmul(m.to(at::kDouble).t());
  const at::Tensor sc = s.contiguous(), mc = m.contiguous();
  const int64_t r = mc.size(0), c = mc.size(1);
  at::Tensor out = at::empty({kSketchRows, r}, sc.options());
  const double* ps = sc.data_ptr<double>();
  const float* pm = mc.data_ptr<float>();
  double* po = out.data_ptr<double>();
  at::parallel_for(0, r, kRowGrain, [&](int64_t begin, int64_t end) {
    SketchTimesRows(ps, pm, r, c, po, begin, end);
  });
  return out;
}

}  // namespace amalgam::core
