// A measurement, not part of the library: the S = 2 edge integrals log I(h, p, q) of
// pyro_cpa/integrate/edge_flux.py (log_edge_flux) as one C++ loop over the edges, with the same piece cuts, the
// same certified node-count tables, the same Gauss-Legendre/Laguerre rules and the same order of operations
// (built with -ffp-contract=off: no fused multiply-adds). probe.py builds it with torch's load_inline and
// compares it with the torch implementation (values and time). See the README's "Scaling limits".
#include <torch/extension.h>
#include <cmath>
#include <vector>
#include <algorithm>

namespace {
constexpr int P_BINS = 33, A_BINS = 64, A_PER_E = 8, ELL_BINS = 48, ELL_PER_E = 4;
constexpr double P_BIN = 0.25, DIV_TINY = 1e-300;

struct Rules { const double* x[41]; const double* w[41]; };

inline double gl_eval(double da, double half, double h, double p, int n, const Rules& R) {
  const double* x = R.x[n]; const double* w = R.w[n];
  const double c2 = 2.0 * p + da, c1 = p + da, hh = h * h;
  double s = 0.0;
  for (int i = 0; i < n; ++i) {
    double u = half * (1.0 + x[i]);
    double f = (u + da) * -0.5;
    f = f * (u + c2);
    f = std::exp(f) * h;
    double t = u + c1;
    t = t * t + hh;
    s += f / t * w[i];
  }
  return s * half;
}

inline double sub_eval(double ell, double p, double h, int n, const Rules& R) {
  const double* x = R.x[n]; const double* w = R.w[n];
  const double c = p + ell, hh = h * h;
  double s = 0.0;
  for (int i = 0; i < n; ++i) {
    double ts = ell * x[i] + c;
    double wv = std::max((ts * ts + hh) * 0.5, DIV_TINY);
    s += std::expm1(-wv) / wv * w[i];
  }
  return s;
}

inline double lag_eval(double s0, double h, int n, const Rules& R) {
  const double* x = R.x[n]; const double* w = R.w[n];
  const double hh = h * h;
  double s = 0.0;
  for (int i = 0; i < n; ++i) {
    double v = s0 + 2.0 * x[i];
    s += w[i] / ((hh + v) * std::sqrt(v));
  }
  return s;
}

inline int pick(int need, const std::vector<int64_t>& lv, size_t from) {
  for (size_t i = from; i < lv.size(); ++i) if (need <= lv[i]) return (int)lv[i];
  return -1;
}
}  // namespace

