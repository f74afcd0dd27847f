// Truncated Cayley map R = (I + A) Σ_{i=0..k} Aⁱ, A = skew(S) = (S − Sᵀ)/2, on the CPU (batched GEMMs).
// The spec is opt_fast/reference/cayley_neumann.py; this kernel computes the same polynomial with fewer
// products by splitting it into even and odd parts. With Y = A² (symmetric), h = ⌊k/2⌋, the powers
// P_j = Yʲ (j = 1..h), E = I + Σ_j P_j and Am = (I + A)² = I + 2A + Y:
//   k odd:          Σ_{i=0..k} Aⁱ = (I + A) E,  so R = Am·E                       (h + 1 products)
//   k even, k ≥ 2:  R = Am·E − C − C·A with C = A·P_h = A^(k+1)                  (h + 3 products)
//   k = 0:          R = I + A
// (k = 5, POET's default: 3 products where the plain series takes 5; PEFT's default, k = 3: 2.)
//
// Backward. Only the skew part of S is read, so grad_S = skew(grad_A), and that projection is what makes
// it cheap: for a symmetric cotangent D of Y = A·A the contribution skew(D A + A D) = Z − Zᵀ with
// Z = D·A is one product, and the adjoint of the power chain in Y keeps symmetric seeds symmetric.
// k odd: dAm = G·E, D = sym(Amᵀ G) (Amᵀ = I − 2A + Y), L = adjoint of E's power chain at D,
// Z = (sym(dAm) + L)·A, and grad_S = W − Wᵀ with W = dAm − Z. For k = 5 that is 4 products (L = D + YD + DY
// is one), 7 in all with the forward, against 5 + 10 for the series through autograd.
// The powers are computed once: cayley_neumann_powers returns them and its backward reuses them;
// cayley_neumann_backward recomputes them (what the plain op's autograd calls).
// float16/bfloat16 S is computed in float32 and returned in its dtype.
#include "../opt_fast.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <array>
#include <tuple>
#include <vector>

#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace opt_fast {
namespace {

using at::Tensor;

void check_terms(const char* op, int64_t terms) {
  check_count(op, "terms", terms, kMaxTerms, "the number of Neumann terms after I");
}

void check_blocks(const char* op, const Tensor& S) {
  const auto t = S.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, "opt_fast.", op,
              ": expected S to be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK(S.dim() >= 2 && S.size(-1) == S.size(-2), "opt_fast.", op,
              ": expected S to be square [..., b, b], got shape ", S.sizes());
}

bool is_half(const Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

// Matrices per thread of an elementwise pass: at least ~16K elements.
int64_t pass_grain(int64_t bb) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(bb, 1)); }

// Pair passes: out = add + Σ_t (α_t X_t + β_t X_tᵀ) per matrix of contiguous [B, b, b] tensors (the skew
// and symmetric projections, fused with the sums around them). TensorIterator's M − M.mT() walks one
// operand down the columns and cost 4-10x a plain subtraction (measured, b = 32 and 256), as much as a
// block product at b = 32; so does a scalar loop over the pairs (i, j) (~1.5-3.5 ns per element here).
// float32 takes pairs of 4 × 4 tiles transposed in SSE registers (every load and store a row segment);
// the rest (float64, b mod 4) is that scalar loop. Both entries of a pair, or both tiles of a tile pair,
// are read before either is written, so out may be one of the X_t or add.
template <typename T>
struct PairTerm {
  const T* x;
  T alpha, beta;
};

template <typename T, size_t N>
using Terms = std::array<PairTerm<T>, N>;

