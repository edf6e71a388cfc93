// CPU kernel of layerfast::score_ (schema and definitions: csrc/layerfast.cpp).
//
// Rows (v, b) are scored in parallel (at::parallel_for), each in two passes over its C logits:
// (1) max, first argmax and the number of classes ranked above the label's logit; (2) the sum
// of exp(x - max). Per-row results go to a small buffer that is then reduced per variant in row
// order, so the result does not depend on the number of threads.
#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../score.h"

namespace layerfast {
namespace {

struct RowScore {
  float loss;
  uint8_t correct1;
  uint8_t correct5;
  uint8_t agree;
};

template <typename T>
RowScore score_row(const T* row, int64_t C, int64_t label, int64_t ref) {
  const float xl = static_cast<float>(row[label]);
  // Pass 1: max with the first maximal index (a NaN counts as maximal, as in torch.argmax) and
  // the number of classes that rank above the label (score::ranks_above: NaN as argmax ranks it).
  const bool xl_nan = std::isnan(xl);
  float m = static_cast<float>(row[0]);
  int64_t pred = 0;
  int64_t greater = score::ranks_above(m, 0, xl, xl_nan, label);
  bool m_nan = std::isnan(m);
  for (int64_t c = 1; c < C; ++c) {
    const float x = static_cast<float>(row[c]);
    greater += score::ranks_above(x, c, xl, xl_nan, label);
    if (!m_nan && (x > m || std::isnan(x))) {
      m = x;
      pred = c;
      m_nan = std::isnan(x);
    }
  }
  // Pass 2: logsumexp with max subtraction (an infinite max shifts by 0, as torch.logsumexp).
  const float shift = std::isinf(m) ? 0.f : m;
  float s = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    s += std::exp(static_cast<float>(row[c]) - shift);
  }
  const float lse = std::log(s) + shift;
  const bool c1 = pred == label;
  return {lse - xl, c1, static_cast<uint8_t>(C >= 5 ? greater < 5 : c1), pred == ref};
}

template <typename T>
void score_rows(
    const T* logits, const int64_t* labels, int64_t ls, const int64_t* ref, int64_t rs, int64_t V,
    int64_t B, int64_t C, std::vector<RowScore>& out) {
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  at::parallel_for(0, V * B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r % B;
      out[r] = score_row(logits + r * C, C, labels[b * ls], ref[b * rs]);
    }
  });
}

void score_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& ref_pred,
    const at::Tensor& acc) {
  score::check_args(logits, labels, ref_pred, acc);
  TORCH_CHECK(logits.is_cpu(), "layerfast::score_: the CPU kernel got logits on ", logits.device());
  const int64_t V = logits.size(0);
  const int64_t B = logits.size(1);
  const int64_t C = logits.size(2);
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const int64_t ls = labels.stride(0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t l = lab[b * ls];
    TORCH_CHECK(
        l >= 0 && l < C, "layerfast::score_: labels[", b, "] = ", l, " is out of range [0, ", C,
        ")");
  }
  if (V == 0 || B == 0) {
    return;
  }
  std::vector<RowScore> rows(V * B);
  const int64_t* ref = ref_pred.const_data_ptr<int64_t>();
  const int64_t rs = ref_pred.stride(0);
  switch (logits.scalar_type()) {
    case at::kFloat:
      score_rows(logits.const_data_ptr<float>(), lab, ls, ref, rs, V, B, C, rows);
      break;
    case at::kHalf:
      score_rows(logits.const_data_ptr<c10::Half>(), lab, ls, ref, rs, V, B, C, rows);
      break;
    case at::kBFloat16:
      score_rows(logits.const_data_ptr<c10::BFloat16>(), lab, ls, ref, rs, V, B, C, rows);
      break;
    default:
      TORCH_CHECK(false, "layerfast::score_: unsupported logits dtype ", logits.scalar_type());
  }
  double* out = acc.mutable_data_ptr<double>();
  for (int64_t v = 0; v < V; ++v) {
    double c1 = 0, c5 = 0, loss = 0, agree = 0;
    for (int64_t b = 0; b < B; ++b) {
      const RowScore& s = rows[v * B + b];
      c1 += s.correct1;
      c5 += s.correct5;
      loss += s.loss;
      agree += s.agree;
    }
    out[v * 4 + 0] += c1;
    out[v * 4 + 1] += c5;
    out[v * 4 + 2] += loss;
    out[v * 4 + 3] += agree;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(layerfast, CPU, m) {
  m.impl("score_", &score_cpu);
}

}  // namespace layerfast
