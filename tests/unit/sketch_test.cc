// The fast RegMean check's products of a float64 sketch with float32
// matrices: within float64's rounding bound of LibTorch's float64 product,
// for shapes that leave lanes and rows over, and bitwise the same for any
// number of threads.
#include "core/sketch.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cfloat>
#include <utility>
#include <vector>

namespace amalgam::core {
namespace {

// Each element of `got` within the bound on summing k products in float64,
// k eps sum |s_j| |m_j|, of the exact product `want` of the float32 entries.
void ExpectWithinRounding(const at::Tensor& got, const at::Tensor& want,
                          const at::Tensor& magnitudes, int64_t k) {
  ASSERT_EQ(got.sizes(), want.sizes());
  const at::Tensor bound = magnitudes * (static_cast<double>(k) * DBL_EPSILON);
  EXPECT_TRUE((got - want).abs().le(bound).all().item<bool>())
      << "largest excess " << ((got - want).abs() - bound).max().item<double>();
}

TEST(SketchTest, ProductsAreTheFloat64ProductsForAnyShapeAndThreads) {
  at::manual_seed(7);
  const int before = at::get_num_threads();
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {1, 1}, {3, 5}, {4, 8}, {13, 37}, {67, 1030}, {1030, 67}};
  for (const auto& [r, c] : shapes) {
    SCOPED_TRACE(testing::Message() << r << " x " << c);
    const at::Tensor m = at::randn({r, c}, at::kFloat);
    const at::Tensor m64 = m.to(at::kDouble);
    const at::Tensor s = at::randn({kSketchRows, r}, at::kDouble);
    const at::Tensor st = at::randn({kSketchRows, c}, at::kDouble);
    at::Tensor first, first_transposed;
    for (int threads : {1, 2, 3}) {
      at::set_num_threads(threads);
      const at::Tensor got = SketchTimes(s, m);
      const at::Tensor got_transposed = SketchTimesTransposed(st, m);
      ExpectWithinRounding(got, s.matmul(m64), s.abs().matmul(m64.abs()), r);
      ExpectWithinRounding(got_transposed, st.matmul(m64.t()),
                           st.abs().matmul(m64.abs().t()), c);
      if (threads == 1) {
        first = got;
        first_transposed = got_transposed;
      } else {
        EXPECT_TRUE(at::equal(got, first)) << threads << " threads";
        EXPECT_TRUE(at::equal(got_transposed, first_transposed))
            << threads << " threads";
      }
    }
  }
  at::set_num_threads(before);
}

// A view (a transposed weight) is multiplied as the matrix it shows.
TEST(SketchTest, AViewIsTheMatrixItShows) {
  at::manual_seed(8);
  const at::Tensor m = at::randn({21, 10}, at::kFloat).t();  // [10, 21]
  const at::Tensor s = at::randn({kSketchRows, 10}, at::kDouble);
  const at::Tensor st = at::randn({kSketchRows, 21}, at::kDouble);
  EXPECT_TRUE(at::equal(SketchTimes(s, m), SketchTimes(s, m.contiguous())));
  EXPECT_TRUE(at::equal(SketchTimesTransposed(st, m),
                        SketchTimesTransposed(st, m.contiguous())));
}

}  // namespace
}  // namespace amalgam::core