// The pairs (i, j), i <= j, of the columns j >= j_from of one b × b matrix (offset `at` in every tensor).
template <typename T, size_t N>
void pair_scalar(T* y, const Terms<T, N>& terms, const T* add, int64_t at, int64_t b, int64_t j_from) {
  for (int64_t j = j_from; j < b; ++j)
    for (int64_t i = 0; i <= j; ++i) {
      const int64_t ij = at + i * b + j, ji = at + j * b + i;
      T yij = add ? add[ij] : T(0), yji = add ? add[ji] : T(0);
      for (const auto& t : terms) {
        const T xij = t.x[ij], xji = t.x[ji];
        yij += t.alpha * xij + t.beta * xji;
        yji += t.alpha * xji + t.beta * xij;
      }
      y[ij] = yij;
      y[ji] = yji;
    }
}

// The vector part: the pairs with j < 4⌊b/4⌋; returns where the scalar loop takes over (0: no vector path).
template <typename T, size_t N>
int64_t pair_tiles(T*, const Terms<T, N>&, const T*, int64_t, int64_t) { return 0; }

#if defined(__SSE__) || defined(_M_X64)
template <size_t N>
int64_t pair_tiles(float* y, const Terms<float, N>& terms, const float* add, int64_t at, int64_t b) {
  const int64_t b4 = b / 4 * 4;
  for (int64_t i0 = 0; i0 < b4; i0 += 4)
    for (int64_t j0 = i0; j0 < b4; j0 += 4) {   // tile (I, J) and tile (J, I)
      const int64_t ij = at + i0 * b + j0, ji = at + j0 * b + i0;
      __m128 p[4], q[4];                         // the out rows of tile (I, J) and of tile (J, I)
      for (int r = 0; r < 4; ++r) {
        p[r] = add ? _mm_loadu_ps(add + ij + r * b) : _mm_setzero_ps();
        q[r] = add ? _mm_loadu_ps(add + ji + r * b) : _mm_setzero_ps();
      }
      for (const auto& t : terms) {
        __m128 a[4], c[4];
        for (int r = 0; r < 4; ++r) {
          a[r] = _mm_loadu_ps(t.x + ij + r * b);
          c[r] = _mm_loadu_ps(t.x + ji + r * b);
        }
        __m128 ta0 = a[0], ta1 = a[1], ta2 = a[2], ta3 = a[3], tc0 = c[0], tc1 = c[1], tc2 = c[2], tc3 = c[3];
        _MM_TRANSPOSE4_PS(ta0, ta1, ta2, ta3);
        _MM_TRANSPOSE4_PS(tc0, tc1, tc2, tc3);
        const __m128 ta[4] = {ta0, ta1, ta2, ta3}, tc[4] = {tc0, tc1, tc2, tc3};
        const __m128 va = _mm_set1_ps(t.alpha), vb = _mm_set1_ps(t.beta);
        for (int r = 0; r < 4; ++r) {
          p[r] = _mm_add_ps(p[r], _mm_add_ps(_mm_mul_ps(va, a[r]), _mm_mul_ps(vb, tc[r])));
          q[r] = _mm_add_ps(q[r], _mm_add_ps(_mm_mul_ps(va, c[r]), _mm_mul_ps(vb, ta[r])));
        }
      }
      for (int r = 0; r < 4; ++r) {
        _mm_storeu_ps(y + ij + r * b, p[r]);
        _mm_storeu_ps(y + ji + r * b, q[r]);
      }
    }
  return b4;
}
#endif

// out (a contiguous [B, b, b] tensor) = add + Σ_t (α_t X_t + β_t X_tᵀ); X_t and add contiguous like out.
template <size_t N>
void pair_pass(Tensor& out, const std::array<std::tuple<const Tensor*, double, double>, N>& xs,
               const Tensor* add) {
  const int64_t batch = out.size(0), b = out.size(-1), bb = b * b;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "pair_pass", [&] {
    using T = scalar_t;
    Terms<T, N> terms;
    for (size_t k = 0; k < N; ++k)
      terms[k] = {std::get<0>(xs[k])->template const_data_ptr<T>(), static_cast<T>(std::get<1>(xs[k])),
                  static_cast<T>(std::get<2>(xs[k]))};
    const T* a = add ? add->template const_data_ptr<T>() : nullptr;
    T* y = out.template data_ptr<T>();
    at::parallel_for(0, batch, pass_grain(bb), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        pair_scalar(y, terms, a, m * bb, b, pair_tiles(y, terms, a, m * bb, b));
    });
  });
}

