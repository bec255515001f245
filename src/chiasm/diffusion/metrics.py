"""Sample quality against the held-out split: FID on a domain classifier's features, precision /
recall (Kynkäänniemi et al. 2019) and the share of samples recognised as the class asked."""

from __future__ import annotations

import numpy as np
import torch


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets."""
    from scipy import linalg

    a64, b64 = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    s_a, s_b = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # near-singular product: nudge both (as pytorch-fid does)
        eps = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def _radii(feats: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # the 0th neighbour is the point itself


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Precision: share of samples inside the real data's k-NN manifold; recall: the other way round."""
    real, fake = real.double(), fake.double()
    r_real, r_fake = _radii(real, k), _radii(fake, k)
    d = torch.cdist(fake, real)  # (fake, real)
    precision = float((d <= r_real.unsqueeze(0)).any(dim=1).float().mean())
    recall = float((d.T <= r_fake.unsqueeze(0)).any(dim=1).float().mean())
    return precision, recall


def recognition_rate(predicted: torch.Tensor, asked: torch.Tensor) -> float:
    """Share of samples the classifier assigns to the class they were generated for."""
    return float((predicted == asked).float().mean())
