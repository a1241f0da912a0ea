#include "core/task_vectors.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace amalgam::core {
namespace {

// Element-wise passes are split across threads (each element computed the
// same way whatever the split); sums over elements run in index order.
constexpr int64_t kGrain = 1 << 14;

// A contiguous float64 copy (or the tensor itself when it is one).
at::Tensor Float64(const at::Tensor& t) {
  return t.to(at::kCPU, at::kDouble).contiguous();
}

std::vector<at::Tensor> TaskVectors(const at::Tensor& base,
                                    const std::vector<at::Tensor>& models) {
  const at::Tensor b = Float64(base);
  std::vector<at::Tensor> deltas;
  for (const at::Tensor& m : models) deltas.push_back(Float64(m) - b);
  return deltas;
}

// θ_0 + λ × merged.
at::Tensor AddScaled(const at::Tensor& base, const at::Tensor& merged,
                     double lambda) {
  at::Tensor out = Float64(base).clone();
  double* o = out.data_ptr<double>();
  const double* m = merged.data_ptr<double>();
  at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) o[j] += lambda * m[j];
  });
  return out;
}

// Σ_i w_i δ_i, accumulated in model order.
at::Tensor WeightedSum(const std::vector<at::Tensor>& deltas,
                       const std::vector<double>& weights) {
  at::Tensor sum = at::zeros_like(deltas[0]);
  double* s = sum.data_ptr<double>();
  std::vector<const double*> d;
  for (const at::Tensor& t : deltas) d.push_back(t.data_ptr<double>());
  at::parallel_for(0, sum.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < d.size(); ++i) {
      for (int64_t j = begin; j < end; ++j) s[j] += weights[i] * d[i][j];
    }
  });
  return sum;
}

int Sign(double x) { return x > 0 ? 1 : (x < 0 ? -1 : 0); }

// TIES's sign election and disjoint mean over (trimmed) task vectors.
at::Tensor ElectAndMerge(const std::vector<at::Tensor>& deltas,
                         const std::vector<double>& weights, bool normalize) {
  at::Tensor merged = at::empty_like(deltas[0]);
  double* out = merged.data_ptr<double>();
  std::vector<const double*> d;
  for (const at::Tensor& t : deltas) d.push_back(t.data_ptr<double>());
  at::parallel_for(0, merged.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      double total = 0;
      for (size_t i = 0; i < d.size(); ++i) total += weights[i] * d[i][j];
      const int elected = total >= 0 ? 1 : -1;
      double numerator = 0, divisor = 0;
      for (size_t i = 0; i < d.size(); ++i) {
        // An entry that is exactly 0 has sign 0: it never agrees.
        if (Sign(d[i][j]) != elected) continue;
        numerator += weights[i] * d[i][j];
        divisor += weights[i];
      }
      if (!normalize) {
        out[j] = numerator;
      } else {
        out[j] = numerator / (divisor == 0 ? 1.0 : divisor);
      }
    }
  });
  return merged;
}

// δ with all but its k entries of largest magnitude set to 0; of entries of
// equal magnitude at the threshold, those of lower index are kept.
at::Tensor Trim(const at::Tensor& delta, double density) {
  const int64_t n = delta.numel();
  const int64_t k = std::max<int64_t>(
      1, static_cast<int64_t>(std::floor(density * static_cast<double>(n))));
  at::Tensor trimmed = delta.clone();
  if (k >= n) return trimmed;
  const double* d = delta.data_ptr<double>();
  std::vector<double> magnitude(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) magnitude[j] = std::fabs(d[j]);
  std::vector<double> order = magnitude;
  // The k-th largest magnitude.
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end(),
                   std::greater<double>());
  const double threshold = order[k - 1];
  int64_t above = 0;
  for (int64_t j = 0; j < n; ++j) above += magnitude[j] > threshold ? 1 : 0;
  int64_t at_threshold = k - above;  // kept among those equal to it
  double* t = trimmed.data_ptr<double>();
  for (int64_t j = 0; j < n; ++j) {
    if (magnitude[j] > threshold) continue;
    if (magnitude[j] == threshold && at_threshold > 0) {
      --at_threshold;
      continue;
    }
    t[j] = 0;
  }
  return trimmed;
}

uint64_t Mix(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;

// The stream of (seed, tensor name, model): an FNV-1a hash of the name mixed
// with the seed and the model index.
uint64_t StreamKey(uint64_t seed, const std::string& tensor_name, int model) {
  uint64_t name = 0xcbf29ce484222325ULL;
  for (unsigned char c : tensor_name) name = (name ^ c) * 0x100000001b3ULL;
  return Mix(Mix(Mix(seed + kGolden) ^ name) + static_cast<uint64_t>(model));
}

bool Keeps(uint64_t key, int64_t element, double density) {
  // SplitMix64: output n of the stream with state `key`.
  const uint64_t bits =
      Mix(key + (static_cast<uint64_t>(element) + 1) * kGolden);
  const double u = static_cast<double>(bits >> 11) * 0x1.0p-53;
  return u < density;
}

double Dot(const double* x, const double* y, int64_t n) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += x[j] * y[j];
  return sum;
}

double L1Norm(const double* x, int64_t n) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += std::fabs(x[j]);
  return sum;
}

}  // namespace