// α (M + s Mᵀ) of a [B, b, b] tensor: into a new contiguous tensor, or in place (M contiguous).
Tensor combine(const Tensor& M, double alpha, double s, bool inplace) {
  auto src = M.contiguous();
  auto dst = inplace && src.is_same(M) ? src : at::empty_like(src);
  pair_pass<1>(dst, {std::make_tuple(&src, alpha, alpha * s)}, nullptr);
  return dst;
}

Tensor sym(const Tensor& M) { return combine(M, 0.5, 1.0, /*inplace=*/false); }
Tensor sym_(Tensor M) { return combine(M, 0.5, 1.0, /*inplace=*/true); }
Tensor minus_transpose_(Tensor M) { return combine(M, 1.0, -1.0, /*inplace=*/true); }   // M − Mᵀ

// skew(S) as a contiguous [B, b, b] tensor in the compute dtype.
Tensor skew_part(const Tensor& S) {
  const int64_t b = S.size(-1);
  auto S3 = S.reshape({-1, b, b});
  if (is_half(S3)) S3 = S3.to(at::kFloat);
  return combine(S3, 0.5, -1.0, /*inplace=*/false);
}

Tensor eye3(const Tensor& like) { return at::eye(like.size(-1), like.options()); }

// Y = A², P_j = Yʲ for j = 1..h (P_1 is Y itself).
std::vector<Tensor> power_chain(const Tensor& A, int64_t h) {
  std::vector<Tensor> P;
  P.reserve(std::max<int64_t>(h, 1));
  P.push_back(at::bmm(A, A));
  for (int64_t j = 2; j <= h; ++j) P.push_back(at::bmm(P.back(), P[0]));
  return P;
}

template <typename T>
T* ptr(Tensor& t) { return t.data_ptr<T>(); }
template <typename T>
const T* cptr(const Tensor& t) { return t.const_data_ptr<T>(); }

// f(m0, m1) over chunks of the matrices of a batch of b × b matrices, in parallel.
template <typename F>
void for_matrices(int64_t batch, int64_t b, const F& f) {
  at::parallel_for(0, batch, pass_grain(b * b), f);
}

// The two polynomials around the product of the odd-k map: E = I + Σ_{j=1..h} P_j and
// Am = I + σ·2A + Y (σ = +1: Am; σ = −1: Amᵀ), in one pass (h <= 2 fused, more powers added after).
// A is contiguous; the powers may be slices of the saved stack (matrices contiguous, any batch stride).
std::pair<Tensor, Tensor> am_and_e(const Tensor& A, const std::vector<Tensor>& P, int64_t h, double sigma) {
  auto E = at::empty_like(A), Am = at::empty_like(A);
  const int64_t b = A.size(-1), bb = b * b;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "am_and_e", [&] {
    using T = scalar_t;
    const T two_sigma = static_cast<T>(2.0 * sigma);
    for_matrices(A.size(0), b, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const T* __restrict a = cptr<T>(A) + m * bb;
        const T* __restrict y = cptr<T>(P[0]) + m * P[0].stride(0);
        const T* __restrict y2 = h >= 2 ? cptr<T>(P[1]) + m * P[1].stride(0) : nullptr;
        T* __restrict e = ptr<T>(E) + m * bb;
        T* __restrict am = ptr<T>(Am) + m * bb;
        if (y2) {
          for (int64_t k = 0; k < bb; ++k) e[k] = y[k] + y2[k];
        } else if (h == 1) {
          for (int64_t k = 0; k < bb; ++k) e[k] = y[k];
        } else {
          for (int64_t k = 0; k < bb; ++k) e[k] = T(0);
        }
        for (int64_t k = 0; k < bb; ++k) am[k] = two_sigma * a[k] + y[k];
        for (int64_t i = 0; i < b; ++i) {
          e[i * b + i] += T(1);
          am[i * b + i] += T(1);
        }
      }
    });
  });
  for (int64_t j = 2; j < h; ++j) E.add_(P[j]);
  return {Am, E};
}

