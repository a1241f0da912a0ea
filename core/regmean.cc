#include "core/regmean.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/sketch.h"

namespace amalgam::core {
namespace {

// A NaN or infinity makes the sum NaN or infinite; only when it is does the
// (slower) element-wise test run, to tell an overflowing sum apart.
bool AllFinite(const at::Tensor& t) {
  return std::isfinite(t.sum().item<double>()) ||
         at::isfinite(t).all().item<bool>();
}

// c -= p p^T on the lower triangle of c (diagonal blocks of up to
// kProductLeaf rows in full): half the product's work.
constexpr int64_t kProductLeaf = 512;

void SubtractLowerProduct(at::Tensor c, const at::Tensor& p) {
  const int64_t m = c.size(0);
  if (m <= kProductLeaf) {
    c.addmm_(p, p.t(), /*beta=*/1.0, /*alpha=*/-1.0);
    return;
  }
  const int64_t h = m / 2;
  const at::Tensor top = p.narrow(0, 0, h);
  const at::Tensor bottom = p.narrow(0, h, m - h);
  SubtractLowerProduct(c.narrow(0, 0, h).narrow(1, 0, h), top);
  c.narrow(0, h, m - h).narrow(1, 0, h).addmm_(bottom, top.t(), 1.0, -1.0);
  SubtractLowerProduct(c.narrow(0, h, m - h).narrow(1, h, m - h), bottom);
}

// Cholesky factorisation, blocked and right-looking: each column block of
// kCholeskyBlock is factored (LAPACK), the panel under it solved against
// that factor, and the rest of the matrix updated by the panel's product,
// which holds nearly all the work, at the BLAS's matrix-multiply speed.
// (For n = 3072 on the 2-core bench machine, where a float64 matmul runs at
// 107 GFLOP/s: LAPACK's potrf alone 29 GFLOP/s; the recursive halving this
// replaced, with half its work in triangular solves, 0.17 s in float64 and
// 0.10 s in float32 inside the merge; this, 0.15 s and 0.09 s.)
constexpr int64_t kCholeskyBlock = 256;

// Overwrites the lower triangle of the symmetric `a` (only that triangle is
// read) with its Cholesky factor L, a = L L^T; the strict upper triangle is
// left with whatever it held. False where `a` is not positive definite.
bool CholeskyInPlace(at::Tensor a) {
  const int64_t n = a.size(0);
  for (int64_t k = 0; k < n; k += kCholeskyBlock) {
    const int64_t b = std::min(kCholeskyBlock, n - k);
    at::Tensor diagonal_block = a.narrow(0, k, b).narrow(1, k, b);
    at::Tensor l, info;
    std::tie(l, info) = at::linalg_cholesky_ex(diagonal_block);
    if (info.item<int64_t>() != 0) return false;
    diagonal_block.copy_(l);
    const int64_t rest = n - k - b;
    if (rest == 0) break;
    // L21 = A21 L11^-T, then A22 -= L21 L21^T.
    at::Tensor panel = a.narrow(0, k + b, rest).narrow(1, k, b);
    panel.copy_(at::linalg_solve_triangular(diagonal_block.t(), panel,
                                            /*upper=*/true, /*left=*/false));
    SubtractLowerProduct(a.narrow(0, k + b, rest).narrow(1, k + b, rest),
                         panel);
  }
  return true;
}

// Whether a factorisation's pivots (positive: Cholesky's l_ii^2, LU's
// |u_ii|) describe a system that is not singular to `epsilon`: the smallest
// pivot above n epsilon times the largest. A rounded factorisation of an
// exactly singular system can succeed with a tiny positive pivot, and its
// solution is then finite garbage (weights of 1e13): both factorisations are
// held to this one threshold.
bool PivotsAreRegular(const at::Tensor& pivots, double epsilon) {
  const at::Tensor p = pivots.to(at::kDouble);
  const double ratio =
      p.min().item<double>() / std::max(p.max().item<double>(), DBL_MIN);
  return ratio > static_cast<double>(p.numel()) * epsilon;
}

// x = (L L^T)^-1 b, from the lower triangle of `l`.
at::Tensor CholeskySolve(const at::Tensor& l, const at::Tensor& b) {
  return at::linalg_solve_triangular(
      l.t(), at::linalg_solve_triangular(l, b, /*upper=*/false),
      /*upper=*/true);
}

// Mixed-precision refinement of a float32 solve: at most this many steps, to
// a last correction this small relative to the solution.
constexpr int kRefinementSteps = 10;
constexpr double kRefinedTolerance = 1e-10;

bool UseFloat32Solve(const MergeOptions& options, const at::Device& device) {
  switch (options.regmean_solve) {
    case RegMeanSolve::kFloat32:
      return true;
    case RegMeanSolve::kFloat64:
      return false;
    case RegMeanSolve::kAuto:
      break;
  }
  return device.is_cuda();
}

// The fast mode's check: each weight's output error, estimated in float64 on
// kSketchRows fixed random combinations of its output columns, the rows of
// the sketch: a fixed matrix [kSketchRows, columns] of +-1 (a counter hash,
// the same in every run), so that E ||z^T M||_F^2 = kSketchRows ||M||_F^2.
at::Tensor Sketch(int64_t columns, const at::Device& device) {
  at::Tensor z = at::empty({kSketchRows, columns}, at::kDouble);
  double* p = z.data_ptr<double>();
  for (int64_t j = 0; j < z.numel(); ++j) {
    uint64_t h = static_cast<uint64_t>(j + 1) * 0x9E3779B97F4A7C15ull;
    h = (h ^ (h >> 31)) * 0xBF58476D1CE4E5B9ull;
    p[j] = ((h ^ (h >> 29)) & 1) != 0 ? 1.0 : -1.0;
  }
  return z.to(device);
}

// The fast mode: with f_i = s_i alpha and d_i = s_i (1 - alpha),
//   a = sum_i f_i G_i + diag(sum_i d_i diag(G_i)),
//   b^T = sum_i f_i W_i G_i^T + d_i W_i diag(G_i),
// the Cholesky factor of a and the two triangular solves, all in float32 on
// the mapped tensors (no copy of a Gram; b is formed transposed, where the
// diagonal term runs along W's rows). Then the check, in float64: with
// a = L L^T, x* the exact solution and r = b - a x, the output error
// ||L^T (x - x*)||_F / ||L^T x||_F (the bench's, on the pooled inputs) is
// ||L^-1 r||_F / ||L^T x||_F, here estimated on the sketch z: the numerator
// from r z = sum_i G~_i (W_i^T z - x z), each weight and Gram read once more
// in float64; the denominator from (x z)^T b z, which is (x z)^T a (x z) to
// the order of the estimate itself. Nothing where a sum is not finite, a
// column has no input (the float64 path splits those off), the
// factorisation fails or its pivots are below float32's resolution, or the
// estimate is over `tolerance`; `estimate` is set where it was made. The
// factor of a is `shared`'s where another weight made it (then a is not
// summed), else made and left there.
std::optional<at::Tensor> FastRegMean(const RegMeanSystem& s,
                                      const at::Device& device,
                                      double tolerance, double* estimate,
                                      RegMeanFactors& shared) {
  const size_t models = s.scales.size();
  const bool form = !shared.fast_l.has_value();
  at::Tensor a, bt, diagonal;
  for (size_t i = 0; i < models; ++i) {
    const at::Tensor w = s.load(i, false, at::kFloat, false);
    const at::Tensor g = s.load(i, true, at::kFloat, false);
    const double f = s.scales[i] * s.alpha;
    const double d = s.scales[i] * (1 - s.alpha);
    if (i == 0) bt = at::empty({w.size(0), g.size(0)}, g.options());
    if (form && i == 0) {
      a = g.mul(f);
      diagonal = g.diagonal().mul(d);
    } else if (form) {
      a.add_(g, f);
      diagonal.add_(g.diagonal(), d);
    }
    bt.addmm_(w, g.t(), /*beta=*/i == 0 ? 0.0 : 1.0, /*alpha=*/f);
    if (d != 0) bt.addcmul_(w, g.diagonal().contiguous().unsqueeze(0), d);
  }
  if (form) {
    a.diagonal().add_(diagonal);
    // Each pivot against its own diagonal entry, l_ii^2 / a_ii (how much of
    // a_ii survives the elimination; blind to the features' scales, which
    // real activations spread over orders of magnitude): under float32's
    // resolution the system is singular in float32, and a "solution" there
    // can be finite garbage the output error does not see.
    bool factored = AllFinite(a) && a.diagonal().gt(0).all().item<bool>();
    if (factored) {
      const at::Tensor diagonal_before = a.diagonal().clone();
      factored =
          CholeskyInPlace(a) &&  // in place: a becomes L
          a.diagonal().square().div(diagonal_before).min().item<double>() >
              static_cast<double>(a.size(0)) * FLT_EPSILON;
    }
    shared.fast_l = factored ? a : at::Tensor();
  }
  const at::Tensor& l = *shared.fast_l;
  if (!l.defined() || !AllFinite(bt)) return std::nullopt;
  const at::Tensor b = bt.t();
  const at::Tensor x = CholeskySolve(l, b);
  if (!AllFinite(x)) return std::nullopt;

  // With the sketch z [out, k] as its transpose zt: (x z)^T = zt x^T.
  const at::Tensor zt = Sketch(x.size(1), device);
  const at::Tensor xt = x.t();  // the merged weight [out, in]
  const at::Tensor xz = SketchTimes(zt, xt);
  at::Tensor rz = at::zeros_like(xz);
  for (size_t i = 0; i < models; ++i) {
    const at::Tensor w = s.load(i, false, at::kFloat, false);
    const at::Tensor g = s.load(i, true, at::kFloat, false);
    const double f = s.scales[i] * s.alpha;
    const double d = s.scales[i] * (1 - s.alpha);
    const at::Tensor u = SketchTimes(zt, w).sub_(xz);  // (W_i^T z - x z)^T
    rz.add_(SketchTimesTransposed(u, g), f);
    if (d != 0) {
      rz.addcmul_(g.diagonal().to(at::kDouble).unsqueeze(0), u, d);
    }
  }
  const double squared_norm = xz.mul(SketchTimes(zt, bt)).sum().item<double>();
  const double error =
      at::linalg_solve_triangular(l, rz.t().to(at::kFloat), /*upper=*/false)
          .norm()
          .item<double>() /
      std::sqrt(squared_norm);
  *estimate = error;
  if (!(error <= tolerance)) return std::nullopt;
  return xt;
}

// The precise mode: sums, factorisation and solve in float64 (or, where
// options.regmean_solve says, a float32 factorisation refined in float64).
// a and its factorisations are `shared`'s where another weight made them.
absl::StatusOr<at::Tensor> PreciseRegMean(const RegMeanSystem& s,
                                          const MergeOptions& options,
                                          const at::Device& device,
                                          MergeProgress* counts,
                                          RegMeanFactors& shared) {
  const std::vector<double>& c = s.coefficients;
  const double alpha = s.alpha;
  const bool form = !shared.formed;
  // a = sum G~_i [in, in], b = sum G~_i W_i^T [in, out] (formed as its
  // transpose [out, in], so that b lies in columns as the triangular solves
  // read it: 35% faster than rows for in = 3072, out = 768), where
  // G~ = c s (alpha G + (1 - alpha) diag(G)) = factor H. H is made in the
  // float64 copy of G and factor folded into the accumulating add and GEMM,
  // so each Gram is read once for a and once for b. Usually H is G with its
  // diagonal divided by alpha (factor c s alpha); for alpha below
  // kFoldedAlpha, where 1/alpha could overflow, H is alpha G with G's own
  // diagonal (factor c s; for alpha 0, the diagonal alone).
  constexpr double kFoldedAlpha = 1e-6;
  at::Tensor a, bt;
  for (size_t i = 0; i < s.scales.size(); ++i) {
    const at::Tensor w = s.load(i, false, at::kDouble, false);
    const double scale = s.scales[i];
    at::Tensor h = s.load(i, true, at::kDouble, true);
    double factor = scale;
    if (alpha >= kFoldedAlpha) {
      h.diagonal().div_(alpha);
      factor = alpha * scale;
    } else {
      const at::Tensor diagonal = h.diagonal().clone();
      h.mul_(alpha);
      h.diagonal().copy_(diagonal);
    }
    if (i == 0) bt = at::empty({w.size(0), h.size(0)}, h.options());
    if (form) a = i == 0 ? h.mul(factor) : a.add_(h, factor);
    bt.addmm_(w, h.t(), /*beta=*/i == 0 ? 0.0 : 1.0, /*alpha=*/factor);
  }
  at::Tensor b = bt.t();
  // An input feature that is zero in every row of every model has a zero
  // diagonal entry, hence (Grams being positive semi-definite) a zero row and
  // column: the objective does not depend on that column of W, and the
  // system splits exactly. Such columns (a ReLU unit dead on all data, a
  // pixel never inked) take the weighted average; the rest is solved.
  if (form) {
    const at::Tensor active = a.diagonal().gt(0);
    shared.active = active.sum().item<int64_t>();
    if (shared.active > 0 && shared.active < a.size(0)) {
      shared.active_index = active.nonzero().squeeze(1);
      a = a.index_select(0, shared.active_index)
              .index_select(1, shared.active_index);
    }
    shared.finite = AllFinite(a);
    shared.a = std::move(a);
    shared.formed = true;
  }
  // The weighted average sum c_i W_i^T [in, out], for columns not solved.
  auto average = [&]() {
    at::Tensor sum;
    for (size_t i = 0; i < c.size(); ++i) {
      const at::Tensor wt = s.load(i, false, at::kDouble, false).t();
      sum = i == 0 ? wt.mul(c[i]) : sum.add_(wt, c[i]);
    }
    return sum;
  };
  if (shared.active == 0) return average().t();
  if (shared.active_index.defined()) {
    b = b.index_select(0, shared.active_index);
  }
  const at::Tensor& system = shared.a;
  at::Tensor x;
  bool solved = false;
  const bool finite = shared.finite && AllFinite(b);
  if (finite && UseFloat32Solve(options, device)) {
    // Float32 Cholesky (fast on GPUs) refined in float64: each step solves
    // for the float64 residual with the float32 factor. When the condition
    // number is too large for float32 the corrections do not shrink, and
    // the float64 path below takes over. Below float32's resolution the
    // float64 path decides.
    if (!shared.l32) {
      at::Tensor l = system.to(at::kFloat);
      shared.l32 = CholeskyInPlace(l) &&
                           PivotsAreRegular(l.diagonal().square(), FLT_EPSILON)
                       ? l
                       : at::Tensor();
    }
    if (const at::Tensor& l = *shared.l32; l.defined()) {
      at::Tensor x64 = CholeskySolve(l, b.to(at::kFloat)).to(at::kDouble);
      for (int step = 0; step < kRefinementSteps && AllFinite(x64); ++step) {
        const at::Tensor residual = b - system.matmul(x64);
        const at::Tensor dx =
            CholeskySolve(l, residual.to(at::kFloat)).to(at::kDouble);
        x64.add_(dx);
        if (dx.norm().item<double>() <=
            kRefinedTolerance * x64.norm().item<double>()) {
          x = x64;
          solved = AllFinite(x);
          if (solved) ++counts->float32_solves;
          break;
        }
      }
    }
  }
  if (finite && !solved) {
    ++counts->float64_solves;
    if (!shared.l64) {
      at::Tensor l = system.clone();  // the system is kept for LU
      shared.l64 = CholeskyInPlace(l) &&
                           PivotsAreRegular(l.diagonal().square(), DBL_EPSILON)
                       ? l
                       : at::Tensor();
    }
    if (shared.l64->defined()) {
      x = CholeskySolve(*shared.l64, b);
      solved = AllFinite(x);
    }
    if (!solved) {
      if (!shared.lu) {
        at::Tensor lu, pivots, info;
        std::tie(lu, pivots, info) = at::linalg_lu_factor_ex(system);
        if (info.item<int64_t>() != 0 ||
            !PivotsAreRegular(lu.diagonal().abs(), DBL_EPSILON)) {
          lu = at::Tensor();
        }
        shared.lu = std::make_pair(lu, pivots);
      }
      if (shared.lu->first.defined()) {
        x = at::linalg_lu_solve(shared.lu->first, shared.lu->second, b);
        solved = AllFinite(x);
      }
    }
  }
  if (!solved) {
    return absl::FailedPreconditionError(absl::StrCat(
        "RegMean system for tensor \"", s.name,
        "\" is singular (Cholesky and LU failed): the summed Grams have no "
        "inverse, e.g. two input features that are equal in every row; use "
        "alpha < 1, check the Gram statistics or exclude the tensor"));
  }
  if (shared.active_index.defined()) {
    return average().index_copy_(0, shared.active_index, x).t();
  }
  return x.t();
}

}  // namespace

absl::StatusOr<at::Tensor> SolveRegMean(const RegMeanSystem& system,
                                        const MergeOptions& options,
                                        const at::Device& device,
                                        MergeProgress* counts,
                                        RegMeanFactors* shared) {
  RegMeanFactors own;
  RegMeanFactors& factors = shared != nullptr ? *shared : own;
  if (factors.formed || factors.fast_l) ++counts->shared_factorisations;
  if (options.precision == RegMeanPrecision::kFloat32) {
    double estimate = 0;
    if (std::optional<at::Tensor> w =
            FastRegMean(system, device, options.fast_output_tolerance,
                        &estimate, factors)) {
      ++counts->fast_solves;
      counts->fast_output_error = std::max(counts->fast_output_error, estimate);
      return *std::move(w);
    }
    ++counts->fast_fallbacks;
  }
  return PreciseRegMean(system, options, device, counts, factors);
}

}  // namespace amalgam::core
