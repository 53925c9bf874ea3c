"""Paper mechanism: when does the damped FGN step stay close to the full-GGN step?

The paper predicts FGN is closest to the softmax GGN when the competitor mass
is concentrated or the damping is large, and deviates as the dropped
within-competitor term ``D = sum_i omega_i (1 - p_y,i) J_i^T (diag(q_i) - q_i q_i^T) J_i``
grows. Measured on one batch of a linear head, for the same batch and damping:

* FGN step ``d_F`` = ``compute_step(curvature="fgn", solver="cholesky", cg_tol=1e-12)`` and
  full-GGN step ``d_G`` = ``compute_step(curvature="ggn", solver="cg", cg_tol=1e-12)``;
* deviation: cosine similarity, ``||d_F - d_G|| / ||d_G||`` and the deviation in
  the ``A = G_F + Lambda`` norm, ``e_A = ||d_F - d_G||_A / ||d_F||_A``;
* the dropped term's size, three ways: (1) ``rho / (1 + rho)`` with
  ``rho = lambda_max(A^{-1} D)`` (dense, exact; in whitened coordinates
  ``A^{1/2} d_G = (I + M)^{-1} A^{1/2} d_F`` with ``M = A^{-1/2} D A^{-1/2}``,
  so ``e_A <= rho / (1 + rho)``: the justified measure); (2) the cheap
  trace ratio ``tr(D) / tr(G_F + Lambda)``; (3) the damping-free batch
  statistic ``sum_i omega_i (1 - p_y,i) tr(diag(q_i) - q_i q_i^T)``;
* Spearman and Pearson correlations between the deviation ``1 - cos`` (and
  ``e_A``) and each size measure, over the whole (concentration, damping) grid.

Data (synthetic, seeded): N=100 rows of d=128 standard-normal features scaled
by ``1/sqrt(d)`` (N <= d, so any logit matrix is realised exactly by a linear
head: ``W = (X^+ Z)^T``, zero intercept), K=10 classes, uniform labels. The
target logits fix every example's margin ``m_i ~ N(0, 1)`` (so ``p_y`` and the
FGN weight are the same in every configuration) and set the competitor logits
to ``s * u_ik`` with ``u ~ N(0, 1)``: the concentration ``s`` (an inverse
temperature on the competitors only) moves the mean entropy of ``q`` from
``log(K-1)`` (s=0, uniform) towards 0. Grid: s in {0, .25, .5, 1, 2, 4, 8, 16},
damping in {1e-4, ..., 1e2}; alpha = 0. ``--quick``: N=40, d=48, K=5, 4 x 4 grid.
"""

from __future__ import annotations

# _common must be imported first: it sets the thread env vars before numpy/torch load.
# ruff: noqa: I001
import _common  # noqa: F401
from _common import (
    figure_path,
    flatten,
    fmt,
    image_link,
    machine_description,
    markdown_table,
    parse_args,
    unflatten,
    write_outputs,
)

import numpy as np
import torch
from scipy import stats

from sklearn_fgn.core import Head, forward
from sklearn_fgn.core import competitor_log_proba, curvature_weight, margin, margin_direction
from sklearn_fgn.core import StepOptions, compute_step, normalized_weights

DTYPE = torch.float64


