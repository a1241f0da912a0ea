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
#include <string>
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

// W [out, in]: in float64 (options.precision kFloat64, solved as
// options.regmean_solve says), or in float32 (kFloat32) where the weight's
// estimated output error is at most options.fast_output_tolerance, else in
// float64.
// Counts the solves of each kind in `counts`.
absl::StatusOr<at::Tensor> SolveRegMean(const RegMeanSystem& system,
                                        const MergeOptions& options,
                                        const at::Device& device,
                                        MergeProgress* counts);

}  // namespace amalgam::core
