"""Linear assignment: the permutation maximising Σ_i C[i, perm[i]] (scipy's Hungarian solver)."""

import torch


def best_permutation(cost: torch.Tensor) -> torch.Tensor:
    """perm [n] (long) with perm[i] = the column matched to row i, maximising the total of C."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.detach().double().cpu().numpy(), maximize=True)
    perm = torch.empty(cost.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return perm
