#pragma once

// The RegMean closed form for one weight (Jin et al. 2023, eq. 2 with the
// non-diagonal scaling alpha), internal to core:
//
//   W = (sum_i G~_i)^-1 (sum_i G~_i W_i^T),
//   G~_i = s_i (alpha G_i + (1 - alpha) diag(G_i)),
//
// s_i being model i's coefficient times its Gram scale.

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/merge.h"

namespace amalgam::core {

struct RegMeanSystem {
  std::string name;                  // the weight, for messages
  std::vector<double> coefficients;  // c_i: the average of unsolved columns
  std::vector<double> scales;        // s_i
  double alpha = 0.9;
  // Model i's Gram [in, in] (`gram`) or weight [out, in] as `type` on the
  // merge's device. Read-only, unless `writable`: it may alias the mapped
  // file.
  std::function<at::Tensor(size_t i, bool gram, at::ScalarType type,
                           bool writable)>
      load;
};

// What weights with the same Gram in every model (a layer's query, key and
// value) share: the system matrix sum_i G~_i and its factorisations, each
// made when a solve first needs it and then kept. Every step is the one a
// weight solved alone takes, so sharing gives bitwise the same result.
struct RegMeanFactors {
  // The precise mode: `a` (float64, over the active features, listed in
  // `active_index` unless all are), its float32 and float64 Cholesky
  // factors and its LU factorisation. A factorisation tried is set; an
  // undefined tensor where it failed.
  bool formed = false;
  at::Tensor a, active_index;
  int64_t active = 0;
  bool finite = false;
  std::optional<at::Tensor> l32, l64;
  std::optional<std::pair<at::Tensor, at::Tensor>> lu;  // factors, pivots
  // The fast mode's float32 factor (undefined where it failed).
  std::optional<at::Tensor> fast_l;
};

// W [out, in]: in float64 (options.precision kFloat64, solved as
// options.regmean_solve says), or in float32 (kFloat32) where the weight's
// estimated output error is at most options.fast_output_tolerance, else in
// float64.
// Counts the solves of each kind in `counts`. `shared` (may be null) holds
// the factorisations of another weight with the same Grams, or receives
// this one's for the next.
absl::StatusOr<at::Tensor> SolveRegMean(const RegMeanSystem& system,
                                        const MergeOptions& options,
                                        const at::Device& device,
                                        MergeProgress* counts,
                                        RegMeanFactors* shared);

}  // namespace amalgam::core