// R from A and its powers (P[0] = Y always present; P[j-1] = Yʲ up to h).
Tensor series(const Tensor& A, const std::vector<Tensor>& P, int64_t terms) {
  if (terms == 0) return (A + eye3(A)).contiguous();
  const int64_t h = terms / 2;
  const auto [Am, E] = am_and_e(A, P, h, 1.0);
  if (h == 0) return Am;  // k = 1
  auto R = at::bmm(Am, E);
  if (terms % 2 == 0) {
    const auto C = at::bmm(A, P[h - 1]);  // A^(k+1)
    R.sub_(C);
    R.sub_(at::bmm(C, A));
  }
  return R;
}

// Adjoint of E = I + Σ_{j=1..h} Yʲ through the chain Yʲ = Yʲ⁻¹·Y, for the symmetric seeds D_j on Yʲ
// (seed[j-1]); returns the cotangent of Y (symmetric).
Tensor power_chain_adjoint(const std::vector<Tensor>& P, std::vector<Tensor> seed, int64_t h) {
  if (h == 1) return seed[0];
  Tensor C = seed[h - 1], L;
  for (int64_t j = h; j >= 2; --j) {
    const auto contrib = at::bmm(P[j - 2], C);
    L = L.defined() ? L.add_(contrib) : contrib;
    C = at::baddbmm(seed[j - 2], C, P[0]);
  }
  return L.add_(C);
}

Tensor backward_impl(const Tensor& grad, const Tensor& S, const std::vector<Tensor>& P_in, int64_t terms) {
  const int64_t b = S.size(-1);
  const auto A = skew_part(S);
  const auto G = grad.reshape({-1, b, b}).to(A.scalar_type()).contiguous();
  if (terms == 0) return combine(G, 0.5, -1.0, false).view(S.sizes()).to(S.scalar_type());
  const int64_t h = terms / 2;
  const auto& P = P_in.empty() ? power_chain(A, h) : P_in;
  Tensor W, dY;
  if (h == 0) {  // k = 1: R = Am
    W = G.clone(at::MemoryFormat::Contiguous);  // grad may be transposed in storage
    dY = sym(G);
  } else {
    const auto [AmT, E] = am_and_e(A, P, h, -1.0);
    W = at::bmm(G, E);                 // dAm (E symmetric)
    const auto D = sym_(at::bmm(AmT, G));
    std::vector<Tensor> seed(h, D);
    Tensor M_extra;
    if (terms % 2 == 0) {              // R −= C + C·A, C = A·P_h
      const auto C = at::bmm(A, P[h - 1]);
      const auto dC = at::baddbmm(G, G, A, -1.0, 1.0);   // −G (from −C) + G·A (from −C·A, Aᵀ = −A)
      M_extra = at::baddbmm(at::bmm(dC, P[h - 1]), C.mT(), G, 1.0, -1.0);  // dC·P_h − Cᵀ·G
      seed[h - 1] = combine(at::bmm(A, dC), -0.5, 1.0, /*inplace=*/true).add_(D);   // D + sym(dP_h), dP_h = −A dC
    }
    if (h == 2 && terms % 2 == 1) {    // k = 5: L = D + YD + DY (one product), dY = sym(W) + L in one pass
      auto V = at::bmm(P[0], D);
      pair_pass<2>(V, {std::make_tuple(&W, 0.5, 0.5), std::make_tuple(&V, 1.0, 1.0)}, &D);   // sym(W) + V + Vᵀ + D
      dY = V;
    } else {
      dY = sym(W).add_(power_chain_adjoint(P, seed, h));
    }
    if (M_extra.defined()) W.add_(M_extra, 0.5);
  }
  W.baddbmm_(dY, A, 1.0, -1.0);        // W = ½ M − Z, M = 2 dAm (+ extra), Z = sym(dY)·A
  return minus_transpose_(W).view(S.sizes()).to(S.scalar_type());
}

