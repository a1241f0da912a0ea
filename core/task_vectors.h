#pragma once

// The task-vector merges, one tensor at a time: task arithmetic, TIES
// (Yadav et al. 2023), DARE (Yu et al. 2024), SLERP and Model Stock (Jang et
// al. 2024). With θ_0 the base model's tensor, θ_i model i's, δ_i = θ_i - θ_0
// its task vector, w_i its weight and λ the scale. Every function works in
// float64 on tensors of one shape and gives bitwise the same result for any
// thread count and tensor order: sums over elements run in index order, and
// DARE's random mask is a counter-based function of (seed, tensor name,
// model index, element index).

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace amalgam::core {

// How DARE rescales the entries it keeps.
enum class DareRescale {
  kInverseDensity,  // by 1 / density
  kL1,              // so that the task vector keeps its L1 norm
};

// θ_0 + λ Σ_i w_i δ_i.
at::Tensor TaskArithmetic(const at::Tensor& base,
                          const std::vector<at::Tensor>& models,
                          const std::vector<double>& weights, double lambda);

// TIES: each δ_i trimmed to its k_i = max(1, floor(density_i × numel))
// entries of largest magnitude (equal magnitudes kept in index order), a
// sign elected per entry (+1 where Σ_i w_i δ̂_i ≥ 0), and the disjoint mean
// of the entries that agree with it (`normalize`; else their weighted sum),
// scaled by λ and added to θ_0.
at::Tensor Ties(const at::Tensor& base, const std::vector<at::Tensor>& models,
                const std::vector<double>& weights,
                const std::vector<double>& densities, double lambda,
                bool normalize);

// DARE: each entry of δ_i kept with probability density_i, the kept ones
// rescaled; then combined as task arithmetic (`ties` false) or as TIES
// without its trim step.
at::Tensor Dare(const at::Tensor& base, const std::vector<at::Tensor>& models,
                const std::vector<double>& weights,
                const std::vector<double>& densities, double lambda, bool ties,
                bool normalize, DareRescale rescale, uint64_t seed,
                const std::string& tensor_name);

// Whether DARE keeps entry `element` of model `model`'s task vector of
// tensor `tensor_name` (a uniform draw in [0, 1) below `density`).
bool DareKeeps(uint64_t seed, const std::string& tensor_name, int model,
               int64_t element, double density);

// Spherical interpolation from `a` (t = 0) to `b` (t = 1) of the flattened
// tensors; the plain interpolation where they are (anti-)parallel to within
// |cos| > 0.9995. t = 0 and t = 1 give the endpoints exactly.
at::Tensor Slerp(const at::Tensor& a, const at::Tensor& b, double t);

// Model Stock: t = N c / (1 + (N - 1) c) from the mean cosine c of the
// task vectors' pairs (1 where the denominator is 0), and θ = t mean_i θ_i +
// (1 - t) θ_0. Needs at least two models.
at::Tensor ModelStock(const at::Tensor& base,
                      const std::vector<at::Tensor>& models);

}  // namespace amalgam::core
