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

#include <vector>

namespace opt_fast {
namespace {

using at::Tensor;

void check_terms(const char* op, int64_t terms) {
  TORCH_CHECK(terms >= 0, "opt_fast.", op, ": expected terms >= 0 (the number of Neumann terms after I), got ",
              terms);
}

void check_blocks(const char* op, const Tensor& S) {
  const auto t = S.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, "opt_fast.", op,
              ": expected S to be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK(S.dim() >= 2 && S.size(-1) == S.size(-2), "opt_fast.", op,
              ": expected S to be square [..., b, b], got shape ", S.sizes());
}

bool is_half(const Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

// out = α (M + s Mᵀ) for every matrix of a contiguous [B, b, b] tensor (s = +1 symmetric part, −1 skew
// part), in place when out is M. A per-matrix loop over the pairs (i, j): TensorIterator's M − M.mT()
// walks one operand across rows and cost 10x a plain subtraction at b = 32 (measured), as much as the bmm.
template <typename T>
void pair_combine(T* out, const T* M, int64_t batch, int64_t b, T alpha, T s) {
  at::parallel_for(0, batch, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* x = M + m * b * b;
      T* y = out + m * b * b;
      for (int64_t i = 0; i < b; ++i) {
        y[i * b + i] = alpha * (x[i * b + i] + s * x[i * b + i]);
        for (int64_t j = i + 1; j < b; ++j) {
          const T xij = x[i * b + j], xji = x[j * b + i];
          y[i * b + j] = alpha * (xij + s * xji);
          y[j * b + i] = alpha * (xji + s * xij);
        }
      }
    }
  });
}

// α (M + s Mᵀ) of a [B, b, b] tensor: into a new contiguous tensor, or in place (M contiguous).
Tensor combine(const Tensor& M, double alpha, double s, bool inplace) {
  auto src = M.contiguous();
  auto dst = inplace && src.is_same(M) ? src : at::empty_like(src);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "pair_combine", [&] {
    pair_combine<scalar_t>(dst.data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(), src.size(0), src.size(-1),
                           static_cast<scalar_t>(alpha), static_cast<scalar_t>(s));
  });
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

Tensor sum_with_identity(const std::vector<Tensor>& P, int64_t h, const Tensor& eye) {
  auto E = eye.expand_as(P[0]).clone();
  for (int64_t j = 0; j < h; ++j) E.add_(P[j]);
  return E;
}

// R from A and its powers (P[0] = Y always present; P[j-1] = Yʲ up to h).
Tensor series(const Tensor& A, const std::vector<Tensor>& P, int64_t terms) {
  const auto eye = eye3(A);
  if (terms == 0) return A + eye;
  const int64_t h = terms / 2;
  auto Am = P[0] + eye;
  Am.add_(A, 2.0);
  if (h == 0) return Am;  // k = 1
  auto R = at::bmm(Am, sum_with_identity(P, h, eye));
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
  const bool same = seed[h - 1].is_same(seed[0]);
  if (h == 2 && same) {  // D + YD + DY with D symmetric: one product
    auto V = at::bmm(P[0], seed[0]);
    return combine(V, 1.0, 1.0, /*inplace=*/true).add_(seed[0]);   // V + Vᵀ + D
  }
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
  const auto eye = eye3(A);
  Tensor W, dY;
  if (h == 0) {  // k = 1: R = Am
    W = G.clone();
    dY = sym(G);
  } else {
    const auto E = sum_with_identity(P, h, eye);
    auto AmT = P[0] + eye;
    AmT.add_(A, -2.0);
    W = at::bmm(G, E);                 // dAm (E symmetric)
    const auto D = sym(at::bmm(AmT, G));
    std::vector<Tensor> seed(h, D);
    Tensor M_extra;
    if (terms % 2 == 0) {              // R −= C + C·A, C = A·P_h
      const auto C = at::bmm(A, P[h - 1]);
      const auto dC = at::baddbmm(G, G, A, -1.0, 1.0);   // −G (from −C) + G·A (from −C·A, Aᵀ = −A)
      M_extra = at::baddbmm(at::bmm(dC, P[h - 1]), C.mT(), G, 1.0, -1.0);  // dC·P_h − Cᵀ·G
      seed[h - 1] = combine(at::bmm(A, dC), -0.5, 1.0, /*inplace=*/true).add_(D);   // D + sym(dP_h), dP_h = −A dC
    }
    dY = sym(W).add_(power_chain_adjoint(P, seed, h));
    if (M_extra.defined()) W.add_(M_extra, 0.5);
  }
  W.sub_(at::bmm(dY, A));              // W = ½ M − Z, M = 2 dAm (+ extra), Z = sym(dY)·A
  return minus_transpose_(W).view(S.sizes()).to(S.scalar_type());
}

std::vector<Tensor> unstack_powers(const Tensor& powers, int64_t b) {
  const int64_t h = powers.size(-3);
  auto P4 = powers.reshape({-1, h, b, b});
  if (is_half(P4)) P4 = P4.to(at::kFloat);
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

Tensor cayley_neumann_backward_cpu(const Tensor& grad, const Tensor& S, int64_t terms) {
  check_grad_shape("cayley_neumann_backward", grad, S.sizes());
  if (S.numel() == 0) return at::empty(S.sizes(), S.options());
  return backward_impl(grad, S, {}, terms);
}

Tensor cayley_neumann_powers_backward_cpu(const Tensor& grad, const Tensor& S, const Tensor& powers,
                                          int64_t terms) {
  check_grad_shape("cayley_neumann_powers_backward", grad, S.sizes());
  if (S.numel() == 0) return at::empty(S.sizes(), S.options());
  const int64_t b = S.size(-1);
  TORCH_CHECK(powers.dim() == S.dim() + 1 && powers.size(-3) == terms / 2, "opt_fast.cayley_neumann_powers_backward: ",
              "expected powers of shape [..., ", terms / 2, ", b, b] for terms = ", terms, ", got ", powers.sizes());
  if (terms / 2 == 0) return backward_impl(grad, S, {}, terms);
  return backward_impl(grad, S, unstack_powers(powers, b), terms);
}

}  // namespace

TORCH_LIBRARY_IMPL(opt_fast, CPU, m) {
  m.impl("cayley_neumann", &cayley_neumann_cpu);
  m.impl("cayley_neumann_backward", &cayley_neumann_backward_cpu);
  m.impl("cayley_neumann_powers", &cayley_neumann_powers_cpu);
  m.impl("cayley_neumann_powers_backward", &cayley_neumann_powers_backward_cpu);
}

}  // namespace opt_fast
