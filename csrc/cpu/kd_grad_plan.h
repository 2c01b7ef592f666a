// The gradient of one kd_loss row in the divergence kernels, as a few coefficients (shared by the
// row path, divergence_cpu.cpp, and the lane path, kd_tiles.cpp).
#pragma once

#include <stdint.h>

#include "rbkd_divergence.h"
#include "rbkd_numerics.h"

namespace rbkd::cpu {

// g_j = [kd_on] (A1 du_j + A0 + A2 (z_j - mean)) + c_ce (pce_j - [j == y]),
// du_j = cx x_j + cs e_j (x = h and e = p_s for the divergences with an h; x = exp_t and e =
// exp_s for kl and dkd). Without standardize A1 = c_kl, A0 = A2 = 0.
struct GradPlan {
  float cx, cs, A1, A0, A2, mean, c_ce, inv_Sce;
  bool kd_on;  // alpha > 0: a zero weight drops the term (its du may be inf)
};

// Fills A1, A0, A2 from the sums: sdu = sum du, sdud = sum du_j (z_j - mean) (README's formula).
RBKD_INLINE void plan_standardize(GradPlan& g, const ZScore& zs, float c_kl, float sdu, float sdud,
                                  int64_t C) {
  g.mean = zs.mean;
  g.A1 = zs.rho * c_kl;
  g.A0 = -g.A1 * sdu / static_cast<float>(C);
  g.A2 = zs.sigma > 0.0f
             ? -zs.rho * zs.rho * c_kl * sdud / (static_cast<float>(C - 1) * zs.sigma)
             : 0.0f;
}

// kd_loss_fwd for C <= kd::kSmallC, every divergence (kd_tiles.cpp).
void kd_tiles_fwd(const KdLossArgs& a, int num_threads);

}  // namespace rbkd::cpu