// returns (log I, nodes evaluated)
std::vector<at::Tensor> log_edge_flux_fused(
    at::Tensor h_, at::Tensor p_, at::Tensor q_, at::Tensor gl_need_, at::Tensor sub_need_, at::Tensor lag_need_,
    at::Tensor thr_, std::vector<at::Tensor> gx, std::vector<at::Tensor> gw, std::vector<at::Tensor> lx,
    std::vector<at::Tensor> lw, std::vector<double> cuts, double tol, double lag_t2, double lag_min_dz, double z_max,
    double sub_r2, std::vector<int64_t> gl_levels, std::vector<int64_t> sub_levels, std::vector<int64_t> lag_levels,
    std::vector<double> lag_t2_grid, std::vector<double> lag_log_tol) {
  auto h_c = h_.contiguous(), p_c = p_.contiguous(), q_c = q_.contiguous();
  const double *H = h_c.data_ptr<double>(), *P = p_c.data_ptr<double>(), *Q = q_c.data_ptr<double>();
  const int64_t n = h_c.numel();
  auto out = at::empty_like(h_c);
  auto cnt = at::zeros({n}, h_c.options().dtype(at::kLong));
  double* O = out.data_ptr<double>();
  int64_t* C = cnt.data_ptr<int64_t>();
  const int64_t *GN = gl_need_.data_ptr<int64_t>(), *SN = sub_need_.data_ptr<int64_t>(),
                *LN = lag_need_.data_ptr<int64_t>();
  const double* THR = thr_.data_ptr<double>();
  Rules G{}, L{};
  for (int k = 0; k <= 40; ++k) {
    G.x[k] = gx[k].numel() ? gx[k].data_ptr<double>() : nullptr; G.w[k] = gw[k].numel() ? gw[k].data_ptr<double>() : nullptr;
    L.x[k] = lx[k].numel() ? lx[k].data_ptr<double>() : nullptr; L.w[k] = lw[k].numel() ? lw[k].data_ptr<double>() : nullptr;
  }
  const int K = (int)cuts.size();
  const int NLT = (int)lag_log_tol.size(), NLG = (int)lag_t2_grid.size();
  const double sqT = std::sqrt(lag_t2);
  const double amp = 1.0 / -std::expm1(-lag_min_dz);
  const double log_tol_amp = std::log(tol / amp);
  const double lt0 = lag_log_tol[0], g0inv = 1.0 / lag_t2_grid[0], itscale = 2.0 / std::log(2.0);
  const int gl0 = (int)gl_levels[0];
  bool bad = false;
  for (int64_t e = 0; e < n; ++e) {
    const double h = H[e], p = P[e], q = Q[e];
    const double p2 = p * p, hh = h * h;
    const double zq = 0.5 * (q - p) * (q + p);
    const double z0 = std::max(0.5 * (lag_t2 - p2), 0.0);
    const bool lag = zq >= z0 + lag_min_dz;
    const double t0 = std::max(p, sqT);
    const double top = lag ? t0 : q;
    const double ztop = lag ? z0 : zq;
    const int m = (int)std::min(std::ceil(std::sqrt(2.0 * ztop)), (double)K);
    const bool near = (hh + p2 <= sub_r2) && m > 0;
    int64_t nodes = 0;
    double integral = 0.0;
    const int pbin = (int)std::min(std::max(p * (1.0 / P_BIN), 0.0), (double)(P_BINS - 1));
    for (int k = near ? 1 : 0; k < m; ++k) {
      const double kf = k, k2a = kf * kf, k2b = (kf + 1.0) * (kf + 1.0);
      const double da = k2a / std::max(std::sqrt(p2 + k2a) + p, DIV_TINY);
      double db = std::min(k2b / (std::sqrt(p2 + k2b) + p), top - p);
      db = std::max(db, da);
      const double half = 0.5 * (db - da);
      const double a = p + da, b = p + db;
      const double alpha_l = (std::sqrt(hh + a * a) + std::sqrt(hh + b * b)) / (db - da);
      const int cls = k * P_BINS + pbin;
      double val;
      if (alpha_l < THR[cls]) {
        const int j = (int)std::min(std::max(std::log(alpha_l) * A_PER_E, 0.0), (double)(A_BINS - 1));
        const int need = (int)GN[(int64_t)cls * A_BINS + j];
        const int nl = pick(std::max(need, (int)gl_levels[1]), gl_levels, 1);
        if (nl < 0) { bad = true; val = 0.0; } else { val = gl_eval(da, half, h, p, nl, G); }
        nodes += gl0 + nl;  // the torch code evaluates the base level first, then redoes
        if (need > gl_levels[1]) nodes += gl_levels[1];
      } else {
        val = gl_eval(da, half, h, p, gl0, G);
        nodes += gl0;
      }
      integral += val;
    }
    if (near) {
      const double db = std::min(1.0 / (std::sqrt(p2 + 1.0) + p), top - p);
      const double ell = 0.5 * db, bs = p + db;
      const int js = (int)std::min(std::max(-std::log(ell) * ELL_PER_E, 0.0), (double)(ELL_BINS - 1));
      const int need = (int)SN[js];
      const int nl = pick(std::max(need, (int)sub_levels[0]), sub_levels, 0);
      if (nl < 0) bad = true;
      const double rem = nl < 0 ? 0.0 : sub_eval(ell, p, h, nl, G);
      nodes += nl + (need > sub_levels[0] ? sub_levels[0] : 0);
      const double br = std::atan(db * h / (hh + bs * p)) + 0.5 * h * ell * rem;
      integral += br * std::exp(0.5 * (hh + p2));
    }
    if (lag) {
      for (int side = 0; side < 2; ++side) {
        double s0, zs;
        if (side == 0) { s0 = t0 * t0; zs = 0.5 * (t0 - p) * (t0 + p); }
        else { if (!(zq < z_max)) break; s0 = q * q; zs = zq; }
        const double log_tau = log_tol_amp + std::log(std::max(std::expm1(zs), 1.0));
        const int jt = (int)std::min(std::max((log_tau - lt0) * (1.0 / 4.0), 0.0), (double)(NLT - 1));
        const int it = (int)std::min(std::max(std::log(s0 * g0inv) * itscale, 0.0), (double)(NLG - 1));
        const int nl = pick((int)LN[it * NLT + jt], lag_levels, 0);
        if (nl < 0) { bad = true; continue; }
        nodes += nl;
        const double lsum = lag_eval(s0, h, nl, L);
        const double scale = side == 0 ? std::exp(-zs) : -std::exp(-zs);
        integral += lsum * h * scale;
      }
    }
    C[e] = nodes;
    O[e] = std::log(std::max(integral, DIV_TINY));
  }
  TORCH_CHECK(!bad, "edge_flux: a rule needs more nodes than the largest level");
  return {out, cnt};
}
