// Which operands of each op may share memory, checked alike by the CPU and CUDA registrations.
//
// The kernels stream through their operands in chunks (CPU threads, GPU blocks), so a written
// operand that overlaps another is a race, not an in-place update. The one exception is where
// docs/kernels.md allows it: w0 passed as w itself (the same elements), which the kernels read
// and write at the same index only.
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>

namespace flatfused {
namespace aliasing {

using at::Tensor;

// a and b are the same elements (w0 passed as w).
inline bool same_vector(const Tensor& a, const Tensor& b) {
  return a.numel() > 0 && a.numel() == b.numel() && a.device() == b.device() &&
         a.const_data_ptr() == b.const_data_ptr();
}

inline void check_no_overlap(const Tensor& a, const Tensor& b, const char* op, const char* an, const char* bn) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device()) return;
  const char* pa = static_cast<const char*>(a.const_data_ptr());
  const char* pb = static_cast<const char*>(b.const_data_ptr());
  const bool overlap = pa < pb + b.nbytes() && pb < pa + a.nbytes();
  TORCH_CHECK(!overlap, "flatfused.", op, ": ", an, " and ", bn, " must not share memory");
}

// An operand: its name, the tensor (null: absent, or allowed to alias as above) and whether the
// kernel writes it.
struct Operand {
  const char* name;
  const Tensor* t;
  bool written;
};

// check_no_overlap over every pair of present operands of which at least one is written (two
// inputs may share memory); a message names the earlier operand of the list first.
inline void check_disjoint(const char* op, std::initializer_list<Operand> operands) {
  for (const Operand* a = operands.begin(); a != operands.end(); ++a) {
    for (const Operand* b = a + 1; b != operands.end(); ++b) {
      if (a->t != nullptr && b->t != nullptr && (a->written || b->written))
        check_no_overlap(*a->t, *b->t, op, a->name, b->name);
    }
  }
}

// w0, or null where it is w itself (allowed: the same elements).
inline const Tensor* unless_w(const Tensor* w0, const Tensor& w) {
  return w0 != nullptr && same_vector(*w0, w) ? nullptr : w0;
}

// ---------------------------------------------------------------------------- per op

inline void out_rng(const char* op, const Tensor& out, const Tensor& rng) {
  check_no_overlap(out, rng, op, "out", "rng");
}

inline void perturb(const Tensor& w, const Tensor& w0, const Tensor* grad, const Tensor& rng) {
  check_disjoint("perturb_", {{"grad", grad, true}, {"w", &w, true}, {"w0", unless_w(&w0, w), true},
                              {"rng", &rng, false}});
}

inline void accumulate(const Tensor& acc, const Tensor& grad) {
  check_no_overlap(acc, grad, "accumulate_", "acc", "grad");
}

inline void accumulate_perturb(const Tensor& w, const Tensor& w0, const Tensor& acc, const Tensor& grad,
                               const Tensor& rng) {
  check_disjoint("accumulate_perturb_", {{"acc", &acc, true}, {"grad", &grad, true}, {"w", &w, true},
                                         {"w0", unless_w(&w0, w), true}, {"rng", &rng, false}});
}

// src: null when grad is (it is ignored then).
inline void restore(const Tensor& w, const Tensor& w0, const Tensor* grad, const Tensor* src) {
  check_disjoint("restore_", {{"grad", grad, true}, {"w", &w, true}, {"w0", unless_w(&w0, w), false},
                              {"src", grad != nullptr ? src : nullptr, false}});
}

inline void sgd_step(const Tensor& w, const Tensor* w0, const Tensor& grad, const Tensor* src,
                     const Tensor* momentum_buffer) {
  check_disjoint("sgd_step_", {{"momentum_buffer", momentum_buffer, true}, {"w", &w, true}, {"grad", &grad, true},
                               {"w0", unless_w(w0, w), false}, {"src", src, false}});
}

inline void adam_step(const Tensor& w, const Tensor* w0, const Tensor& grad, const Tensor* src,
                      const Tensor& exp_avg, const Tensor& exp_avg_sq) {
  check_disjoint("adam_step_", {{"exp_avg", &exp_avg, true}, {"exp_avg_sq", &exp_avg_sq, true}, {"w", &w, true},
                                {"grad", &grad, true}, {"w0", unless_w(w0, w), false}, {"src", src, false}});
}

inline void grad_norm_sq(const Tensor& out, const Tensor& grad, const Tensor* w) {
  check_disjoint("grad_norm_sq_", {{"out", &out, true}, {"grad", &grad, false}, {"w", w, false}});
}

inline void sam_ascent(const Tensor& w, const Tensor& w0, const Tensor& grad, const Tensor* g0,
                       const Tensor& norm_sq) {
  check_disjoint("sam_ascent_", {{"norm_sq", &norm_sq, false}, {"g0", g0, true}, {"w", &w, true},
                                 {"w0", &w0, true}, {"grad", &grad, true}});
}

}  // namespace aliasing
}  // namespace flatfused