std::vector<Tensor> unstack_powers(const Tensor& powers, int64_t b) {
  const int64_t h = powers.size(-3);
  auto P4 = powers.reshape({-1, h, b, b});
  P4 = (is_half(P4) ? P4.to(at::kFloat) : P4).contiguous();
  std::vector<Tensor> P;
  for (int64_t j = 0; j < h; ++j) P.push_back(P4.select(1, j));
  return P;
}

Tensor cayley_neumann_cpu(const Tensor& S, int64_t terms) {
  check_blocks("cayley_neumann", S);
  check_terms("cayley_neumann", terms);
  if (S.numel() == 0) return at::empty(S.sizes(), S.options());
  const auto A = skew_part(S);
  std::vector<Tensor> P;
  if (terms > 0) P = power_chain(A, terms / 2);
  return series(A, P, terms).view(S.sizes()).to(S.scalar_type());
}

std::tuple<Tensor, Tensor> cayley_neumann_powers_cpu(const Tensor& S, int64_t terms) {
  check_blocks("cayley_neumann_powers", S);
  check_terms("cayley_neumann_powers", terms);
  const int64_t b = S.size(-1), h = terms / 2;
  auto shape = S.sizes().vec();
  shape.insert(shape.end() - 2, h);
  if (S.numel() == 0 || h == 0) {
    auto R = S.numel() == 0 ? at::empty(S.sizes(), S.options()) : cayley_neumann_cpu(S, terms);
    return {R, at::empty(shape, S.options())};
  }
  const auto A = skew_part(S);
  const auto P = power_chain(A, h);
  const auto R = series(A, P, terms).view(S.sizes()).to(S.scalar_type());
  return {R, at::stack(P, 1).view(shape).to(S.scalar_type())};
}

// The backward ops' inputs as _checks.cayley_neumann_backward: S and terms as in the forward, grad (and the
// forward's powers, read for every block) of the forward's shapes, S's dtype.
void check_backward(const char* op, const Tensor& grad, const Tensor& S, int64_t terms) {
  check_blocks(op, S);
  check_terms(op, terms);
  check_like(op, "grad", grad, S.sizes(), "S", S);
}

Tensor cayley_neumann_backward_cpu(const Tensor& grad, const Tensor& S, int64_t terms) {
  check_backward("cayley_neumann_backward", grad, S, terms);
  if (S.numel() == 0) return at::empty(S.sizes(), S.options());
  return backward_impl(grad, S, {}, terms);
}

Tensor cayley_neumann_powers_backward_cpu(const Tensor& grad, const Tensor& S, const Tensor& powers,
                                          int64_t terms) {
  const char* op = "cayley_neumann_powers_backward";
  check_backward(op, grad, S, terms);
  auto want = S.sizes().vec();
  want.insert(want.end() - 2, terms / 2);
  check_like(op, "powers", powers, want, "S", S);
  if (S.numel() == 0) return at::empty(S.sizes(), S.options());
  const int64_t b = S.size(-1);
  if (terms / 2 == 0) return backward_impl(grad, S, {}, terms);
  return backward_impl(grad, S, unstack_powers(powers, b), terms);
}

}  // namespace

TORCH_LIBRARY_IMPL(opt_fast, CPU, m) {
  m.impl("cayley_neumann", OPT_FAST_KERNEL(cayley_neumann_cpu));
  m.impl("cayley_neumann_backward", OPT_FAST_KERNEL(cayley_neumann_backward_cpu));
  m.impl("cayley_neumann_powers", OPT_FAST_KERNEL(cayley_neumann_powers_cpu));
  m.impl("cayley_neumann_powers_backward", OPT_FAST_KERNEL(cayley_neumann_powers_backward_cpu));
}

}  // namespace opt_fast