def make_batch(n: int, d: int, k: int, seed: int = 0):
    """Seeded features, labels, margins and raw competitor scores (see docstring)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=DTYPE) / d**0.5
    y = torch.randint(0, k, (n,), generator=gen)
    m0 = torch.randn(n, generator=gen, dtype=DTYPE)
    u = torch.randn(n, k, generator=gen, dtype=DTYPE)
    return X, y, m0, u


def params_for(X, y, m0, u, s: float):
    """Linear-head parameters whose logits have margins ``m0`` and competitor logits ``s * u``."""
    comp = (s * u).scatter(1, y[:, None], float("-inf"))
    true = m0 + torch.logsumexp(comp, dim=1)
    Z = comp.scatter(1, y[:, None], true[:, None])
    W = (torch.linalg.pinv(X) @ Z).T.contiguous()
    return {"coef_0": W, "intercept_0": torch.zeros(u.shape[1], dtype=DTYPE)}


def row_factor(jac, weights, probs):
    """Rows ``sqrt(weights_i) T_i J_i`` with ``T = (I - sqrt(p) sqrt(p)^T) diag(sqrt(p))``.

    ``R^T R = sum_i weights_i J_i^T (diag(p_i) - p_i p_i^T) J_i``.
    """
    sq = probs.sqrt()
    proj = torch.eye(probs.shape[1], dtype=DTYPE) - sq[:, :, None] * sq[:, None, :]
    T = proj * sq[:, None, :]
    return (weights.sqrt()[:, None, None] * torch.einsum("ikl,ilp->ikp", T, jac)).reshape(-1, jac.shape[2])


def dense_terms(head, params, X, y, jac):
    """Dense ``G_F``, dropped term ``D``, and batch statistics."""
    weights = normalized_weights(None, X.shape[0], X)
    logits = forward(head, params, X)
    m = margin(logits, y)
    g_rows = torch.einsum("ik,ikp->ip", margin_direction(logits, y), jac)
    G_F = torch.einsum("i,ip,iq->pq", weights * curvature_weight(m), g_rows, g_rows)
    q = competitor_log_proba(logits, y).exp()
    one_minus_py = torch.sigmoid(-m)
    R = row_factor(jac, weights * one_minus_py, q)
    D = R.T @ R
    entropy = float(-(q * torch.log(q.clamp_min(1e-300))).sum(1).mean())
    stat = float((weights * one_minus_py * (1 - (q * q).sum(1))).sum())
    return G_F, D, entropy, stat


def one_config(head, params, X, y, G_F, D, lam_diag, damping):
    """Steps and all deviation / size measures for one damping."""
    res_f = compute_step(
        head,
        params,
        X,
        y,
        None,
        StepOptions(damping=damping, curvature="fgn", solver="cholesky", cg_tol=1e-12, cg_max_iter=50),
    )
    res_g = compute_step(
        head,
        params,
        X,
        y,
        None,
        StepOptions(damping=damping, curvature="ggn", solver="cg", cg_tol=1e-12, cg_max_iter=5000),
    )
    d_f, d_g = flatten(res_f.step), flatten(res_g.step)
    A = G_F + torch.diag(lam_diag)
    L = torch.linalg.cholesky(A)
    Linv_D = torch.linalg.solve_triangular(L, D, upper=False)
    M = torch.linalg.solve_triangular(L, Linv_D.T, upper=False)
    rho = float(torch.linalg.eigvalsh(0.5 * (M + M.T))[-1])
    diff = d_f - d_g
    e_A = float(torch.sqrt(diff @ A @ diff) / torch.sqrt(d_f @ A @ d_f))
    grad = flatten(res_f.gradient)
    dense_g = -torch.linalg.solve(A + D, grad)
    return {
        "cos": float(d_f @ d_g / (d_f.norm() * d_g.norm())),
        "rel diff": float(diff.norm() / d_g.norm()),
        "e_A": e_A,
        "rho/(1+rho)": rho / (1 + rho),
        "tr ratio": float(D.trace() / A.trace()),
        "cg check": float((d_g - dense_g).norm() / dense_g.norm()),
    }


def correlations(rows: list[dict]) -> list[dict]:
    """Spearman and Pearson correlation of each deviation with each size measure, over the grid."""
    out = []
    for dev in ("1 - cos", "e_A"):
        for size in ("rho/(1+rho)", "tr ratio", "batch stat"):
            a = np.array([r[dev] for r in rows])
            b = np.array([r[size] for r in rows])
            out.append(
                {
                    "deviation": dev,
                    "dropped-term size": size,
                    "Spearman": float(stats.spearmanr(a, b).statistic),
                    "Pearson": float(stats.pearsonr(a, b).statistic),
                    "Pearson (log-log)": float(stats.pearsonr(np.log(a), np.log(b)).statistic),
                }
            )
    return out


def run_grid(n, d, k, concentrations, dampings) -> list[dict]:
    X, y, m0, u = make_batch(n, d, k)
    head = Head(n_features=d, n_logits=k)
    rows = []
    for s in concentrations:
        params = params_for(X, y, m0, u, s)
        jac = torch.func.jacrev(lambda v, p=params: forward(head, unflatten(v, p), X))(flatten(params))
        G_F, D, entropy, stat = dense_terms(head, params, X, y, jac)
        for damping in dampings:
            lam_diag = torch.full((G_F.shape[0],), damping, dtype=DTYPE)
            r = one_config(head, params, X, y, G_F, D, lam_diag, damping)
            rows.append(
                {
                    "s": s,
                    "entropy(q)": entropy,
                    "damping": damping,
                    **r,
                    "1 - cos": 1 - r["cos"],
                    "batch stat": stat,
                }
            )
    return rows


def grid_table(rows, value: str) -> str:
    """Markdown grid: rows = concentration (entropy), columns = damping."""
    dampings = sorted({r["damping"] for r in rows})
    table = []
    for s in sorted({r["s"] for r in rows}):
        sel = {r["damping"]: r for r in rows if r["s"] == s}
        row = {"s": s, "H(q)": sel[dampings[0]]["entropy(q)"]}
        row.update({f"λ={fmt(lam)}": sel[lam][value] for lam in dampings})
        table.append(row)
    return markdown_table(table)


def monotonicity(rows) -> tuple[float, float]:
    """Mean within-slice Spearman: (entropy vs 1-cos at fixed damping, damping vs 1-cos at fixed s)."""
    by_lam, by_s = {}, {}
    for r in rows:
        by_lam.setdefault(r["damping"], []).append(r)
        by_s.setdefault(r["s"], []).append(r)
    ent = [
        stats.spearmanr([r["entropy(q)"] for r in g], [r["1 - cos"] for r in g]).statistic
        for g in by_lam.values()
    ]
    lam = [
        stats.spearmanr([r["damping"] for r in g], [r["1 - cos"] for r in g]).statistic for g in by_s.values()
    ]
    return float(np.nanmean(ent)), float(np.nanmean(lam))


def plot(rows, corr, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    floor = 1e-16
    for lam in sorted({r["damping"] for r in rows}):
        sel = sorted((r for r in rows if r["damping"] == lam), key=lambda r: r["entropy(q)"])
        axes[0].semilogy(
            [r["entropy(q)"] for r in sel], [max(r["1 - cos"], floor) for r in sel], "o-", label=f"λ={lam:g}"
        )
    axes[0].set(
        xlabel="mean entropy of competitor distribution q",
        ylabel="1 - cos(FGN step, GGN step)",
        title="(a) competitor concentration",
    )
    axes[0].legend(fontsize=7)
    for s in sorted({r["s"] for r in rows}):
        sel = sorted((r for r in rows if r["s"] == s), key=lambda r: r["damping"])
        axes[1].loglog(
            [r["damping"] for r in sel],
            [max(r["1 - cos"], floor) for r in sel],
            "o-",
            label=f"H(q)={sel[0]['entropy(q)']:.2f}",
        )
    axes[1].set(xlabel="damping λ", ylabel="1 - cos", title="(b) damping")
    axes[1].legend(fontsize=7)
    x = np.array([r["rho/(1+rho)"] for r in rows])
    axes[2].loglog(x, [r["e_A"] for r in rows], "o", ms=4, label="e_A (A-norm deviation)")
    axes[2].loglog(x, [max(r["1 - cos"], floor) for r in rows], "x", ms=4, label="1 - cos")
    lims = [x.min(), x.max()]
    axes[2].loglog(lims, lims, "k--", lw=1, label="bound e_A = ρ/(1+ρ)")
    sp = next(c for c in corr if c["deviation"] == "e_A" and c["dropped-term size"] == "rho/(1+rho)")
    axes[2].set(
        xlabel="dropped term size ρ/(1+ρ), ρ = λmax((G_F+Λ)⁻¹D)",
        ylabel="deviation",
        title=f"(c) deviation vs dropped term (Spearman {sp['Spearman']:.2f})",
    )
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> dict:
    args = parse_args(__doc__.splitlines()[0])
    if args.quick:
        n, d, k, conc, damp = 40, 48, 5, [0.0, 1.0, 4.0, 16.0], [1e-4, 1e-2, 1.0, 1e2]
    else:
        n, d, k = 100, 128, 10
        conc, damp = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0], [10.0**e for e in range(-4, 3)]
    rows = run_grid(n, d, k, conc, damp)
    corr = correlations(rows)
    ent_rho, lam_rho = monotonicity(rows)
    violations = sum(r["e_A"] > r["rho/(1+rho)"] * (1 + 1e-6) + 1e-12 for r in rows)
    fig = figure_path("paper_mechanism.png", args.quick)
    plot(rows, corr, fig)
    main_corr = next(
        c for c in corr if c["deviation"] == "1 - cos" and c["dropped-term size"] == "rho/(1+rho)"
    )
    findings = [
        f"Concentration: at fixed damping, 1 - cos rises with the entropy of q (mean within-damping Spearman "
        f"{ent_rho:+.2f}); {'agrees' if ent_rho > 0.5 else 'does NOT clearly agree'} with the paper "
        "(FGN closest when competitor mass is concentrated).",
        f"Damping: at fixed concentration, 1 - cos falls as damping grows (mean within-concentration "
        f"Spearman {lam_rho:+.2f}); {'agrees' if lam_rho < -0.5 else 'does NOT clearly agree'} "
        "with the paper "
        "(FGN closest when damping is large).",
        f"Dropped term: 1 - cos vs ρ/(1+ρ) Spearman {main_corr['Spearman']:.2f}, Pearson "
        f"{main_corr['Pearson']:.2f} (log-log {main_corr['Pearson (log-log)']:.2f}); the bound "
        f"e_A <= ρ/(1+ρ) held in {len(rows) - violations}/{len(rows)} configurations. "
        f"{'Agrees' if main_corr['Spearman'] > 0.7 else 'Only partly agrees'} with the paper "
        "(deviation grows "
        "with the dropped within-competitor covariance).",
    ]
    cols = ["s", "entropy(q)", "damping", "cos", "rel diff", "e_A", "rho/(1+rho)", "tr ratio", "batch stat"]
    md = (
        f"Machine: {machine_description()}\n\nLinear head, float64, N={n}, d={d}, K={k}; "
        f"GGN-CG vs dense solve agreement: worst {fmt(max(r['cg check'] for r in rows))}.\n\n"
        "Cosine similarity of the FGN and full-GGN steps (rows: competitor concentration s and the mean "
        "entropy of q; columns: damping):\n\n"
        + grid_table(rows, "cos")
        + "\n\nRelative difference ||d_F - d_G|| / ||d_G||:\n\n"
        + grid_table(rows, "rel diff")
        + "\n\nCorrelation of the deviation with the dropped term's size (all grid points):\n\n"
        + markdown_table(corr)
        + "\n\n"
        + image_link(fig, "mechanism")
        + "\n\n"
        + "\n".join(f"- {f}" for f in findings)
    )
    print(md)
    claims = [
        {
            "claim": "FGN stays closest to the full GGN when competitor mass is concentrated",
            "measured": f"Spearman(entropy of q, 1 - cos) = {ent_rho:+.2f} at fixed damping",
            "verdict": "agrees" if ent_rho > 0.5 else "disagrees",
        },
        {
            "claim": "FGN stays closest to the full GGN when damping is large",
            "measured": f"Spearman(damping, 1 - cos) = {lam_rho:+.2f} at fixed concentration",
            "verdict": "agrees" if lam_rho < -0.5 else "disagrees",
        },
        {
            "claim": "FGN deviates as the dropped within-competitor covariance grows",
            "measured": f"Spearman(1 - cos, ρ/(1+ρ)) = {main_corr['Spearman']:.2f}, Pearson "
            f"{main_corr['Pearson']:.2f} (log-log {main_corr['Pearson (log-log)']:.2f})",
            "verdict": "agrees" if main_corr["Spearman"] > 0.7 else "partly",
        },
    ]
    summary = {
        "entropy_spearman": ent_rho,
        "damping_spearman": lam_rho,
        "correlations": corr,
        "claims": claims,
        "bound_violations": violations,
        "figure": fig.name,
        "findings": findings,
    }
    write_outputs(
        "paper_mechanism",
        [{k: r[k] for k in cols + ["1 - cos", "cg check"]} for r in rows],
        md,
        summary,
        args.quick,
    )
    return summary


if __name__ == "__main__":
    main()