at::Tensor TaskArithmetic(const at::Tensor& base,
                          const std::vector<at::Tensor>& models,
                          const std::vector<double>& weights, double lambda) {
  return AddScaled(base, WeightedSum(TaskVectors(base, models), weights),
                   lambda);
}

at::Tensor Ties(const at::Tensor& base, const std::vector<at::Tensor>& models,
                const std::vector<double>& weights,
                const std::vector<double>& densities, double lambda,
                bool normalize) {
  std::vector<at::Tensor> deltas = TaskVectors(base, models);
  for (size_t i = 0; i < deltas.size(); ++i) {
    deltas[i] = Trim(deltas[i], densities[i]);
  }
  return AddScaled(base, ElectAndMerge(deltas, weights, normalize), lambda);
}

bool DareKeeps(uint64_t seed, const std::string& tensor_name, int model,
               int64_t element, double density) {
  return Keeps(StreamKey(seed, tensor_name, model), element, density);
}

at::Tensor Dare(const at::Tensor& base, const std::vector<at::Tensor>& models,
                const std::vector<double>& weights,
                const std::vector<double>& densities, double lambda, bool ties,
                bool normalize, DareRescale rescale, uint64_t seed,
                const std::string& tensor_name) {
  std::vector<at::Tensor> deltas = TaskVectors(base, models);
  for (size_t i = 0; i < deltas.size(); ++i) {
    double* d = deltas[i].data_ptr<double>();
    const int64_t n = deltas[i].numel();
    const double density = densities[i];
    const uint64_t key = StreamKey(seed, tensor_name, static_cast<int>(i));
    const double l1_before = rescale == DareRescale::kL1 ? L1Norm(d, n) : 0.0;
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        if (!Keeps(key, j, density)) {
          d[j] = 0;
        } else if (rescale == DareRescale::kInverseDensity) {
          d[j] /= density;
        }
      }
    });
    if (rescale == DareRescale::kL1) {
      const double l1_after = L1Norm(d, n);
      if (l1_after > 0) {
        const double factor = l1_before / l1_after;
        at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t j = begin; j < end; ++j) d[j] *= factor;
        });
      }
    }
  }
  const at::Tensor merged = ties ? ElectAndMerge(deltas, weights, normalize)
                                 : WeightedSum(deltas, weights);
  return AddScaled(base, merged, lambda);
}

at::Tensor Slerp(const at::Tensor& a, const at::Tensor& b, double t) {
  const at::Tensor x = Float64(a), y = Float64(b);
  if (t == 0) return x.clone();
  if (t == 1) return y.clone();
  const int64_t n = x.numel();
  const double* xp = x.data_ptr<double>();
  const double* yp = y.data_ptr<double>();
  double nx = std::sqrt(Dot(xp, xp, n));
  double ny = std::sqrt(Dot(yp, yp, n));
  // u = v / ‖v‖, without the division where ‖v‖ ≤ 1e-8.
  if (nx <= 1e-8) nx = 1;
  if (ny <= 1e-8) ny = 1;
  double dot = 0;
  for (int64_t j = 0; j < n; ++j) dot += (xp[j] / nx) * (yp[j] / ny);
  double ca, cb;
  if (std::fabs(dot) > 0.9995) {
    ca = 1 - t;
    cb = t;
  } else {
    const double omega = std::acos(std::clamp(dot, -1.0, 1.0));
    const double sin_omega = std::sin(omega);
    ca = std::sin((1 - t) * omega) / sin_omega;
    cb = std::sin(t * omega) / sin_omega;
  }
  at::Tensor out = at::empty_like(x);
  double* o = out.data_ptr<double>();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) o[j] = ca * xp[j] + cb * yp[j];
  });
  return out;
}

at::Tensor ModelStock(const at::Tensor& base,
                      const std::vector<at::Tensor>& models) {
  const std::vector<at::Tensor> deltas = TaskVectors(base, models);
  const size_t count = deltas.size();
  const int64_t n = deltas[0].numel();
  std::vector<double> norms;
  for (const at::Tensor& d : deltas) {
    const double* p = d.data_ptr<double>();
    norms.push_back(std::sqrt(Dot(p, p, n)));
  }
  double cosines = 0;
  int pairs = 0;
  for (size_t i = 0; i < count; ++i) {
    for (size_t j = i + 1; j < count; ++j) {
      cosines +=
          Dot(deltas[i].data_ptr<double>(), deltas[j].data_ptr<double>(), n) /
          std::max(norms[i] * norms[j], 1e-6);
      ++pairs;
    }
  }
  const double c = std::clamp(cosines / pairs, -1.0, 1.0);
  const double big_n = static_cast<double>(count);
  const double denominator = 1 + (big_n - 1) * c;
  const double t = denominator == 0 ? 1.0 : big_n * c / denominator;
  at::Tensor out = Float64(base).clone();
  double* o = out.data_ptr<double>();
  std::vector<at::Tensor> thetas;
  std::vector<const double*> p;
  for (const at::Tensor& m : models) {
    thetas.push_back(Float64(m));
    p.push_back(thetas.back().data_ptr<double>());
  }
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      double sum = 0;
      for (const double* theta : p) sum += theta[j];
      o[j] = t * (sum / big_n) + (1 - t) * o[j];
    }
  });
  return out;
}

}  // namespace amalgam::core
